"""Issue 21's odd inputs, one regression test each: one `error:` line (exit 2, no traceback, nothing written) where
there was a traceback, a refusal where the result was silently wrong, and the file and race cases."""
from __future__ import annotations

import importlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

import adaptools
from adaptools.digests import SequentialHasher
from adaptools.errors import RecipeError

from test_errors_cli import CONFIG, WEIGHTS, good  # noqa: F401  (good: a valid PEFT LoRA folder fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

P = "base_model.model."


def variant(good: Path, target: Path, *, config=None, state=None) -> Path:
    """A copy of `good` with its config and/or tensors changed by the given functions."""
    shutil.copytree(good, target)
    if config is not None:
        data = json.loads((target / CONFIG).read_text())
        config(data)
        (target / CONFIG).write_text(json.dumps(data))
    if state is not None:
        tensors = load_file(target / WEIGHTS)
        tensors = state(tensors) or tensors
        save_file(tensors, target / WEIGHTS, metadata={"format": "pt"})
    return target


def one_error(result, *absent: Path) -> str:
    assert result.exit_code == 2, result.output
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.output, result.output
    assert not any(p.exists() for p in absent)
    return result.stderr


def lyco(path: Path, tensors: dict) -> Path:
    save_file(tensors, path)
    return path


# --------------------------------------------------------------------------- tracebacks become one error line


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8, torch.int32])
@pytest.mark.parametrize("command", ["info", "convert", "merge"])
def test_factors_that_are_not_floating_point_are_one_error(dtype, command, good, llama_base, tmp_path, runner):
    bad = variant(good, tmp_path / "bad", state=lambda s: {k: v.to(dtype) for k, v in s.items()})
    args = {"info": ["info", bad], "convert": ["convert", bad, "--to", "kohya", "-o", tmp_path / "o.safetensors"],
            "merge": ["merge", llama_base, bad, "-o", tmp_path / "o"]}[command]
    assert str(dtype).removeprefix("torch.") in one_error(run_cli(runner, *args), tmp_path / "o",
                                                          tmp_path / "o.safetensors")


@pytest.mark.parametrize("tensors", [
    {"x.hada_w1_a": (4, 0), "x.hada_w1_b": (0, 4), "x.hada_w2_a": (4, 0), "x.hada_w2_b": (0, 4)},
    {"x.hada_w1_a": (0, 2), "x.hada_w1_b": (2, 4), "x.hada_w2_a": (0, 2), "x.hada_w2_b": (2, 4)},
    {"x.lokr_w1": (0, 4), "x.lokr_w2": (4, 4)},
    {"x.lokr_w1": (2, 2), "x.lokr_w2_a": (4, 0), "x.lokr_w2_b": (0, 4)},
    {"x.lora_down.weight": (2, 0, 1, 1), "x.lora_mid.weight": (2, 2, 3, 3), "x.lora_up.weight": (4, 2, 1, 1)},
], ids=["loha-rank0", "loha-out0", "lokr-w1", "lokr-rank0", "tucker"])
@pytest.mark.parametrize("command", ["info", "spectrum"])
def test_empty_lycoris_factors_are_one_error(tensors, command, tmp_path, runner):
    path = lyco(tmp_path / "empty.safetensors", {f"lora_unet_{k}": torch.zeros(s) for k, s in tensors.items()})
    assert "empty" in one_error(run_cli(runner, command, path))


def test_a_peft_key_without_a_module_path_is_one_error(good, tmp_path, runner):
    bad = variant(good, tmp_path / "bad", state=lambda s: s.update({f"{P}foo": torch.zeros(2)}))
    assert "'base_model.model.foo' names no module" in one_error(
        run_cli(runner, "convert", bad, "--to", "peft", "-o", tmp_path / "o"), tmp_path / "o")


def test_a_json_integer_beyond_int64_is_one_error(good, tmp_path, runner):
    bad = variant(good, tmp_path / "bad")
    text = json.dumps({**json.loads((bad / CONFIG).read_text()), "lora_alpha": 12345})
    (bad / CONFIG).write_text(text.replace("12345", "9" * 401))
    assert "out of range" in one_error(run_cli(runner, "info", bad))


def with_huge_empty_tensor(base: Path, target: Path) -> Path:
    """A copy of `base` whose shard also holds a zero-byte F32 tensor of shape [0, 2^64]."""
    shutil.copytree(base, target)
    shard = target / "model.safetensors"
    data = shard.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + length]), data[8 + length:]
    header["zz.weight"] = {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [len(body), len(body)]}
    text = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(text)) + text + body)
    return target


@pytest.mark.parametrize("args", [["merge", "ADAPTER", "--dtype", "fp16"], ["merge", "ADAPTER", "--dtype", "nf4"],
                                  ["quantize"]], ids=["merge-fp16", "merge-nf4", "quantize"])
