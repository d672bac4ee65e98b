"""Positioned writes and the direct-I/O BlockWriter: pieces written in any order, from several threads, by tile
or copied from another file, give the exact bytes; blocks that wait too long are spilled to buffered writes; a
file system that refuses direct I/O gets buffered writes; a failed direct write is raised, never lost."""
from __future__ import annotations

import errno
import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from adaptools.checkpoints import file_writes
from adaptools.checkpoints.file_writes import ALIGN, BlockWriter, create_new, open_direct
from adaptools.checkpoints.shards import ShardWriter


def region_writer(path, start: int, end: int) -> BlockWriter:
    fd = create_new(path)
    os.ftruncate(fd, end)
    direct = open_direct(path, fd)
    assert direct is not None
    writer = BlockWriter(fd, direct, start, end)
    writer.fd = fd
    return writer


def pieces(start: int, end: int, seed: int) -> list[tuple[int, int]]:
    """[start, end) cut at random into pieces of 1 byte to 2.5 blocks, shuffled."""
    rng = random.Random(seed)
    cuts, at = [], start
    while at < end:
        size = min(end - at, rng.choice([1, 7, ALIGN - 3, ALIGN, 2 * ALIGN + 5, 5 * ALIGN]))
        cuts.append((at, at + size))
        at += size
    rng.shuffle(cuts)
    return cuts


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_blocks", [1, 3, 64])
def test_pieces_in_any_order_from_threads_give_the_exact_bytes(tmp_path, direct_io, monkeypatch, seed, max_blocks):
    monkeypatch.setattr(file_writes, "MAX_BLOCKS", max_blocks)
    start, end = 100, 100 + 11 * ALIGN + 123  # neither end aligned
    expected = random.Random(seed).randbytes(end)
    source = tmp_path / "source"
    source.write_bytes(b"x" * 17 + expected)  # copies read it 17 bytes further on
    writer = region_writer(tmp_path / "out", start, end)
    with open(source, "rb") as src, ThreadPoolExecutor(4) as pool:
        def put(piece: tuple[int, int]) -> None:
            lo, hi = piece
            if lo % 2:
                writer.copy(src.fileno(), lo + 17, lo, hi - lo)
            else:
                writer.write(memoryview(expected)[lo:hi], lo)
        list(pool.map(put, pieces(start, end, seed)))
    writer.close()
    os.close(writer.fd)
    assert (tmp_path / "out").read_bytes()[start:] == expected[start:]
    assert direct_io and all(offset % ALIGN == 0 and size % ALIGN == 0 for offset, size in direct_io)
    if max_blocks == 64:  # nothing spilled: every aligned byte went direct
        assert sum(size for _, size in direct_io) == (end // ALIGN - -(-start // ALIGN)) * ALIGN


def test_pieces_outside_the_region_are_refused(tmp_path, direct_io):
    writer = region_writer(tmp_path / "out", ALIGN, 3 * ALIGN)
    with pytest.raises(ValueError, match="outside the region"):
        writer.write(b"abc", 3 * ALIGN - 2)
    writer.abort()
    os.close(writer.fd)


def failing_direct_writes(monkeypatch, code: int) -> None:
    """os.pwrite raising OSError(code) for descriptors opened with O_DIRECT."""
    import fcntl

    pwrite = os.pwrite

    def refusing(fd: int, data, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(code, os.strerror(code))
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing)


def test_refused_direct_writes_fall_back_to_buffered_ones(tmp_path, direct_io, monkeypatch):
    failing_direct_writes(monkeypatch, errno.EINVAL)
    end = 9 * ALIGN + 1
    expected = random.Random(5).randbytes(end)
    writer = region_writer(tmp_path / "out", 0, end)
    for lo, hi in sorted(pieces(0, end, 5)):
        writer.write(memoryview(expected)[lo:hi], lo)
    writer.close()
    os.close(writer.fd)
    assert (tmp_path / "out").read_bytes() == expected


def test_a_failed_direct_write_is_raised(tmp_path, direct_io, monkeypatch):
    failing_direct_writes(monkeypatch, errno.ENOSPC)
    idle = region_writer(tmp_path / "idle", 0, ALIGN)  # keeps the pool open to count its buffers
    writer = region_writer(tmp_path / "out", 0, 8 * ALIGN)
    with pytest.raises(OSError) as raised:
        for lo in range(0, 8 * ALIGN, ALIGN):
            writer.write(bytes(ALIGN), lo)
        writer.close()
    assert raised.value.errno == errno.ENOSPC
    writer.abort()
    os.close(writer.fd)
    assert len(file_writes._POOL.free) == file_writes._POOL.allocated  # the failure leaked no buffer
    idle.abort()
    os.close(idle.fd)


def test_shard_writer_with_direct_io_aligns_its_data_and_loads(tmp_path, direct_io):
    torch.manual_seed(0)
    tensors = {f"w{i}": torch.randn(3 * i + 5000, 7).half() for i in range(5)}  # above SMALL_BYTES
    writer = ShardWriter(tmp_path / "shard.safetensors", {k: t.numel() * 2 for k, t in tensors.items()}, direct=True)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda part: writer.write(part[0], part[1][part[2]:part[2] + 640], part[2], len(part[1])),
                      [(k, t, i) for k, t in tensors.items() for i in range(0, len(t), 640)][::-1]))
    writer.close()
    back = load_file(str(tmp_path / "shard.safetensors"))
    assert all(torch.equal(back[k], t) for k, t in tensors.items())
    with open(tmp_path / "shard.safetensors", "rb") as f:
        assert (8 + int.from_bytes(f.read(8), "little")) % ALIGN == 0
    assert direct_io


