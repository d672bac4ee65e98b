"""atomic_output: complete outputs appear at once, failures leave nothing, modes follow the umask."""
from __future__ import annotations

import os

import pytest
import torch

from adaptools.atomic import atomic_output
from adaptools.errors import OutputExistsError
from adaptools.formats.tensors import write_safetensors


def test_output_modes_follow_the_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "out") as folder:
            write_safetensors({"x": torch.ones(2)}, folder / "t.safetensors")
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "t.safetensors").stat().st_mode & 0o777 == 0o644


def test_failure_leaves_nothing_and_existing_output_is_refused(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "out") as folder:
            (folder / "partial").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError):
        with atomic_output(tmp_path / "out"):
            pass
    with atomic_output(tmp_path / "out", overwrite=True, is_file=False) as folder:
        (folder / "new").write_text("complete")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