def test_a_zero_byte_tensor_of_shape_beyond_int64_is_one_error(args, good, llama_base, tmp_path, runner):
    base = with_huge_empty_tensor(llama_base, tmp_path / "base")
    argv = [args[0], base, *[good if a == "ADAPTER" else a for a in args[1:]], "-o", tmp_path / "o"]
    one_error(run_cli(runner, *argv), tmp_path / "o")


def test_a_float8_weight_in_extract_is_one_error(llama_base, tmp_path, runner):
    tuned = shutil.copytree(llama_base, tmp_path / "tuned")
    tensors = load_file(tuned / "model.safetensors")
    tensors = {k: v.to(torch.float8_e4m3fn) if "q_proj" in k else v for k, v in tensors.items()}
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    for pair in ((llama_base, tuned), (tuned, llama_base)):
        assert "float8_e4m3fn" in one_error(run_cli(runner, "extract", *pair, "--rank", "2", "-o", tmp_path / "o"),
                                            tmp_path / "o")


def test_an_alpha_of_1e308_with_knots_ties_is_one_error(good, tmp_path, runner):
    bad = variant(good, tmp_path / "bad", config=lambda c: c.update(lora_alpha=1e308))
    one_error(run_cli(runner, "combine", bad, good, "--method", "knots_ties", "--density", "0.5",
                      "-o", tmp_path / "o"), tmp_path / "o")


@pytest.mark.parametrize("output", ["X/..", "missing/../out", "y" * 300 + "/out", "y/" * 2100 + "out"],
                         ids=["dotdot", "dotdot-after-missing", "long-part", "long-path"])
