"""The sha256 of the base's files comes from the merge's own read: equal to hashlib's, and the recipe does not read
the base again."""
from __future__ import annotations

import hashlib
import json
import os
import random
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
def test_ranges_done_in_any_order_on_any_thread_hash_the_file_in_order(tmp_path, monkeypatch, threads):
    monkeypatch.setattr(digests, "WINDOW_BYTES", 1 << 16)  # several mapped windows per range
    path = tmp_path / "data.bin"
    path.write_bytes(random.Random(0).randbytes(3 * 2**20 + 123))
    cuts = sorted(random.Random(1).sample(range(1, path.stat().st_size - 5), 40))
    ranges = list(zip([100, *cuts], cuts + [path.stat().st_size - 5]))  # header and tail left to `finish`
    random.Random(2).shuffle(ranges)
    hasher = digests.SequentialHasher(path)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda r: hasher.done(*r), ranges))
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