def test_without_direct_io_shards_are_written_buffered(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    tensors = {"w": torch.randn(5000, 3)}
    writer = ShardWriter(tmp_path / "shard.safetensors", {"w": 60000}, direct=True)
    writer.write("w", tensors["w"])
    writer.close()
    assert torch.equal(load_file(str(tmp_path / "shard.safetensors"))["w"], tensors["w"])


def test_writers_of_several_files_share_a_bounded_pool_of_buffers(tmp_path, direct_io, monkeypatch):
    """Five files filled at once, their pieces interleaved, from three threads: the buffers the writers hold stay
    near MAX_BLOCKS (blocks of other files are spilled), every file is exact, and the last writer to close
    releases the pool."""
    monkeypatch.setattr(file_writes, "MAX_BLOCKS", 2)
    end = 6 * ALIGN + 50
    contents = [random.Random(i).randbytes(end) for i in range(5)]
    writers = [region_writer(tmp_path / f"out{i}", 0, end) for i in range(5)]
    peak = []

    def put(part: tuple[int, tuple[int, int]]) -> None:
        i, (lo, hi) = part
        writers[i].write(memoryview(contents[i])[lo:hi], lo)
        peak.append(file_writes._POOL.allocated)

    parts = [(i, piece) for piece_list in zip(*(pieces(0, end, 10 + i) for i in range(5)))
             for i, piece in enumerate(piece_list)]
    parts += [(i, piece) for i in range(5) for piece in pieces(0, end, 10 + i)[len(parts) // 5:]]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(put, parts))
    idle = region_writer(tmp_path / "idle", 0, ALIGN)  # keeps the pool open while the others close
    for writer in writers:
        writer.close()
        os.close(writer.fd)
    assert all((tmp_path / f"out{i}").read_bytes() == contents[i] for i in range(5))
    assert max(peak) <= 2 + 3  # MAX_BLOCKS, and one more per thread only while every buffer is being filled
    assert len(file_writes._POOL.free) == file_writes._POOL.allocated  # every buffer came back: none leaked
    idle.abort()
    os.close(idle.fd)
    assert not file_writes._POOL.free and not file_writes._POOL.writers  # the last writer released them


@pytest.mark.parametrize("dtype", ["nf4", "fp8", "bf16"])
def test_quantizing_and_casting_merges_write_the_same_tensors_through_direct_io(llama_base, tmp_path, request,
                                                                                dtype):
    """The encoders that write whole quantized tensors (NF4 with its quant state, FP8 with its scales) and a cast:
    a merge written through the direct-I/O writer holds exactly the tensors of the buffered one."""
    import adaptools
    from factories import folder_tensors, make_peft_adapter

    adapter = make_peft_adapter(llama_base, tmp_path / "adapter", r=4, target_modules="all-linear")
    adaptools.merge(llama_base, adapter, out=tmp_path / "buffered", dtype=dtype)
    writes = request.getfixturevalue("direct_io")
    adaptools.merge(llama_base, adapter, out=tmp_path / "direct", dtype=dtype)
    assert writes
    buffered, direct = folder_tensors(tmp_path / "buffered"), folder_tensors(tmp_path / "direct")
    assert buffered.keys() == direct.keys()
    assert all(torch.equal(buffered[k].view(torch.uint8), direct[k].view(torch.uint8)) for k in buffered)
