"""Shared pytest fixtures; the factories themselves live in tests/factories.py."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def digest_cache(tmp_path_factory) -> Iterator[Path]:
    """The persistent sha256 cache (adaptools.digests) of this test session: its own folder, not the user's."""
    folder = tmp_path_factory.mktemp("adaptools-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADAPTOOLS_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture
def direct_io(monkeypatch, tmp_path) -> list[tuple[int, int]]:
    """Direct I/O for every safetensors output however small (and tensors of more than 256 bytes written through
    it), in blocks of two pages with three buffers (so that pieces straddle blocks and blocks spill); the list of (offset, bytes) of every write made with O_DIRECT.
    Skips where the file system of the test's folder has no direct I/O."""
    from adaptools.checkpoints import file_writes, shards

    probe = tmp_path / "direct-probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT)
    direct = file_writes.open_direct(probe, fd)
    os.close(fd)
    if direct is None:
        pytest.skip("no direct I/O on this file system")
    os.close(direct)
    probe.unlink()
    import fcntl

    monkeypatch.setattr(shards, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(shards, "SMALL_BYTES", 256)
    monkeypatch.setattr(file_writes, "BLOCK_BYTES", 2 * file_writes.ALIGN)
    monkeypatch.setattr(file_writes, "MAX_BLOCKS", 3)
    writes: list[tuple[int, int]] = []
    pwrite = os.pwrite

    def recording(fd: int, data, offset: int) -> int:
        written = pwrite(fd, data, offset)
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            writes.append((offset, written))
        return written

    monkeypatch.setattr(os, "pwrite", recording)
    return writes


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """../shared/fixtures beside the checkout (skips when a checkout has none)."""
    if not SHARED_FIXTURES.exists():
        pytest.skip("../shared/fixtures is not beside this checkout")
    return SHARED_FIXTURES


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    """A tiny random Llama (GQA) saved with save_pretrained, fp32."""
    from factories import make_base

    return make_base(tmp_path_factory.mktemp("llama") / "base", "llama")


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory) -> Path:
    """A tiny random GPT-2 (Conv1D, fan_in_fan_out) saved with save_pretrained, fp32."""
    from factories import make_base

    return make_base(tmp_path_factory.mktemp("gpt2") / "base", "gpt2")


@pytest.fixture(scope="session")
def vit_base(tmp_path_factory) -> Path:
    """A tiny random ViT image classifier (Conv2d patch embedding) saved with save_pretrained, fp32."""
    from factories import make_vit_base

    return make_vit_base(tmp_path_factory.mktemp("vit") / "base")


@pytest.fixture(scope="session")
def peft_pair(llama_base, tmp_path_factory):
    """Two PEFT adapters on the tiny Llama: rank 4 (α 8) on q/v and rank 2 (α 2) on v/o (v in both)."""
    from factories import make_peft_adapter

    folder = tmp_path_factory.mktemp("pair")
    a = make_peft_adapter(llama_base, folder / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = make_peft_adapter(llama_base, folder / "b", seed=2, r=2, lora_alpha=2, target_modules=["v_proj", "o_proj"])
    return a, b


@pytest.fixture(scope="module")
def single_thread():
    """torch on one thread for a module of tiny-model tests (intra-op threads only slow tiny forwards, badly on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def runner():
    """click's CliRunner (stderr kept apart from stdout)."""
    from click.testing import CliRunner

    return CliRunner()


def run_cli(runner, *args: str):
    """Invoke the adaptools CLI in-process; returns click's Result."""
    from adaptools_cli.main import cli

    return runner.invoke(cli, [str(a) for a in args])
