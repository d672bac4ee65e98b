"""Seeded fuzz of the files adaptools reads (issue 13): mutated safetensors headers, adapter configs, base configs and
shard indexes of valid fixtures, run through `info`, `convert`, `combine` and `merge` in-process; FP8 bases
(issue 24) with mutated quantization configs, scale headers and hostile scale values (NaN, ±Inf, 0, negative,
subnormal, huge) through `merge` and `extract`.

Every mutant must end in exit status 2 with one `error:` line, or exit 0 with a valid output; never a traceback,
never a hang (an alarm per run), and no file outside the job's output target may change (every file beside the
output, inputs included, is hashed before and after).
"""
from __future__ import annotations

import copy
import json
import shutil
import signal
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import make_base, make_peft_adapter
from fp8_factories import make_ct_fp8_base, make_fine_grained_base
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from gguf_factories import llama_gguf
from test_untrusted_inputs import join_file, split_file, tree_digest

import adaptools
from adaptools.checkpoints.safetensors_io import read_header
from adaptools.checkpoints.shards import INDEX_NAME
from adaptools_cli.main import cli

pytestmark = pytest.mark.usefixtures("single_thread")

RUN_SECONDS = 30
"""A run longer than this is a hang."""
FUZZ = dict(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NASTY_STRINGS = ["../victim.safetensors", "/etc/passwd", "..", "", "a\\b", "C:x", "F8_E4M3", "BOOL", "I64", "F16",
                 "LORA", "ADALORA", "LOHA", "q_proj", "(", ".*", "model.safetensors", "\x00", "8", "yes"]
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, 4, 8, 2**63])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12) | st.sampled_from(NASTY_STRINGS))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                           max_size=3), max_leaves=6)


