"""Issue 13, parsing half: crafted base headers, indexes, configs, DoRA magnitudes and overflowing numbers.

Every case goes through the CLI in-process: exit status 2, one `error:` line naming the problem, no traceback,
nothing written (the folder holding inputs and output is unchanged), and through the API as a typed error.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from factories import make_base, make_peft_adapter
from safetensors.torch import load_file, save_file
from test_errors_cli import assert_one_line_error

import adaptools
from adaptools import AdapterFormatError, BaseCheckpoint, BaseMismatchError, DoraError, NonFiniteError
from adaptools.checkpoints.safetensors_io import MAX_HEADER_BYTES, read_header
from adaptools.checkpoints.shards import INDEX_NAME

pytestmark = pytest.mark.usefixtures("single_thread")

UNTOUCHED = "model.norm.weight"  # a tensor no adapter here targets: copied as stored by a merge
SAME_SIZE = "model.layers.0.input_layernorm.weight"  # as many bytes as UNTOUCHED
Q = "model.layers.0.self_attn.q_proj"


def split_file(path: Path) -> tuple[dict, bytes]:
    """(header, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_file(path: Path, header: dict | bytes, data: bytes, length: int | None = None) -> None:
    """Write a safetensors file from a header (dict, or raw bytes as given) and data, with `length` when given."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def tree_digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256 (or "dir")} of everything under `folder`."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def assert_refused(runner, args, fragment: str, root: Path) -> None:
    """The command fails with one error line holding `fragment` and leaves every file under `root` as it was."""
    before = tree_digest(root)
    assert_one_line_error(run_cli(runner, *args), fragment)
    assert tree_digest(root) == before


@pytest.fixture(scope="module")
def adapter(llama_base, tmp_path_factory) -> Path:
    return make_peft_adapter(llama_base, tmp_path_factory.mktemp("adapter") / "peft", r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def dora_adapter(llama_base, tmp_path_factory) -> Path:
    return make_peft_adapter(llama_base, tmp_path_factory.mktemp("dora") / "peft", r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"], use_dora=True)


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("sharded") / "base", max_shard_size="40KB")


# --------------------------------------------------------------------------- safetensors headers of a base


def edit_entry(key: str, **changes):
    def mutate(header: dict, data: bytes):
        header[key].update(changes)
        return header, data
    return mutate


def remove_field(key: str, field: str):
    def mutate(header: dict, data: bytes):
        del header[key][field]
        return header, data
    return mutate


def raw_header(text: bytes):
    return lambda header, data: (text, data)


def overlap(header: dict, data: bytes):
    header[UNTOUCHED]["data_offsets"] = header[SAME_SIZE]["data_offsets"]
    return header, data


def renamed(new: str):
    def mutate(header: dict, data: bytes):
        header[new] = header.pop(UNTOUCHED)
        return header, json.dumps(header).encode().replace(json.dumps(new).encode(), b'"bad\\ud800"'), data
    return mutate


# name: (mutation (header, data) -> (header, data) or (raw header bytes, data), message fragment)
HEADERS = {
    "shape_floats": (edit_entry(UNTOUCHED, shape=[32.0]), "has shape [32.0]"),
    "offsets_floats": (lambda h, d: edit_entry(UNTOUCHED, data_offsets=[float(x) for x in h[UNTOUCHED]["data_offsets"]])(h, d),
                       "has data_offsets"),
    "shape_negative": (edit_entry(UNTOUCHED, shape=[-32]), "has shape [-32]"),
    "shape_bool": (edit_entry(UNTOUCHED, shape=[True]), "has shape [True]"),
    "shape_not_a_list": (edit_entry(UNTOUCHED, shape=32), "has shape 32"),
    "offsets_three": (lambda h, d: edit_entry(UNTOUCHED, data_offsets=[*h[UNTOUCHED]["data_offsets"], 0])(h, d),
                      "must be two integers"),
    "offsets_reversed": (lambda h, d: edit_entry(UNTOUCHED, data_offsets=h[UNTOUCHED]["data_offsets"][::-1])(h, d),
                         "begin <= end"),
    "size_not_shape": (edit_entry(UNTOUCHED, shape=[16]), "needs 64"),
    "overlapping_offsets": (overlap, "overlaps the tensor before it"),
    "trailing_bytes": (lambda h, d: (h, d + bytes(8)), "the tensors cover"),
    "missing_bytes": (lambda h, d: (h, d[:-4]), "the tensors cover"),
    "unknown_dtype": (edit_entry(UNTOUCHED, dtype="F8_E8M0"), "unknown or unsupported dtype 'F8_E8M0'"),
    "dtype_not_a_string": (edit_entry(UNTOUCHED, dtype=["F32"]), "unknown or unsupported dtype"),
    "missing_offsets": (remove_field(UNTOUCHED, "data_offsets"), "needs an object with dtype, shape, data_offsets"),
    "entry_not_an_object": (lambda h, d: ({**h, UNTOUCHED: 5}, d), "needs an object"),
    "metadata_not_strings": (lambda h, d: ({**h, "__metadata__": {"format": 1}}, d), "__metadata__ must map strings"),
    "not_an_object": (raw_header(b"[1, 2]"), "its header is not a JSON object"),
    "deep_nesting": (raw_header(b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nested more than 64 levels"),
    "not_utf8": (raw_header(b'{"\xff": 1}'), "not UTF-8"),
    "nan_in_shape": (raw_header(b'{"t": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}'),
                     "NaN is not a JSON number"),
    "endless_integer": (raw_header(b'{"t": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'),
                        "not valid JSON"),
    "lone_surrogate_name": (lambda h, d: (json.dumps({"bad\ud800": h.pop(UNTOUCHED), **h}).encode(), d),
                            "lone surrogate"),
    "invalid_json": (raw_header(b'{"t": '), "not valid JSON"),
}


def broken_base(llama_base: Path, root: Path, mutate) -> Path:
    base = root / "base"
    shutil.copytree(llama_base, base)
    header, data = split_file(base / "model.safetensors")
    join_file(base / "model.safetensors", *mutate(header, data))
    return base


@pytest.mark.parametrize("case", list(HEADERS))
def test_broken_base_header_is_one_error_line(case, llama_base, adapter, tmp_path, runner):
    mutate, fragment = HEADERS[case]
    base = broken_base(llama_base, tmp_path, mutate)
    shutil.copytree(adapter, tmp_path / "adapter")
    with pytest.raises(BaseMismatchError, match="model.safetensors"):
        BaseCheckpoint(base)
    assert_refused(runner, ["merge", base, tmp_path / "adapter", "-o", tmp_path / "out"], fragment, tmp_path)


@pytest.mark.parametrize("length, fragment", [(400_000_000, "exceeds the format's limit of 100,000,000 bytes"),
                                              (2**64 - 1, "exceeds the format's limit"),
                                              (99_000_000, "exceeds the file size")])
def test_huge_header_length_fails_fast_without_allocating(length, fragment, llama_base, tmp_path):
    base = broken_base(llama_base, tmp_path, lambda h, d: (json.dumps(h).encode(), d))
    header, data = split_file(base / "model.safetensors")
    join_file(base / "model.safetensors", header, data, length=length)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(BaseMismatchError, match=fragment):
        BaseCheckpoint(base)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2**20 and time.perf_counter() - start < 5


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"])
def test_file_shorter_than_the_length_field(content, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(BaseMismatchError, match="fewer than the 8"):
        read_header(tmp_path / "model.safetensors")


def test_valid_headers_of_every_layout_are_read(tmp_path):
    """Empty tensors, zero-length data, tensors out of header order, no metadata: all valid (the Rust rules)."""
    tensors = {"b": torch.arange(6, dtype=torch.float16).reshape(2, 3), "a": torch.zeros(0, 4), "c": torch.ones(2, dtype=torch.int64)}
    save_file(tensors, tmp_path / "x.safetensors")
    infos, metadata = read_header(tmp_path / "x.safetensors")
    assert set(infos) == set(tensors) and metadata == {}
    assert {k: i.shape for k, i in infos.items()} == {k: tuple(t.shape) for k, t in tensors.items()}
    header, data = split_file(tmp_path / "x.safetensors")
    reordered = dict(reversed(list(header.items())))
    join_file(tmp_path / "y.safetensors", reordered, data)
    again = read_header(tmp_path / "y.safetensors")[0]
    assert list(again) == [k for k in reordered if k != "__metadata__"]
    assert {k: (i.dtype, i.shape, i.nbytes, i.end - again["b"].end) for k, i in again.items()} == {
        k: (i.dtype, i.shape, i.nbytes, i.end - infos["b"].end) for k, i in infos.items()}
    save_file({}, tmp_path / "empty.safetensors")
    assert read_header(tmp_path / "empty.safetensors") == ({}, {})


def test_header_errors_name_the_file_and_tensor(llama_base, tmp_path):
    base = broken_base(llama_base, tmp_path, edit_entry(UNTOUCHED, shape=[-32]))
    with pytest.raises(BaseMismatchError) as info:
        BaseCheckpoint(base)
    assert str(base / "model.safetensors") in str(info.value) and repr(UNTOUCHED) in str(info.value)


def test_adapter_header_is_checked_by_safetensors_itself(adapter, tmp_path, runner):
    """Adapter files are parsed by the safetensors library (the Rust reference): the same rules, one error line."""
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    header, data = split_file(folder / "adapter_model.safetensors")
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [-1]
    join_file(folder / "adapter_model.safetensors", header, data)
    assert_refused(runner, ["convert", folder, "--to", "peft", "-o", tmp_path / "out"], "not a readable safetensors file",
                   tmp_path)


# --------------------------------------------------------------------------- model.safetensors.index.json


def set_weight_map(change):
    def mutate(folder: Path) -> None:
        index = json.loads((folder / INDEX_NAME).read_text())
        index["weight_map"] = change(index["weight_map"])
        (folder / INDEX_NAME).write_text(json.dumps(index))
    return mutate


def one_shard(name: str):
    return set_weight_map(lambda m: {**m, "lm_head.weight": name, next(iter(m)): name})


def write_index(text: bytes):
    return lambda folder: (folder / INDEX_NAME).write_bytes(text)


INDEXES = {
    "weight_map_a_list": (set_weight_map(lambda m: list(m.values())), "'weight_map' must be a JSON object"),
    "weight_map_int_values": (set_weight_map(lambda m: dict.fromkeys(m, 1)), "must be a file name (a string), got 1"),
    "weight_map_missing": (write_index(b'{"metadata": {}}'), "'weight_map' must be a JSON object of tensor name"),
    "parent_folder": (one_shard("../victim/model-00001-of-00003.safetensors"), "holds a path separator"),
    "backslash": (one_shard("..\\victim\\model-00001-of-00003.safetensors"), "holds a path separator"),
    "dot_dot": (one_shard(".."), "names a folder"),
    "empty_name": (one_shard(""), "it is empty"),
    "nul": (one_shard("model\x00.safetensors"), "control character"),
    "drive": (one_shard("C:model-00001-of-00003.safetensors"), "drive or root"),
    "not_utf8": (write_index(b'{"weight_map": {"a": "\xff.safetensors"}}'), "not UTF-8"),
    "deep_nesting": (write_index(b'{"weight_map": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"), "nested more than 64"),
    "nan": (write_index(b'{"weight_map": {"a": NaN}}'), "NaN is not a JSON number"),
    "a_folder": (lambda f: ((f / INDEX_NAME).unlink(), (f / INDEX_NAME).mkdir()), "is a folder"),
    "missing_shard": (one_shard("model-00009-of-00009.safetensors"), "cannot be read (No such file or directory)"),
}


def victim_beside(root: Path, sharded_base: Path) -> Path:
    victim = root / "victim"
    victim.mkdir()
    shutil.copy(sharded_base / "model-00001-of-00003.safetensors", victim)
    return victim


@pytest.mark.parametrize("case", list(INDEXES))
def test_broken_index_is_one_error_line(case, sharded_base, adapter, tmp_path, runner):
    mutate, fragment = INDEXES[case]
    base = tmp_path / "base"
    shutil.copytree(sharded_base, base)
    victim_beside(tmp_path, sharded_base)
    shutil.copytree(adapter, tmp_path / "adapter")
    mutate(base)
    with pytest.raises(BaseMismatchError, match=INDEX_NAME if case != "missing_shard" else "model-00009"):
        BaseCheckpoint(base)
    assert_refused(runner, ["merge", base, tmp_path / "adapter", "-o", tmp_path / "out"], fragment, tmp_path)


def test_absolute_shard_name_touches_nothing(sharded_base, adapter, tmp_path, runner):
    """The issue's data loss: an index naming a file outside the base (here by absolute path) must not open it."""
    base = tmp_path / "base"
    shutil.copytree(sharded_base, base)
    victim = victim_beside(tmp_path, sharded_base)
    one_shard(str(victim / "model-00001-of-00003.safetensors"))(base)
    assert_refused(runner, ["merge", base, adapter, "-o", tmp_path / "out"], "is not a plain file name", tmp_path)


def test_a_tensor_in_two_shards_is_refused(sharded_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(sharded_base, base)
    shutil.copy(base / "model-00001-of-00003.safetensors", base / "copy.safetensors")
    set_weight_map(lambda m: {**m, "extra": "copy.safetensors"})(base)
    with pytest.raises(BaseMismatchError, match="is in two shards"):
        BaseCheckpoint(base)


def test_symlinked_shards_as_in_the_hub_cache_are_read(sharded_base, adapter, tmp_path, runner):
    """A Hugging Face cache snapshot links each file to a blob elsewhere: the name is plain, the file a symlink."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    for file in sharded_base.iterdir():
        blob = blobs / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(blob)
    result = run_cli(runner, "merge", snapshot, adapter, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert sorted(BaseCheckpoint(tmp_path / "out").keys()) == sorted(BaseCheckpoint(sharded_base).keys())


# --------------------------------------------------------------------------- config.json of a base


def edit_base_config(change):
    def mutate(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))
    return mutate


BASE_CONFIGS = {
    "model_type_a_list": (edit_base_config(lambda c: c.update(model_type=["llama"])), "'model_type' must be a string"),
    "name_a_number": (edit_base_config(lambda c: c.update(_name_or_path=5)), "'_name_or_path' must be a string"),
    "quantization_config_a_list": (edit_base_config(lambda c: c.update(quantization_config=[1])),
                                   "'quantization_config' must be a JSON object"),
    "nan": (edit_base_config(lambda c: c.update(rms_norm_eps=float("nan"))), "NaN is not a JSON number"),
    "deep_nesting": (lambda f: (f / "config.json").write_text('{"a": ' + "[" * 3000 + "]" * 3000 + "}"),
                     "nested more than 64"),
    "a_folder": (lambda f: ((f / "config.json").unlink(), (f / "config.json").mkdir()), "is a folder"),
    "not_utf8": (lambda f: (f / "config.json").write_bytes(b'{"model_type": "\xfe"}'), "not UTF-8"),
}


@pytest.mark.parametrize("case", list(BASE_CONFIGS))
def test_broken_base_config_is_one_error_line(case, llama_base, adapter, tmp_path, runner):
    mutate, fragment = BASE_CONFIGS[case]
    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    mutate(base)
    with pytest.raises(BaseMismatchError, match="config.json"):
        BaseCheckpoint(base).config
    shutil.copytree(adapter, tmp_path / "adapter")
    assert_refused(runner, ["merge", base, tmp_path / "adapter", "-o", tmp_path / "out"], fragment, tmp_path)


def test_null_model_type_means_absent(llama_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    edit_base_config(lambda c: c.update(model_type=None, quantization_config=None))(base)
    assert BaseCheckpoint(base).config["model_type"] is None


# --------------------------------------------------------------------------- DoRA magnitudes


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf")])
def test_dora_magnitude_must_be_positive_and_finite(value, dora_adapter, tmp_path, runner):
    folder = tmp_path / "dora"
    shutil.copytree(dora_adapter, folder)
    state = load_file(folder / "adapter_model.safetensors")
    state[f"base_model.model.{Q}.lora_magnitude_vector"][3] = value
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterFormatError, match=f"module '{Q}': DoRA lora_magnitude_vector must be positive and finite"):
        adaptools.load(folder)
    assert_refused(runner, ["info", folder], "must be positive and finite", tmp_path)


def test_merge_refuses_a_dora_magnitude_of_zero(llama_base, dora_adapter, tmp_path, runner):
    """The issue's "DoRA magnitudes <= 0 merge silently"."""
    folder = tmp_path / "dora"
    shutil.copytree(dora_adapter, folder)
    state = load_file(folder / "adapter_model.safetensors")
    state[f"base_model.model.{Q}.lora_magnitude_vector"][0] = 0.0
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    assert_refused(runner, ["merge", llama_base, folder, "-o", tmp_path / "out"], f"module '{Q}': DoRA", tmp_path)


def test_kohya_dora_scale_must_be_positive(dora_adapter, tmp_path):
    adaptools.load(dora_adapter).save(tmp_path / "k.safetensors", format="kohya")
    state = load_file(tmp_path / "k.safetensors")
    key = next(k for k in state if k.endswith(".dora_scale"))
    state[key][0] = -1.0
    save_file(state, tmp_path / "k.safetensors")
    with pytest.raises(AdapterFormatError, match="DoRA dora_scale must be positive and finite"):
        adaptools.load(tmp_path / "k.safetensors")


def test_to_dora_refuses_a_zero_row(llama_base, adapter, tmp_path):
    """A row where W + s·B·A is 0 would get magnitude 0, and DoRA (PEFT) divides by that norm: refused."""
    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    state = load_file(base / "model.safetensors")
    state[f"{Q}.weight"][0] = 0
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    lora = adaptools.load(adapter)
    lora.modules[Q].B[0] = 0
    with pytest.raises(DoraError, match=f"'{Q}'.*would be 0"):
        adaptools.to_dora(lora, base)


# --------------------------------------------------------------------------- numbers that overflow


def edit_adapter(adapter: Path, folder: Path, config: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    shutil.copytree(adapter, folder)
    if config:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if dtype:
        state = {k: v.to(dtype) for k, v in load_file(folder / "adapter_model.safetensors").items()}
        save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("args, fragment", [
    (["--weights", "1e308,1e308"], "the result of combine would hold NaN or Inf (its numbers overflow float32)"),
    (["--weights", "1e6,1", "--dtype", "float16"], "overflow float16"),
    (["--weights", "1e308,1e308", "--rank", "2"], "NaN or Inf in the scaled factors of module(s)"),
    (["--weights", "1e300,1e300", "--method", "ties", "--density", "0.5"], "NaN or Inf in the ties merge"),
    (["--weights", "1e300,1e300", "--method", "dare_linear", "--density", "0.5"], "NaN or Inf in the dare_linear merge"),
])
def test_combine_that_overflows_names_the_modules(args, fragment, adapter, tmp_path, runner):
    shutil.copytree(adapter, tmp_path / "a")
    assert_refused(runner, ["combine", tmp_path / "a", tmp_path / "a", *args, "-o", tmp_path / "out"], fragment, tmp_path)
    result = run_cli(runner, "combine", tmp_path / "a", tmp_path / "a", *args, "-o", tmp_path / "out")
    assert Q in result.stderr


def test_combine_api_raises_non_finite(adapter):
    lora = adaptools.load(adapter)
    with pytest.raises(NonFiniteError, match=Q):
        adaptools.combine([lora, lora], [1e308, 1e308])
    assert math.isfinite(float(adaptools.combine([lora, lora], [1e30, 1e30])[Q].B.abs().max()))


def test_rerank_result_that_overflows_its_dtype(adapter, tmp_path, runner):
    big = edit_adapter(adapter, tmp_path / "big", config={"lora_alpha": 1e12}, dtype=torch.float16)
    assert_refused(runner, ["rerank", big, "--rank", "2", "-o", tmp_path / "out"], "the result of rerank would hold NaN",
                   tmp_path)


def test_convert_that_overflows_float16(adapter, tmp_path, runner):
    """Writing PEFT folds the scale into B: fp16 factors at scale 1e6 overflow, refused before writing."""
    big = edit_adapter(adapter, tmp_path / "big", config={"lora_alpha": 4e6}, dtype=torch.float16)
    assert_refused(runner, ["convert", big, "--to", "peft", "-o", tmp_path / "out"],
                   "cannot write 'adapter_model.safetensors': NaN or Inf", tmp_path)


def test_to_dora_that_overflows(llama_base, adapter, tmp_path, runner):
    big = edit_adapter(adapter, tmp_path / "big", config={"lora_alpha": 1e38})
    assert_refused(runner, ["dora", "to-dora", big, "--base", llama_base, "-o", tmp_path / "out"],
                   "the result of LoRA → DoRA would hold NaN or Inf", tmp_path)


def test_to_lora_that_overflows_names_the_modules(llama_base, dora_adapter, tmp_path, runner):
    folder = tmp_path / "dora"
    shutil.copytree(dora_adapter, folder)
    state = load_file(folder / "adapter_model.safetensors")
    for key in state:
        if key.endswith("lora_magnitude_vector"):
            state[key][:] = 3e38
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    assert_refused(runner, ["dora", "to-lora", folder, "--base", llama_base, "--rank", "2", "-o", tmp_path / "out"],
                   f"DoRA → LoRA of module(s) '{Q}'", tmp_path)


@pytest.mark.parametrize("text, fragment", [
    ('{"adaptools_recipe": NaN}', "NaN is not a JSON number"),
    ('{"a": ' + "[" * 10_000 + "]" * 10_000 + "}", "nested more than 64 levels deep"),
    ("[1]", "does not hold a JSON object"),
])
def test_recipe_json_is_read_by_the_strict_reader(text, fragment, tmp_path):
    from adaptools.errors import RecipeError
    from adaptools.recipe import read_recipe

    (tmp_path / "recipe.json").write_text(text)
    with pytest.raises(RecipeError, match=fragment):
        read_recipe(tmp_path / "recipe.json")
