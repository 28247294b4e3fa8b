"""CleanRL-style command lines: one dataclass of hyperparameters, a docstring under each field."""
from __future__ import annotations

import argparse
import ast
import inspect
from dataclasses import MISSING, fields


def field_docs(cls) -> dict[str, str]:
    """The string literal under each field of a dataclass, by field name."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def parse_dataclass(cls, argv=None, description: str | None = None):
    """Parse ``argv`` into ``cls``: one --flag per field, its docstring as help, bools as switches."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    docs = field_docs(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        if str(f.type) in ("bool", "<class 'bool'>"):
            p.add_argument(flag, action="store_true", help=docs.get(f.name))
            continue
        typ = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        p.add_argument(flag, type=typ, default=default, help=f"{docs.get(f.name, '')} (default: {default})")
    return cls(**vars(p.parse_args(argv)))
