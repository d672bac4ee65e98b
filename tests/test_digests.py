"""The sha256 of the base's files comes from the merge's own read: equal to hashlib's, and the recipe does not read
the base again."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from factories import make_base, make_peft_adapter

import adaptools
from adaptools import digests, recipe
from adaptools.errors import RecipeError
from adaptools.checkpoints.shards import INDEX_NAME


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("threads", (1, 4))
def test_threads_asking_at_once_hash_the_file_once_in_order(tmp_path, monkeypatch, threads):
    monkeypatch.setattr(digests, "WINDOW_BYTES", 1 << 16)  # several mapped windows
    path = tmp_path / "data.bin"
    path.write_bytes(random.Random(0).randbytes(3 * 2**20 + 123))
    hasher = digests.SequentialHasher(path)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: hasher.hash_rest(), range(8)))
    assert hasher.finish() == sha256(path)
    assert digests.lookup(path) == sha256(path)
    os.utime(path, ns=(0, 12345))  # changed since: refused, not hashed again
    with pytest.raises(RecipeError, match="changed while the command ran"):
        digests.lookup(path)
    digests.forget()  # a new command: nothing hashed yet
    assert digests.lookup(path) is None


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("digests")
    base = make_base(root / "base", "llama", dtype=torch.float16, max_shard_size="20KB")
    (base / "tokenizer.json").write_text('{"model": "tiny"}')
    adapter = make_peft_adapter(base, root / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    return base, adapter


@pytest.mark.parametrize("dtype", [None, "nf4"])
def test_the_merge_hashes_every_shard_and_side_file_as_hashlib_does(sharded, tmp_path, dtype):
    base, adapter = sharded
    adaptools.merge(base, adapter, out=tmp_path / "out", dtype=dtype, hash_inputs=True)
    shards = sorted(set(json.loads((base / INDEX_NAME).read_text())["weight_map"].values()))
    assert len(shards) > 2
    for name in [*shards, "tokenizer.json", "generation_config.json"]:
        assert digests.lookup(base / name) == sha256(base / name), name


def test_an_nf4_base_is_hashed_by_its_merge(sharded, tmp_path):
    base, adapter = sharded
    adaptools.quantize(base, tmp_path / "nf4", max_shard_size="30KB", hash_inputs=True)
    for name in [p.name for p in base.glob("*.safetensors")]:
        assert digests.lookup(base / name) == sha256(base / name)
    adaptools.merge(tmp_path / "nf4", adapter, out=tmp_path / "out", hash_inputs=True)
    for path in (tmp_path / "nf4").glob("*.safetensors"):
        assert digests.lookup(path) == sha256(path)


@pytest.mark.parametrize("command", ["merge", "quantize"])
def test_the_recipe_of_a_cli_run_does_not_read_the_base_shards_again(command, sharded, tmp_path, runner, monkeypatch):
    base, adapter = sharded
    digests._digests.clear()
    opened = []
    real_open = open
    monkeypatch.setattr(recipe, "open", lambda p, *a, **k: opened.append(Path(p).name) or real_open(p, *a, **k),
                        raising=False)
    args = ["merge", base, adapter] if command == "merge" else ["quantize", base]
    result = run_cli(runner, *args, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    shards = {p.name for p in base.glob("*.safetensors")}
    assert shards and not shards & set(opened)
    assert "tokenizer.json" not in opened  # hashed while copied
    inputs = json.loads((tmp_path / "out" / "adaptools_recipe.json").read_text())["inputs"]
    files = next(entry for entry in inputs if entry["param"] == "base")["files"]
    assert files == {p.name: sha256(p) for p in sorted(base.iterdir())}


def test_a_file_changed_after_the_merge_read_it_is_refused_not_hashed_again(tmp_path):
    """Found in review: the recipe hashed the changed file again and named bytes the merge never read."""
    path = tmp_path / "shard.bin"
    path.write_bytes(b"abc" * 1000)
    digests.record(digests.file_key(path), hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests.lookup(path) == hashlib.sha256(b"abc" * 1000).hexdigest()
    path.write_bytes(b"abd" * 1001)
    with pytest.raises(RecipeError, match="changed while the command ran"):
        digests.lookup(path)


@pytest.fixture
def persisting(monkeypatch, tmp_path):
    """A fresh persistent cache that takes files changed just now (no racy-window wait in tests)."""
    monkeypatch.setenv("ADAPTOOLS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(digests, "RACY_NS", 0)
    monkeypatch.setattr(digests, "PERSIST_MIN_BYTES", 0)
    digests.forget()
    return tmp_path / "cache" / "sha256"


def test_a_second_cli_merge_into_an_unchanged_base_takes_its_sha256_from_the_cache(sharded, tmp_path, runner,
                                                                                   monkeypatch, persisting):
    base, adapter = sharded
    hashed = []
    real = digests.SequentialHasher
    monkeypatch.setattr(importlib.import_module("adaptools.merge.execute"), "SequentialHasher",
                        lambda path, size=None: hashed.append(Path(path).name) or real(path, size))
    assert run_cli(runner, "merge", base, adapter, "-o", tmp_path / "first").exit_code == 0
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert sorted(hashed) == shards  # the first merge hashes them from its reads ...
    assert len(list(persisting.iterdir())) >= len(shards)
    hashed.clear()
    result = run_cli(runner, "merge", base, adapter, "-o", tmp_path / "second")
    assert result.exit_code == 0, result.output
    assert hashed == []  # every shard's digest came from the cache
    first, second = (json.loads((tmp_path / name / "adaptools_recipe.json").read_text())["inputs"]
                     for name in ("first", "second"))
    assert first == second
    files = next(entry for entry in second if entry["param"] == "base")["files"]
    assert files == {p.name: sha256(p) for p in sorted(base.iterdir())}


def test_a_cached_digest_is_not_trusted_once_the_file_changed(persisting, tmp_path):
    path = tmp_path / "shard.bin"
    path.write_bytes(b"abc" * 1000)
    assert recipe.sha256_file(path) == sha256(path)
    assert digests.lookup(path) == sha256(path)  # persisted by the read
    digests.forget()
    time.sleep(0.02)  # past the file system's clock tick
    path.write_bytes(b"abd" * 1000)  # same size, same inode
    assert digests.lookup(path) is None
    assert recipe.sha256_file(path) == sha256(path) == hashlib.sha256(b"abd" * 1000).hexdigest()


def test_a_file_changed_after_its_cached_digest_was_taken_is_refused(persisting, tmp_path):
    path = tmp_path / "shard.bin"
    path.write_bytes(b"abc" * 1000)
    recipe.sha256_file(path)
    digests.forget()  # a new command takes the digest from the cache ...
    assert digests.lookup(path) == sha256(path)
    time.sleep(0.02)
    path.write_bytes(b"abd" * 1000)  # ... and the file changes before its recipe is written
    with pytest.raises(RecipeError, match="changed while the command ran"):
        digests.lookup(path)


def test_a_file_changed_just_before_it_was_hashed_is_not_persisted(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTOOLS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(digests, "PERSIST_MIN_BYTES", 0)
    path = tmp_path / "fresh.bin"
    path.write_bytes(b"x" * 100)
    recipe.sha256_file(path)  # RACY_NS (3 s) not passed since the write: a change in this clock tick could hide
    assert not (tmp_path / "cache").exists()
    monkeypatch.setattr(digests, "RACY_NS", 0)
    recipe.sha256_file(path)
    assert digests.lookup(path) == sha256(path)  # the control: persisted once old enough


def test_small_files_are_not_persisted(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTOOLS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(digests, "RACY_NS", 0)
    monkeypatch.setattr(digests, "PERSIST_MIN_BYTES", 101)
    small, large = tmp_path / "small.bin", tmp_path / "large.bin"
    small.write_bytes(b"x" * 100)
    large.write_bytes(b"x" * 101)
    recipe.sha256_file(small)
    recipe.sha256_file(large)
    entries = [p.name for p in (tmp_path / "cache" / "sha256").iterdir()]
    assert entries == [f"{large.stat().st_dev}-{large.stat().st_ino}.json"]


@pytest.mark.parametrize("entry", [b"not json", b"[" * 5000, b'{"size": 3000}', b"{}" + b" " * 5000,
                                   b'{"size": 3000, "mtime_ns": 0, "ctime_ns": 0, "sha256": "ab"}'])
def test_foreign_or_broken_cache_entries_are_ignored(persisting, tmp_path, entry):
    path = tmp_path / "shard.bin"
    path.write_bytes(b"abc" * 1000)
    stat = path.stat()
    persisting.mkdir(parents=True)
    forged = entry.replace(b'"mtime_ns": 0', f'"mtime_ns": {stat.st_mtime_ns}'.encode()) \
        .replace(b'"ctime_ns": 0', f'"ctime_ns": {stat.st_ctime_ns}'.encode())
    (persisting / f"{stat.st_dev}-{stat.st_ino}.json").write_bytes(forged)
    assert digests.lookup(path) is None
    assert recipe.sha256_file(path) == sha256(path)


@pytest.mark.parametrize("kind", ["fifo", "link", "folder"])
def test_a_cache_entry_that_is_not_a_regular_file_is_ignored_without_waiting(persisting, tmp_path, kind):
    path = tmp_path / "shard.bin"
    path.write_bytes(b"abc" * 1000)
    stat = path.stat()
    persisting.mkdir(parents=True)
    entry = persisting / f"{stat.st_dev}-{stat.st_ino}.json"
    real = tmp_path / "elsewhere.json"
    real.write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
                                "sha256": "0" * 64}))
    {"fifo": lambda: os.mkfifo(entry), "link": lambda: entry.symlink_to(real), "folder": entry.mkdir}[kind]()
    assert digests.lookup(path) is None  # a FIFO would block a plain open() forever
    assert recipe.sha256_file(path) == sha256(path)


def test_an_empty_cache_dir_setting_turns_the_persistent_cache_off(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTOOLS_CACHE_DIR", "")
    monkeypatch.setattr(digests, "RACY_NS", 0)
    monkeypatch.setattr(digests, "PERSIST_MIN_BYTES", 0)
    path = tmp_path / "shard.bin"
    path.write_bytes(b"abc" * 1000)
    assert digests.cache_folder() is None
    recipe.sha256_file(path)
    digests.forget()
    assert digests.lookup(path) is None


def test_a_file_cut_short_while_it_is_hashed_is_an_error_not_a_crash(tmp_path):
    """Hashing maps the file: a file truncated after it was opened is refused before a page past its end is read
    (which would kill the process with SIGBUS)."""
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(3 * 2**20))
    hasher = digests.SequentialHasher(path)
    os.truncate(path, 2**20)
    with pytest.raises(RecipeError, match="changed while the command ran"):
        hasher.hash_rest()
    hasher.close()