def test_output_paths_the_file_system_cannot_hold_are_one_error(output, good, tmp_path, runner, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "X").mkdir()
    one_error(run_cli(runner, "convert", good, "--to", "kohya", "-o", output, "--overwrite"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X"]  # nothing created, `missing/` included


@pytest.mark.parametrize("device", ["meta", "nonsense", "cuda:99"])
def test_devices_adaptools_does_not_compute_on_are_one_error(device, good, llama_base, tmp_path, runner):
    assert device in one_error(run_cli(runner, "merge", llama_base, good, "-o", tmp_path / "o", "--device", device),
                               tmp_path / "o")


def test_a_huge_pad_rank_is_one_error_from_the_command_line_and_from_a_recipe(good, tmp_path, runner):
    huge = "1" + "0" * 21
    assert "would grow the adapter" in one_error(
        run_cli(runner, "convert", good, "--to", "peft", "-o", tmp_path / "o", "--pad-rank", huge), tmp_path / "o")
    assert run_cli(runner, "convert", good, "--to", "peft", "-o", tmp_path / "first", "--pad-rank", "8").exit_code == 0
    recipe = tmp_path / "first" / "adaptools_recipe.json"
    data = json.loads(recipe.read_text())
    data["params"]["pad_rank"] = int(huge)
    recipe.write_text(json.dumps(data))
    one_error(run_cli(runner, "replay", recipe, "-o", tmp_path / "again"), tmp_path / "again")


# --------------------------------------------------------------------------- silently wrong, now refused


def test_kohya_names_that_collide_are_refused_with_both_names(tmp_path, runner):
    source = tmp_path / "collide"
    source.mkdir()
    tensors = {}
    for module in ("mlp.up_proj", "mlp_up.proj"):
        tensors[f"{P}{module}.lora_A.weight"], tensors[f"{P}{module}.lora_B.weight"] = torch.randn(2, 4), torch.randn(4, 2)
    save_file(tensors, source / WEIGHTS)
    (source / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    error = one_error(run_cli(runner, "convert", source, "--to", "kohya", "-o", tmp_path / "k.safetensors"),
                      tmp_path / "k.safetensors")
    assert "'mlp.up_proj'" in error and "'mlp_up.proj'" in error


def test_replay_of_a_weights_file_checks_its_config(good, tmp_path, runner):
    source = shutil.copytree(good, tmp_path / "input")
    first = tmp_path / "first"
    assert run_cli(runner, "convert", source / WEIGHTS, "--to", "peft", "-o", first).exit_code == 0
    config = json.loads((source / CONFIG).read_text())
    config["lora_alpha"] *= 2
    (source / CONFIG).write_text(json.dumps(config))
    error = one_error(run_cli(runner, "replay", first, "-o", tmp_path / "again"), tmp_path / "again")
    assert "changed since the recipe was recorded" in error and CONFIG in error


def test_an_adalora_module_with_no_kept_rank_is_refused(tmp_path, runner):
    folder = tmp_path / "adalora"
    folder.mkdir()
    module = "model.layers.0.self_attn.q_proj"
    save_file({f"{P}{module}.lora_A": torch.randn(3, 8), f"{P}{module}.lora_B": torch.randn(8, 3),
               f"{P}{module}.lora_E": torch.randn(3, 1)}, folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps({"peft_type": "ADALORA", "r": 3, "init_r": 3, "lora_alpha": 3,
                                             "rank_pattern": {f"{P}{module}.lora_E": [False, False, False]}}))
    assert "keeps no rank" in one_error(run_cli(runner, "convert", folder, "--to", "peft", "-o", tmp_path / "o"),
                                        tmp_path / "o")


def test_a_method_whose_delta_leaves_float32_is_refused_like_weights(good, tmp_path, runner):
    bad = variant(good, tmp_path / "bad", config=lambda c: c.update(lora_alpha=3e40))
    one_error(run_cli(runner, "combine", bad, good, "--weights", "1,1", "-o", tmp_path / "w"), tmp_path / "w")
    one_error(run_cli(runner, "combine", bad, good, "--method", "knots_ties", "--density", "1", "-o", tmp_path / "k"),
              tmp_path / "k")


# --------------------------------------------------------------------------- files and the race


def test_a_crafted_cache_folder_cannot_carry_a_file_into_an_output(good, llama_base, tmp_path, runner, monkeypatch):
    """`models--x--y/` with `blobs -> /` and a snapshot side file linking to a private file: not copied."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    for where in (tmp_path / "local", tmp_path / "cache"):
        repo = where / "models--x--y"
        snapshot = repo / "snapshots" / "rev"
        shutil.copytree(llama_base, snapshot)
        (repo / "blobs").symlink_to("/")
        (snapshot / "tokenizer.json").symlink_to(secret)
        out = where / "out"
        with pytest.warns(UserWarning, match="not copied"):
            adaptools.merge(snapshot, good, out=out)
        assert not (out / "tokenizer.json").exists()


def test_a_shard_that_changes_while_it_is_read_fails_cleanly(good, llama_base, tmp_path, monkeypatch, runner):
    shard = shutil.copytree(llama_base, tmp_path / "base") / "model.safetensors"
    hasher = SequentialHasher(shard)
    with shard.open("ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(RecipeError, match="changed while the command ran"):
        hasher.finish()
    with pytest.raises(RecipeError, match="changed while the command ran"):
        SequentialHasher(shard, size=shard.stat().st_size - 16)

    execute = importlib.import_module("adaptools.merge.execute")
    base = shutil.copytree(llama_base, tmp_path / "base2")
    original = execute.run_step
    appended = []

    def run_step_then_append(*args, **kwargs):
        read = original(*args, **kwargs)
        if not appended:
            with (base / "model.safetensors").open("ab") as f:
                f.write(b"\0" * 8)
            appended.append(True)
        return read

    monkeypatch.setattr(execute, "run_step", run_step_then_append)
    assert "changed while the command ran" in one_error(run_cli(runner, "merge", base, good, "-o", tmp_path / "o"),
                                                        tmp_path / "o")


def test_an_adapter_that_changes_after_it_was_read_is_not_named_by_a_recipe(good, tmp_path, monkeypatch, runner):
    """The recipe's sha256 of an input is taken after the work: a file changed since the read is refused, so the
    recipe never names bytes the output was not made from."""
    source = shutil.copytree(good, tmp_path / "input")
    peft = importlib.import_module("adaptools.formats.peft")
    original = peft.write

    def edit_then_write(adapter, folder):
        config = json.loads((source / CONFIG).read_text())
        (source / CONFIG).write_text(json.dumps({**config, "lora_alpha": config["lora_alpha"] * 2}))
        original(adapter, folder)

    monkeypatch.setattr(peft, "write", edit_then_write)
    assert "changed while the command ran" in one_error(
        run_cli(runner, "convert", source / WEIGHTS, "--to", "peft", "-o", tmp_path / "o"), tmp_path / "o")


@pytest.mark.parametrize("key", [f"{P}.lora_A.weight", ".lora_down.weight", ".lora_a"], ids=["peft", "kohya", "mlx"])
def test_a_factor_key_with_an_empty_module_path_is_one_error(key, tmp_path, runner):
    folder = tmp_path / "adapter"
    folder.mkdir()
    name = {"peft": "adapter_model.safetensors", "kohya": "k.safetensors", "mlx": "adapters.safetensors"}
    family = "peft" if key.startswith(P) else "kohya" if "down" in key else "mlx"
    other = key.replace("lora_A", "lora_B").replace("lora_down", "lora_up").replace("lora_a", "lora_b")
    save_file({key: torch.randn(2, 4), other: torch.randn(4, 2)}, folder / name[family])
    if family == "peft":
        (folder / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    path = folder / name[family] if family == "kohya" else folder
    assert "names no module" in one_error(run_cli(runner, "info", path, *(["--scale", "1"] if family == "mlx" else [])))


def test_an_empty_lora_module_is_refused_in_the_api():
    """The API's edge: a LoraModule of rank 0 (spectrum raised IndexError on one) or with an empty dimension."""
    with pytest.raises(adaptools.ShapeMismatchError, match="empty"):
        adaptools.LoraModule(torch.zeros(0, 4), torch.zeros(4, 0))
    with pytest.raises(adaptools.ShapeMismatchError, match="empty"):
        adaptools.LoraModule(torch.zeros(2, 0), torch.zeros(4, 2))
