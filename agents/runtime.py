"""Small helpers shared by the agents' entry points: CLI from a dataclass, atomic JSON, curves."""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import typing
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (CleanRL style), for ``--help``."""
    tree = ast.parse(inspect.getsource(cls))
    body, docs = tree.body[0].body, {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = b.value.value
    return docs


def parse_dataclass_args(cls, argv=None, description: str | None = None):
    """Build ``cls`` from the command line: one ``--flag`` per field (underscores -> dashes).

    ``bool`` fields become switches; ``int``/``float``/``str`` fields (optionally ``| None``)
    take a value, and the text ``none`` gives None for optional ones.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = type(None) in typing.get_args(hint)
        base = args[0] if optional and len(args) == 1 else hint
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        if base is bool:
            p.add_argument(flag, action="store_true", default=default, help=docs.get(f.name))
            continue
        conv = base if base in (int, float, str) else str
        if optional:
            conv = _optional(conv)
        p.add_argument(flag, type=conv, default=default, help=f"{docs.get(f.name)} (default: {default})")
    return cls(**vars(p.parse_args(argv)))


def _optional(conv):
    def parse(text: str):
        return None if text.lower() == "none" else conv(text)

    parse.__name__ = conv.__name__
    return parse


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def thin(curve: list, max_points: int = 200) -> list:
    """Every k-th point of a curve so that at most ~``max_points`` remain (the last point kept)."""
    if len(curve) <= max_points:
        return list(curve)
    k = int(np.ceil(len(curve) / max_points))
    out = list(curve[::k])
    if out[-1] != curve[-1]:
        out.append(curve[-1])
    return out


def tail_mean(curve: list, frac: float = 0.1) -> float:
    """Mean y of the points of a (x, y) curve whose x lies in the last ``frac`` of its x range."""
    if not curve:
        return float("nan")
    xs, ys = np.asarray(curve, dtype=float).T
    lo = xs.min() + (1 - frac) * (xs.max() - xs.min())
    sel = xs >= lo
    return float(ys[sel].mean())


@contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch intra-op threads, then restore the previous count.

    Policy networks are small and fastest on one thread; backbone work (stage-1
    training, cache building) must keep every core, so only the policy's own work
    runs inside this block.
    """
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(prev)