def node_paths(value, prefix=()) -> Iterator[tuple]:
    """Every path (keys / indices) into a JSON value, the root included."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from node_paths(item, (*prefix, key))


def mutate_json(data: st.DataObject, value: object) -> bytes:
    """A JSON-level mutation (replace, delete or add at a random node) or a byte-level one (truncate, flip, insert,
    nest deeply) of `value`, serialized (NaN and Infinity written as Python's json writes them)."""
    value = copy.deepcopy(value)
    kind = data.draw(st.sampled_from(["replace", "delete", "add", "truncate", "flip", "insert", "nest"]))
    if kind in ("replace", "delete", "add"):
        path = data.draw(st.sampled_from(list(node_paths(value))))
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        new = data.draw(VALUES)
        if not path:
            value = new
        elif kind == "replace":
            parent[path[-1]] = new
        elif kind == "delete":
            del parent[path[-1]]
        else:
            target = parent[path[-1]]
            if isinstance(target, dict):
                target[data.draw(st.sampled_from(["r", "shape", "dtype", "data_offsets", "weight_map", "x"]))] = new
            elif isinstance(target, list):
                target.append(new)
            else:
                parent[path[-1]] = [target, new]
        return json.dumps(value).encode("utf-8", "surrogatepass")
    text = json.dumps(value).encode()
    at = data.draw(st.integers(0, max(0, len(text) - 1)))
    if kind == "truncate":
        return text[:at]
    if kind == "flip":
        return text[:at] + bytes([text[at] ^ data.draw(st.integers(1, 255))]) + text[at + 1:] if text else text
    if kind == "insert":
        return text[:at] + data.draw(st.binary(min_size=1, max_size=4)) + text[at:]
    depth = data.draw(st.sampled_from([63, 65, 1000, 20_000]))
    return b'{"x": ' + b"[" * depth + text + b"]" * depth + b"}"


def mutate_safetensors(data: st.DataObject, path: Path) -> None:
    """Rewrite a safetensors file with a mutated header, a wrong length prefix, or cut data."""
    header, body = split_file(path)
    kind = data.draw(st.sampled_from(["header", "header", "header", "length", "data"]))
    if kind == "header":
        join_file(path, mutate_json(data, header), body)
    elif kind == "length":
        text = json.dumps(header).encode()
        length = data.draw(st.sampled_from([0, 1, len(text) - 1, len(text) + 1, 100_000_001, 2**64 - 1])
                           | st.integers(0, 2**64 - 1))
        join_file(path, text, body, length=length)
    else:
        join_file(path, header, body[:data.draw(st.integers(0, max(0, len(body) - 1)))])


def mutate_json_file(data: st.DataObject, path: Path) -> None:
    path.write_bytes(mutate_json(data, json.loads(path.read_text())))


@contextmanager
def time_limit(seconds: int):
    def timeout(signum, frame):
        raise TimeoutError(f"a run took more than {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outside(tree: dict[str, str], output: str) -> dict[str, str]:
    """The digest without the output target: the output, its recipe beside a single-file output (`out.*`) and the
    lock file beside it (temporary folders `.out.*.tmp` are not part of it: none may be left behind)."""
    return {p: h for p, h in tree.items()
            if (top := p.split("/")[0]) not in (output, f".{output}.lock") and not top.startswith(f"{output}.")}


def run_mutant(work: Path, args: list, output: str, check_output) -> None:
    """Run the CLI in `work` and assert the fuzz contract (module doc); `check_output(path)` validates a success."""
    before = tree_digest(work)
    with time_limit(RUN_SECONDS):
        result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback: the test fails with it
    assert result.exit_code in (0, 2), (result.exit_code, result.stderr)
    event(f"{args[0]} exit {result.exit_code}")  # shown by pytest --hypothesis-show-statistics
    if result.exit_code == 2:
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert not (work / output).exists()
    else:
        check_output(work / output)
    assert outside(tree_digest(work), output) == outside(before, output)


def valid_adapter(path: Path) -> None:
    adaptools.load(path).check_finite()


def valid_model(path: Path) -> None:
    ckpt = adaptools.BaseCheckpoint(path)
    for shard in ckpt.shards:
        read_header(path / shard)
        load_file(path / shard)  # safetensors' own checks too


@pytest.fixture(scope="module")
def fuzz_inputs(llama_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    return {
        "adapter": make_peft_adapter(llama_base, root / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "base": llama_base,
        "sharded": make_base(root / "sharded", max_shard_size="40KB"),
        "root": root,
    }


def work_folder(fuzz_inputs: dict[str, Path]) -> Path:
    """A fresh folder holding a sentinel sibling folder, beside which inputs are copied and the output is written."""
    work = Path(tempfile.mkdtemp(dir=fuzz_inputs["root"]))
    (work / "sentinel").mkdir()
    (work / "sentinel" / "keep.txt").write_text("must not change")
    (work / "victim.safetensors").write_bytes(b"must not change either")
    return work


ADAPTER_COMMANDS = {
    "info": lambda a, w: ["info", a],
    "convert-peft": lambda a, w: ["convert", a, "--to", "peft", "-o", w / "out"],
    "convert-kohya": lambda a, w: ["convert", a, "--to", "kohya", "-o", w / "out"],
    "combine": lambda a, w: ["combine", a, w / "good", "--weights", "0.5,2", "-o", w / "out"],
}


@settings(max_examples=160, **FUZZ)
@given(data=st.data())
def test_fuzz_adapter_files(fuzz_inputs, data):
    work = work_folder(fuzz_inputs)
    adapter = work / "adapter"
    shutil.copytree(fuzz_inputs["adapter"], adapter)
    shutil.copytree(fuzz_inputs["adapter"], work / "good")
    if data.draw(st.booleans()):
        mutate_json_file(data, adapter / "adapter_config.json")
    else:
        mutate_safetensors(data, adapter / "adapter_model.safetensors")
    command = data.draw(st.sampled_from(list(ADAPTER_COMMANDS)))
    check = (lambda path: None) if command == "info" else valid_adapter  # info writes nothing
    run_mutant(work, ADAPTER_COMMANDS[command](adapter, work), "out", check)
    shutil.rmtree(work)


@settings(max_examples=140, **FUZZ)
@given(data=st.data())
def test_fuzz_base_files(fuzz_inputs, data):
    work = work_folder(fuzz_inputs)
    sharded = data.draw(st.booleans())
    base = work / "base"
    shutil.copytree(fuzz_inputs["sharded" if sharded else "base"], base)
    target = data.draw(st.sampled_from(["header", "header", "config", *(["index", "index"] if sharded else [])]))
    if target == "header":
        shard = data.draw(st.sampled_from(sorted(p.name for p in base.glob("*.safetensors"))))
        mutate_safetensors(data, base / shard)
    else:
        mutate_json_file(data, base / (INDEX_NAME if target == "index" else "config.json"))
    run_mutant(work, ["merge", base, fuzz_inputs["adapter"], "-o", work / "out"], "out", valid_model)
    shutil.rmtree(work)


HOSTILE_SCALES = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0, 1e-45, 3e38, 65504.0, 1e-30]
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def poison_scale(data: st.DataObject, path: Path) -> None:
    """Write a hostile value into one element of one FP8 scale tensor of a safetensors file (header unchanged)."""
    header, body = split_file(path)
    scales = sorted(k for k, v in header.items()
                    if k.endswith(("_scale", "_scale_inv")) and v["dtype"] in SAFETENSORS_DTYPES)
    key = data.draw(st.sampled_from(scales))
    entry = header[key]
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    start, end = entry["data_offsets"]
    index = data.draw(st.integers(0, (end - start) // dtype.itemsize - 1))
    value = torch.tensor([data.draw(st.sampled_from(HOSTILE_SCALES))]).to(dtype).view(torch.uint8).numpy().tobytes()
    at = start + index * dtype.itemsize
    join_file(path, header, body[:at] + value + body[at + len(value):])


def mutate_quantization_config(data: st.DataObject, path: Path) -> None:
    """A JSON mutation inside config.json's quantization_config (the rest kept valid)."""
    config = json.loads(path.read_text())
    config["quantization_config"] = json.loads(mutate_json(data, config["quantization_config"]).decode(
        "utf-8", "surrogatepass") or "null") if data.draw(st.booleans()) else config["quantization_config"]
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def fp8_bases(llama_base, tmp_path_factory) -> dict[str, Path]:
    """The fuzz adapter's base (fp32 tiny Llama, same seed) saved by compressed-tensors per block and per tensor
    (static input scales), and in the fine-grained layout (block 16x16: several blocks per weight)."""
    root = tmp_path_factory.mktemp("fp8")
    shape = dict(hidden_size=32, intermediate_size=48)
    return {
        "block": make_ct_fp8_base(root / "block", "block", dtype=torch.float32, **shape),
        "tensor": make_ct_fp8_base(root / "tensor", "tensor", dtype=torch.bfloat16, **shape),
        "fine-grained": make_fine_grained_base(root / "fine", dtype=torch.float32, block=(16, 16), **shape),
    }


@pytest.fixture(scope="module")
def single_file_inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD1.x single-file checkpoint and a kohya LoRA on two of its modules (a UNet linear, a text encoder's)."""
    from diffusion_fixtures import write_single_file
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("fuzz-single")
    base, _ = write_single_file(root / "sd15.safetensors", "sd1")
    lora = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (8, 8),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (24, 24)}
    state = {}
    for name, (out, inp) in lora.items():
        state[f"{name}.lora_down.weight"] = torch.ones(2, inp) / 8
        state[f"{name}.lora_up.weight"] = torch.ones(out, 2) / 8
    save_file(state, str(root / "lora.safetensors"))
    return {"base": base, "lora": root / "lora.safetensors", "root": root}


def valid_single_file(path: Path) -> None:
    if path.is_dir():  # a mutant no longer in a diffusion layout is read as a one-file Hugging Face folder
        return valid_model(path)
    read_header(path)
    load_file(path)


@settings(max_examples=60, **FUZZ)
@given(data=st.data())
def test_fuzz_fp8_bases(fuzz_inputs, fp8_bases, data):
    work = work_folder(fuzz_inputs)
    base = work / "base"
    shutil.copytree(fp8_bases[data.draw(st.sampled_from(sorted(fp8_bases)))], base)
    target = data.draw(st.sampled_from(["scale", "scale", "config", "header"]))
    if target == "scale":
        poison_scale(data, base / "model.safetensors")
    elif target == "config":
        try:
            mutate_quantization_config(data, base / "config.json")
        except ValueError:  # a byte-level mutant that is no JSON: write it as the whole quantization_config's text
            mutate_json_file(data, base / "config.json")
    else:
        mutate_safetensors(data, base / "model.safetensors")
    if data.draw(st.booleans()):
        run_mutant(work, ["merge", base, fuzz_inputs["adapter"], "-o", work / "out"], "out", valid_model)
    else:
        run_mutant(work, ["extract", base, fuzz_inputs["base"], "--rank", "2", "-o", work / "out"], "out",
                   valid_adapter)
    shutil.rmtree(work)


@settings(max_examples=60, **FUZZ)
@given(data=st.data())
def test_fuzz_single_file_bases(single_file_inputs, data):
    """Hostile single-file checkpoint headers through `merge CKPT LORA -o OUT.safetensors` and `info CKPT`."""
    work = work_folder(single_file_inputs)
    base = work / "sd15.safetensors"
    shutil.copy(single_file_inputs["base"], base)
    mutate_safetensors(data, base)
    if data.draw(st.booleans()):
        run_mutant(work, ["info", base], "out.safetensors", lambda path: None)
    else:
        run_mutant(work, ["merge", base, single_file_inputs["lora"], "-o", work / "out.safetensors"],
                   "out.safetensors", valid_single_file)
    shutil.rmtree(work)


def test_struct_roundtrip_of_the_helpers(tmp_path, fuzz_inputs):
    """The fuzz helpers rewrite an unmutated file byte for byte (so a mutant differs only where mutated)."""
    source = fuzz_inputs["adapter"] / "adapter_model.safetensors"
    header, body = split_file(source)
    join_file(tmp_path / "x.safetensors", json.dumps(header).encode(), body)
    assert load_file(tmp_path / "x.safetensors").keys() == load_file(source).keys()
    (n,) = struct.unpack("<Q", (tmp_path / "x.safetensors").read_bytes()[:8])
    assert n == len(json.dumps(header).encode())


# --- GGUF headers ------------------------------------------------------------------------------------------------

def mutate_gguf(data: st.DataObject, path: Path) -> None:
    """Overwrite a count, length, type, dimension or offset of the header (a random aligned or unaligned spot, or a
    fixed field) with a nasty value, flip a byte, or cut the file."""
    from adaptools.checkpoints.gguf_file import read_header

    raw = bytearray(path.read_bytes())
    head = read_header(path).data_start
    kind = data.draw(st.sampled_from(["u64", "u64", "u32", "flip", "cut"]))
    if kind == "cut":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    elif kind == "flip":
        raw[data.draw(st.integers(0, head - 1))] ^= data.draw(st.integers(1, 255))
    else:
        size = 8 if kind == "u64" else 4
        at = data.draw(st.sampled_from([4, 8, 16]) | st.integers(0, head - size))
        value = data.draw(st.sampled_from([0, 1, 2, 3, 31, 33, 2**31, 2**32 - 1, 2**63, 2**64 - 1][: 10 if size == 8 else 8])
                          | st.integers(0, 2**(8 * size) - 1))
        raw[at:at + size] = value.to_bytes(size, "little")
    path.write_bytes(bytes(raw))


def valid_gguf(path: Path) -> None:
    import gguf

    from adaptools.checkpoints.gguf_file import read_header

    read_header(path)
    gguf.GGUFReader(path)  # gguf-py's own reader takes it too


@settings(max_examples=120, **FUZZ)
@given(data=st.data())
def test_fuzz_gguf_headers(fuzz_inputs, data):
    if "gguf" not in fuzz_inputs:
        fuzz_inputs["gguf"] = llama_gguf(fuzz_inputs["base"], fuzz_inputs["root"] / "base.gguf")
    work = work_folder(fuzz_inputs)
    base = work / "base.gguf"
    shutil.copy(fuzz_inputs["gguf"], base)
    mutate_gguf(data, base)
    if data.draw(st.booleans()):
        run_mutant(work, ["info", base], "out.gguf", lambda path: None)
    else:
        run_mutant(work, ["merge", base, fuzz_inputs["adapter"], "-o", work / "out.gguf"], "out.gguf", valid_gguf)
    shutil.rmtree(work)
