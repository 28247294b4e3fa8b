"""backbones.files: atomic writes (unique temp name beside the target, then rename)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from backbones.files import atomic_dir, atomic_path, save_npy, write_json, write_text, write_with


def test_writers_leave_only_their_targets(tmp_path):
    write_text(tmp_path / "a" / "t.txt", "hi")
    write_json(tmp_path / "a" / "j.json", {"x": np.float32(1.5), "nan": float("nan"), "arr": np.arange(2)})
    save_npy(tmp_path / "a" / "n.npy", np.arange(3))
    write_with(tmp_path / "a" / "w.bin", lambda tmp: tmp.write_bytes(b"\0"))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["j.json", "n.npy", "t.txt", "w.bin"]
    assert json.loads((tmp_path / "a" / "j.json").read_text()) == {"x": 1.5, "nan": None, "arr": [0, 1]}
    assert np.load(tmp_path / "a" / "n.npy").tolist() == [0, 1, 2]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(f) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_dir_replaces_a_folder_or_keeps_it(tmp_path):
    d = tmp_path / "model"
    with atomic_dir(d) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(d) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in d.iterdir()] == ["b"]
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "c").write_text("3")
            raise RuntimeError("crash")
    assert [p.name for p in d.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["model"]
