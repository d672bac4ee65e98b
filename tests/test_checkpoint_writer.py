"""The streamed safetensors writer: planned byte ranges filled in any order, in row ranges, from several threads;
small tensors gathered and written at close; the files read back with safetensors itself."""
from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from adaptools.checkpoints.shards import SMALL_BYTES, ShardWriter


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def header_keys(path) -> list[str]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return [k for k in json.loads(f.read(length)) if k != "__metadata__"]


def test_row_ranges_in_any_order_from_several_threads(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "large": torch.randn(SMALL_BYTES // 64 + 7, 32),  # above SMALL_BYTES: written into its range
        "small": torch.randn(9, 5).half(),  # gathered in memory, written at close
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "ints": torch.arange(300, dtype=torch.int64),
    }
    path = tmp_path / "shard.safetensors"
    writer = ShardWriter(path, {k: nbytes(t) for k, t in tensors.items()})
    parts = [(key, t[i:i + 4], i, len(t)) for key in ("large", "small") for i, t in [(i, tensors[key])
                                                                                    for i in range(0, len(tensors[key]), 4)]]
    parts = parts[::-1] + [("scalar", tensors["scalar"], 0, None), ("empty", tensors["empty"], 0, None),
                           ("ints", tensors["ints"], 0, None)]
    with ThreadPoolExecutor(4) as pool:
        complete = list(pool.map(lambda part: writer.write(*part), parts))
    assert sum(complete) == 1 and writer.done
    writer.close()
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], t) and back[k].dtype == t.dtype for k, t in tensors.items())
    assert header_keys(path) == list(tensors)  # planned order, whatever the order of arrival


def test_small_tensor_sizes_may_be_estimates(tmp_path):
    """A small tensor's planned size is only an estimate (as for an NF4 quant-state JSON): the file is still exact."""
    state = torch.frombuffer(bytearray(b'{"quant_type": "nf4", "blocksize": 64}'), dtype=torch.uint8)
    weight = torch.randn(SMALL_BYTES // 4 + 1)
    path = tmp_path / "shard.safetensors"
    writer = ShardWriter(path, {"w": nbytes(weight), "w.quant_state": 100})
    writer.write("w.quant_state", state)
    writer.write("w", weight)
    writer.close()
    back = load_file(str(path))
    assert torch.equal(back["w.quant_state"], state) and torch.equal(back["w"], weight)
    assert writer.nbytes == nbytes(weight) + state.numel()


def test_unplanned_repeated_and_missing_tensors_are_refused(tmp_path):
    weight = torch.randn(SMALL_BYTES // 4 + 8)
    writer = ShardWriter(tmp_path / "shard.safetensors", {"w": nbytes(weight), "b": 8})
    with pytest.raises(KeyError, match="not planned"):
        writer.write("other", weight)
    with pytest.raises(RuntimeError, match="exceed"):
        writer.write("w", torch.cat([weight, weight]))
    writer.write("w", weight)
    with pytest.raises(RuntimeError, match="more than once"):
        writer.write("w", weight[:4], 0, len(weight))
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()
    writer.write("b", torch.zeros(2))
    with pytest.raises(RuntimeError, match="more than once"):
        writer.write("b", torch.zeros(2))
    writer.close()
    assert load_file(str(tmp_path / "shard.safetensors"))["b"].shape == (2,)


def test_without_positioned_io_writes_seek_under_a_lock(tmp_path, monkeypatch):
    """Where os has no pread/pwrite (Windows), the writer seeks and writes under a lock, from several threads."""
    import os

    monkeypatch.delattr(os, "pwrite")
    monkeypatch.delattr(os, "pread", raising=False)
    tensors = {f"t{i}": torch.randn(SMALL_BYTES // 32 + i, 16) for i in range(4)}
    path = tmp_path / "shard.safetensors"
    writer = ShardWriter(path, {k: nbytes(t) for k, t in tensors.items()})
    parts = [(key, t[i:i + 3], i, len(t)) for key, t in tensors.items() for i in range(0, len(t), 3)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda part: writer.write(*part), parts))
    writer.close()
    back = load_file(str(path))
    assert all(torch.equal(back[k], t) for k, t in tensors.items())
