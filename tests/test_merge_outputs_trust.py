"""What the merge engine writes when the base folder is hostile (issue 13, the engine's part): output file names are
made by adaptools, every output file is created new inside the temporary folder (never truncating or writing
through what exists), side-file links are not followed out of the base, and a targeted weight in a dtype the merge
cannot handle is one typed error naming it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from factories import make_base, make_peft_adapter
from safetensors.torch import load_file, save_file

import adaptools
from adaptools.errors import BaseMismatchError
from adaptools.checkpoints.shards import INDEX_NAME
from adaptools.checkpoints.shards import SHARD_NAME, ShardWriter, copy_side_files, write_new


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (links as their target's bytes), by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(shard)
    return tensors


def split_base(base: Path, names: dict[str, str], target: Path) -> Path:
    """A copy of `base` whose tensors are stored in the files `names` gives per key (default: one shard), with an
    index naming them exactly so: a crafted index with shard names chosen by its author."""
    tensors = all_tensors(base)
    target.mkdir(parents=True)
    for name in ("config.json", "generation_config.json"):
        if (base / name).exists():
            (target / name).write_bytes((base / name).read_bytes())
    default = "model-00001-of-00002.safetensors"
    weight_map = {key: names.get(key, default) for key in tensors}
    for file in set(weight_map.values()):
        path = Path(file) if Path(file).is_absolute() else target / file
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v for k, v in tensors.items() if weight_map[k] == file}, str(path), metadata={"format": "pt"})
    (target / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return target


@pytest.fixture(scope="module")
def plain_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("plain") / "base", "llama", dtype=torch.float16)


@pytest.fixture(scope="module")
def plain_adapter(plain_base, tmp_path_factory) -> Path:
    return make_peft_adapter(plain_base, tmp_path_factory.mktemp("adapter") / "lora", r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_shard_names_of_a_crafted_index_never_name_an_output_file(where, plain_base, plain_adapter, tmp_path, runner):
    """An index entry "lm_head.weight": "../victim/model-00005-of-00005.safetensors" (or an absolute path) makes the
    reader either refuse the base or read that file; either way nothing outside the output is written, and the
    output's files carry adaptools' own names."""
    victim = tmp_path / "victim" / "model-00005-of-00005.safetensors"
    name = "../victim/model-00005-of-00005.safetensors" if where == "relative" else str(victim)
    base = split_base(plain_base, {"lm_head.weight": name}, tmp_path / "base")
    before = tree_digest(tmp_path)
    result = run_cli(runner, "merge", base, plain_adapter, "-o", tmp_path / "out")
    assert result.exit_code in (0, 2), result.output
    after = tree_digest(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == before
    if result.exit_code == 2:
        assert result.stderr.count("error:") == 1 and not (tmp_path / "out").exists()
        return
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    files = set(index["weight_map"].values())
    assert files == {SHARD_NAME.format(i + 1, len(files)) for i in range(len(files))}
    assert {p.name for p in (tmp_path / "out").glob("*.safetensors")} == files
    assert all_tensors(tmp_path / "out").keys() == all_tensors(plain_base).keys()


def test_output_names_are_transformers_names_whatever_the_base_calls_its_shards(plain_base, plain_adapter, tmp_path):
    names = {k: "weights-b.safetensors" for k in all_tensors(plain_base) if ".layers.1." in k}
    base = split_base(plain_base, names, tmp_path / "base")
    adaptools.merge(base, plain_adapter, out=tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == [
        SHARD_NAME.format(1, 2), SHARD_NAME.format(2, 2)]
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    # the base's files in name order become shards 1 and 2: the layers.1 tensors stay together
    assert {index["weight_map"][k] for k in names} == {SHARD_NAME.format(2, 2)}


def test_a_single_file_output_is_model_safetensors(plain_base, plain_adapter, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    save_file(all_tensors(plain_base), str(base / "my-weights.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_bytes((plain_base / "config.json").read_bytes())
    adaptools.merge(base, plain_adapter, out=tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def test_output_files_are_created_new_never_truncating_or_following_links(tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"kept")
    link = tmp_path / "link.safetensors"
    link.symlink_to(victim)
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "nowhere.json")
    for path in (existing, link):
        with pytest.raises(FileExistsError):
            ShardWriter(path, {"w": 8})
    for path in (existing, link, dangling):
        with pytest.raises(FileExistsError):
            write_new(path, "{}")
    assert victim.read_bytes() == b"precious" and existing.read_bytes() == b"kept"
    assert not (tmp_path / "nowhere.json").exists()


def test_side_files_linking_outside_the_base_are_not_copied(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer_config.json").write_text("{}")
    (base / "sub").mkdir()
    (base / "sub" / "vocab.txt").write_text("a b")
    (base / "vocab.txt").symlink_to("sub/vocab.txt")  # inside the base: copied
    (base / "notes.txt").symlink_to(secret)  # outside: left out
    (base / "README.md").symlink_to("../secret.txt")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.warns(UserWarning, match="outside the base"):
        copied = copy_side_files(base, out)
    assert copied == ["tokenizer_config.json", "vocab.txt"]
    assert (out / "vocab.txt").read_text() == "a b" and not (out / "vocab.txt").is_symlink()
    assert not (out / "notes.txt").exists() and not (out / "README.md").exists()
    with pytest.raises(FileExistsError):  # a second copy into the same folder never overwrites
        copy_side_files(base / "sub", out)


def test_a_hugging_face_cache_snapshot_merges_with_its_links(plain_base, plain_adapter, tmp_path, monkeypatch):
    """A cache snapshot's files are links to ../../blobs/<sha256>: shards and side files are read through them."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (plain_base / "tokenizer.json").write_text('{"version": "1.0"}')
    try:
        for path in sorted(plain_base.iterdir()):
            data = path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            (repo / "blobs" / sha).write_bytes(data)
            (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / sha)
    finally:
        (plain_base / "tokenizer.json").unlink()
    adaptools.merge(snapshot, plain_adapter, out=tmp_path / "from-cache")
    adaptools.merge(plain_base, plain_adapter, out=tmp_path / "from-folder")
    assert (tmp_path / "from-cache" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    cached, plain = all_tensors(tmp_path / "from-cache"), all_tensors(tmp_path / "from-folder")
    assert cached.keys() == plain.keys() and all(torch.equal(cached[k], plain[k]) for k in plain)


def with_dtype(base: Path, key: str, dtype: torch.dtype, target: Path) -> Path:
    """A copy of `base` (one shard) with tensor `key` stored in `dtype`."""
    tensors = all_tensors(base)
    tensors[key] = tensors[key].float().clamp(-1, 1).to(dtype)
    target.mkdir(parents=True)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    (target / "config.json").write_bytes((base / "config.json").read_bytes())
    return target


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int16, torch.uint8],
                         ids=["F8_E4M3", "F8_E5M2", "I16", "U8"])
