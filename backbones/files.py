"""Writing and trusting files: the one helper every package uses.

A file is written to a unique temporary name in its own folder and renamed over
the target, so a reader sees the old file or the new one, never half of one, and
two writers of the same file never share a temporary name.

What a run trusts carries a content hash checked on load (:func:`save_tensors` /
:func:`load_tensors`, :func:`verify_sha256`); a failed check is an
:class:`IntegrityError` naming the file and what to do. Paths written into runs/
are relative to the runs directory (:func:`stored_path` / :func:`resolve_stored`),
and a process writing a folder others may want too holds :func:`claim` on it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np


class WriteError(OSError):
    """A file or folder could not be written (disk full, read-only folder, no permission). Commands wrapped in
    :func:`backbones.cli.user_errors` end with its one line naming the path."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


@contextmanager
def write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into a :class:`WriteError` naming it."""
    try:
        yield
    except (WriteError, TimeoutError):  # (a lock held by another process is no write failure)
        raise
    except OSError as e:
        why = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EDQUOT: "the disk quota is exceeded"}.get(e.errno, e.strerror or type(e).__name__)
        raise WriteError(e.errno, f"cannot write {path}: {why}; free space, fix the folder's permissions or "
                                  "write elsewhere (--out)") from e


def check_writable(folder: str | os.PathLike) -> Path:
    """Check, before any work starts and without creating anything, that ``folder`` can be written (or created):
    its nearest existing ancestor must be a writable folder; a :class:`WriteError` naming it otherwise."""
    folder = Path(folder).absolute()
    have = next(p for p in (folder, *folder.parents) if p.exists())
    if not have.is_dir():
        raise WriteError(errno.ENOTDIR, f"cannot write {folder}: {have} is a file, not a folder; write elsewhere (--out)")
    if not os.access(have, os.W_OK | os.X_OK):
        raise WriteError(errno.EACCES, f"cannot write {folder}: {have} is read-only or not ours; fix its permissions "
                                       "or write elsewhere (--out)")
    return folder


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a unique temporary path beside ``path``; on success rename it to ``path``.

    The temporary file keeps ``path``'s suffix (some writers, e.g. ``np.save``, care).
    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with write_errors(path):
            yield tmp_path
            os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a unique temporary folder beside ``path``; on success it replaces ``path`` (an old folder there
    is removed first). On an exception the temporary folder is removed and ``path`` is left untouched."""
    path = Path(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with write_errors(path):
            yield tmp
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> None:
    """Write ``obj`` as strict JSON atomically: numpy scalars/arrays and paths are converted,
    NaN and infinity become null (Python's json would write the invalid tokens NaN/Infinity)."""
    write_text(path, json.dumps(_finite(obj), indent=indent, default=_jsonable, allow_nan=False))


def _finite(o: Any) -> Any:
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, np.ndarray):
        return _finite(o.tolist())
    return o


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` atomically."""
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically (e.g. safetensors, PNGs)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------- integrity
class IntegrityError(ValueError):
    """A file a run trusts (weights, a policy, a cache) is corrupt, modified or holds NaN/inf.

    A ``ValueError``, so a command wrapped in :func:`backbones.cli.user_errors` ends with one
    line naming the file and what to do."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def nonfinite(arrays: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point arrays or torch tensors in ``arrays`` holding NaN or infinity."""
    bad = []
    for name, v in arrays.items():
        if hasattr(v, "is_floating_point"):  # a torch tensor
            if v.is_floating_point() and not bool(v.isfinite().all()):
                bad.append(name)
        elif np.asarray(v).dtype.kind in "fc" and not np.isfinite(v).all():
            bad.append(name)
    return bad


def verify_sha256(path: str | os.PathLike, expected: str | None, fix: str) -> str:
    """Hash ``path``; raise :class:`IntegrityError` (saying ``fix``) if it is not ``expected``
    (``None``: recorded by an older version, nothing to compare). Returns the hash."""
    got = sha256_file(path)
    if expected is not None and got != expected:
        raise IntegrityError(f"{path} does not match the sha256 recorded when it was written (corrupt or "
                             f"modified since); {fix}")
    return got


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, Any], what: str) -> str:
    """Write torch ``tensors`` as safetensors atomically and return the file's sha256. Refuses (before
    writing anything, so an earlier good file stays) if any is NaN or infinite; ``what`` names them."""
    from safetensors.torch import save_file

    bad = nonfinite(tensors)
    if bad:
        raise IntegrityError(f"refusing to save {what} to {path}: {', '.join(bad[:5])} hold NaN or infinite "
                             "values (training diverged or read non-finite inputs); nothing was written")
    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_with(path, lambda tmp: save_file(state, str(tmp)))
    return sha256_file(path)


def load_tensors(path: str | os.PathLike, expected_sha: str | None, fix: str) -> dict:
    """Read a safetensors file written by :func:`save_tensors`: its sha256 checked against
    ``expected_sha`` (skipped when ``None``) and every tensor checked for NaN/inf. Any failure is an
    :class:`IntegrityError` naming the file and saying ``fix``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {fix}")
    verify_sha256(path, expected_sha, fix)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise IntegrityError(f"{path} is not a readable safetensors file ({e}); {fix}") from None
    bad = nonfinite(tensors)
    if bad:
        raise IntegrityError(f"{path} holds NaN or infinite values in {', '.join(bad[:5])}; {fix}")
    return tensors


def read_json(path: str | os.PathLike, fix: str) -> dict:
    """A JSON object from ``path``; an unreadable or malformed file is an :class:`IntegrityError` saying ``fix``."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path} is unreadable ({e}); {fix}") from None
    if not isinstance(d, dict):
        raise IntegrityError(f"{path} holds {type(d).__name__}, not a JSON object; {fix}")
    return d


def read_text_utf8(path: str | os.PathLike) -> str:
    """A text file's content (a UTF-8 byte-order mark dropped); bytes that are not UTF-8 are a
    ``ValueError`` naming the file, line and column."""
    data = Path(path).read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}, line {line}, column {col}: not UTF-8 text (byte {data[e.start]:#04x}); "
                         "save the file as UTF-8") from None


# --------------------------------------------------------------------------- paths stored inside runs/
def stored_path(path: str | os.PathLike) -> str:
    """``path`` as written into a JSON file under runs/: relative to the runs directory when it lies
    inside it (so a copied or moved runs/ keeps working), else absolute."""
    from backbones.paths import runs_dir

    p = Path(path).expanduser().resolve()
    try:
        return p.relative_to(runs_dir()).as_posix()
    except ValueError:
        return str(p)


def resolve_stored(path: str | os.PathLike) -> Path:
    """The inverse of :func:`stored_path`: a relative path is taken from the runs directory."""
    from backbones.paths import runs_dir

    p = Path(path).expanduser()
    return p if p.is_absolute() else runs_dir() / p


# --------------------------------------------------------------------------- claiming a folder
@contextmanager
def claim(folder: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (a lock file beside it) for the block. If another process
    holds it, say so on stderr and wait until it is done: two commands needing the same checkpoint or
    cache then build it once. Not re-entrant: do not claim a folder twice in one process."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    lock = FileLock(str(folder.parent / f".{folder.name}.lock"), thread_local=False)
    try:
        with write_errors(lock.lock_file):
            folder.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process that is writing {what or folder} (lock {lock.lock_file}) ...",
              file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def summary_writer(folder: str | os.PathLike):
    """A TensorBoard ``SummaryWriter`` on ``folder``; an unwritable folder is a :class:`WriteError` naming it,
    raised before any work starts, not a traceback from inside TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    check_writable(folder)
    with write_errors(folder):
        return SummaryWriter(str(folder))