def test_a_targeted_weight_in_an_unmergeable_dtype_is_one_error_naming_it(dtype, plain_base, plain_adapter, tmp_path,
                                                                          runner):
    key = "model.layers.1.self_attn.q_proj.weight"
    base = with_dtype(plain_base, key, dtype, tmp_path / "base")
    with pytest.raises(BaseMismatchError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight"):
        adaptools.merge(base, plain_adapter, out=tmp_path / "out")
    result = run_cli(runner, "merge", base, plain_adapter, "-o", tmp_path / "out", "--dtype", "nf4")
    assert result.exit_code == 2 and result.stderr.count("error:") == 1
    assert "model.layers.1.self_attn.q_proj.weight" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["F8_E4M3", "F8_E5M2"])
def test_float8_weights_are_copied_when_untouched_and_refused_by_quantize(dtype, plain_base, plain_adapter, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight"  # not targeted by the adapter
    base = with_dtype(plain_base, key, dtype, tmp_path / "base")
    adaptools.merge(base, plain_adapter, out=tmp_path / "kept")
    assert torch.equal(load_file(tmp_path / "kept" / "model.safetensors")[key].view(torch.uint8),
                       load_file(base / "model.safetensors")[key].view(torch.uint8))
    with pytest.raises(BaseMismatchError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        adaptools.quantize(base, tmp_path / "nf4")
    adaptools.quantize(base, tmp_path / "nf4", skip=["up_proj"])
    assert load_file(tmp_path / "nf4" / "model.safetensors")[key].dtype == dtype


def test_an_untouched_float8_tensor_is_cast_with_the_others(plain_base, plain_adapter, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight"
    base = with_dtype(plain_base, key, torch.float8_e4m3fn, tmp_path / "base")
    adaptools.merge(base, plain_adapter, out=tmp_path / "bf16", dtype="bf16")
    cast = load_file(tmp_path / "bf16" / "model.safetensors")[key]
    assert cast.dtype == torch.bfloat16
    assert torch.equal(cast, load_file(base / "model.safetensors")[key].to(torch.bfloat16))
