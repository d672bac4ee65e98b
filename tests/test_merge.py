"""Streaming merge into base checkpoints against PEFT's merge_and_unload, transformers loading, PEFT's own
regression fixtures, and the CLI's errors (nothing written)."""
from __future__ import annotations

import filecmp
import importlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from factories import (
    input_ids,
    load_base,
    logits,
    make_base,
    make_peft_adapter,
    make_vit_base,
    model_logits,
    peft_merged_logits,
    peft_model,
)
from safetensors import safe_open

import adaptools
from adaptools.errors import NonFiniteError, ShapeMismatchError, UnknownModuleError
from adaptools.checkpoints.shards import INDEX_NAME

FP32_RTOL = 1e-5


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (all shards)."""
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def same_files(a: Path, b: Path) -> bool:
    """True when two folders hold the same file names with the same bytes."""
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names
    )


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary folders an aborted atomic output would leave."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- against PEFT's merge_and_unload

CASES = {
    "llama-all-linear": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "llama-rslora-patterns": ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear",
                                            rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3})),
    "llama-embedding-modules-to-save": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                                      modules_to_save=["lm_head"])),
    "llama-dora-embedding": ("llama", dict(r=4, lora_alpha=8, use_dora=True,
                                           target_modules=["embed_tokens", "q_proj", "v_proj", "gate_proj"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2-square-only-no-flag": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["attn.c_proj"])),
    "gpt2-lora-bias": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True,
                                    lora_bias=True)),
    "gpt2-dora": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                               use_dora=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft_merge_and_unload(case, llama_base, gpt2_base, tmp_path):
    arch, kwargs = CASES[case]
    base = llama_base if arch == "llama" else gpt2_base
    adapter = make_peft_adapter(base, tmp_path / "adapter", **kwargs)
    report = adaptools.merge(base, adapter, out=tmp_path / "merged")
    assert report.modules == {"merged": len(adaptools.load(adapter))}
    ref = peft_merged_logits(base, adapter)
    assert relative_error(model_logits(tmp_path / "merged"), ref) < FP32_RTOL
    assert relative_error(model_logits(base), ref) > 1e-3  # the adapter matters


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_conv2d_merge_matches_peft(dora, tmp_path):
    """A ViT's patch embedding is a Conv2d (4x4 kernel); PEFT merges conv LoRA and DoRA per output channel."""
    from transformers import ViTForImageClassification

    base = make_vit_base(tmp_path / "vit")
    adapter = make_peft_adapter(base, tmp_path / "adapter", r=3, lora_alpha=6, use_dora=dora,
                                target_modules=["projection"])
    assert [(m.kind, m.kernel, m.is_dora) for _, m in adaptools.load(adapter).items()] == [("conv", (4, 4), dora)]
    adaptools.merge(base, adapter, out=tmp_path / "merged")
    ref = logits(peft_model(base, adapter).merge_and_unload())
    got = logits(ViTForImageClassification.from_pretrained(tmp_path / "merged").eval())
    assert relative_error(got, ref) < FP32_RTOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cast_output_rounds_the_float32_merge(dtype, llama_base, tmp_path):
    """Every output tensor is PEFT's float32 merge rounded once to the dtype (1 ulp), and config.json says so."""
    adapter = make_peft_adapter(llama_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    name = str(dtype).removeprefix("torch.")
    adaptools.merge(llama_base, adapter, out=tmp_path / "merged", dtype={"float16": "fp16"}.get(name, "bf16"))
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == name
    ref = peft_model(llama_base, adapter).merge_and_unload().state_dict()
    got = folder_tensors(tmp_path / "merged")
    assert got.keys() == ref.keys()
    for key, tensor in got.items():
        assert tensor.dtype == dtype
        torch.testing.assert_close(tensor.float(), ref[key].to(dtype).float(), rtol=torch.finfo(dtype).eps, atol=0)
    loaded = load_base(tmp_path / "merged", dtype)
    with torch.no_grad():
        out = loaded(input_ids()).logits
    assert relative_error(out, peft_merged_logits(llama_base, adapter)) < 20 * torch.finfo(dtype).eps


def test_sharded_fp16_base_keeps_its_layout(tmp_path):
    base = make_base(tmp_path / "base", "llama", dtype=torch.float16, max_shard_size="20KB")
    adapter = make_peft_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    adaptools.merge(base, adapter, out=tmp_path / "merged")
    base_index = json.loads((base / INDEX_NAME).read_text())
    index = json.loads((tmp_path / "merged" / INDEX_NAME).read_text())
    assert len(set(base_index["weight_map"].values())) > 1
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"]
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == sorted(p.name for p in base.iterdir())
    tensors = folder_tensors(tmp_path / "merged")
    assert all(t.dtype == torch.float16 for t in tensors.values())
    ref = peft_merged_logits(base, adapter)  # PEFT's merge in float32, on the fp16 weights loaded as float32
    assert relative_error(model_logits(tmp_path / "merged"), ref) < 20 * torch.finfo(torch.float16).eps


def test_max_shard_size_reshards_with_a_correct_index(llama_base, tmp_path):
    adapter = make_peft_adapter(llama_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    adaptools.merge(llama_base, adapter, out=tmp_path / "single")
    adaptools.merge(llama_base, adapter, out=tmp_path / "sharded", max_shard_size="30KB")
    index = json.loads((tmp_path / "sharded" / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    tensors = folder_tensors(tmp_path / "sharded")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:
        with safe_open(str(tmp_path / "sharded" / shard), framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        assert len(sizes) == 1 or sum(4 * math.prod(s) for s in sizes) <= 30_000
    single = folder_tensors(tmp_path / "single")
    assert tensors.keys() == single.keys() and all(torch.equal(tensors[k], single[k]) for k in tensors)
    assert torch.equal(model_logits(tmp_path / "sharded"), model_logits(tmp_path / "single"))


TILED_CASES = {
    "llama-lora-dora-embedding": ("llama", [dict(r=4, lora_alpha=8, target_modules="all-linear"),
                                            dict(r=2, lora_alpha=4, use_dora=True,
                                                 target_modules=["embed_tokens", "q_proj", "gate_proj"])]),
    "gpt2-conv1d-dora": ("gpt2", [dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                       use_dora=True)]),
}


@pytest.mark.parametrize(("dtype", "small_bytes"), [("fp32", 0), ("fp32", None), ("nf4", None)],
                         ids=["ranged", "gathered", "nf4"])  # an NF4 quant state's size is an estimate: gathered
@pytest.mark.parametrize("case", list(TILED_CASES))
def test_row_tiles_write_what_whole_steps_write(case, dtype, small_bytes, llama_base, gpt2_base, tmp_path,
                                                monkeypatch):
    """Merging in tiles of one row (written into planned byte ranges, or gathered in memory for small tensors)
    gives the tensors a merge of whole steps gives, for LoRA, DoRA (rows, and columns of Conv1D weights) and
    embeddings, several outputs at once; NF4 outputs are quantized from whole weights either way."""
    from adaptools.checkpoints import shards as checkpoint_writer

    merge_module = importlib.import_module("adaptools.merge.execute")
    arch, configs = TILED_CASES[case]
    base = llama_base if arch == "llama" else gpt2_base
    adapters = [make_peft_adapter(base, tmp_path / f"adapter{i}", seed=i + 1, **kw) for i, kw in enumerate(configs)]
    if small_bytes is not None:
        monkeypatch.setattr(checkpoint_writer, "SMALL_BYTES", small_bytes)
    monkeypatch.setattr(merge_module, "TILE_BYTES", {})
    adaptools.merge(base, adapters, out=tmp_path / "whole", each=True, dtype=dtype, device="cpu")
    monkeypatch.setattr(merge_module, "TILE_BYTES", {"cpu": 4})
    adaptools.merge(base, adapters, out=tmp_path / "tiled", each=True, dtype=dtype, device="cpu")
    for adapter in adapters:
        whole, tiled = folder_tensors(tmp_path / "whole" / adapter.name), folder_tensors(tmp_path / "tiled" / adapter.name)
        assert whole.keys() == tiled.keys()
        for key in whole:
            if dtype == "nf4":
                assert torch.equal(tiled[key], whole[key]), key
            else:  # one float32 rounding
                torch.testing.assert_close(tiled[key], whole[key], rtol=1e-6, atol=1e-7)


def test_each_writes_the_same_bytes_as_separate_merges(llama_base, tmp_path, runner):
    a = make_peft_adapter(llama_base, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules="all-linear")
    b = make_peft_adapter(llama_base, tmp_path / "b", seed=2, r=2, lora_alpha=4, use_dora=True,
                          target_modules=["q_proj", "down_proj"])
    result = run_cli(runner, "merge", llama_base, a, b, "--each", "--dtype", "bf16", "-o", tmp_path / "each")
    assert result.exit_code == 0, result.output
    assert "merged 14 modules" in result.output and "merged 4 modules" in result.output
    assert "peak memory" in result.output
    for adapter in (a, b):
        adaptools.merge(llama_base, adapter, out=tmp_path / "alone" / adapter.name, dtype="bf16")
        (tmp_path / "each" / adapter.name / "README.md").unlink()  # the CLI's model card; the library writes none
        assert same_files(tmp_path / "each" / adapter.name, tmp_path / "alone" / adapter.name)


def test_weighted_merge_equals_peft_cat_combination(llama_base, tmp_path, runner):
    from peft import PeftModel

    a = make_peft_adapter(llama_base, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = make_peft_adapter(llama_base, tmp_path / "b", seed=2, r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"])
    result = run_cli(runner, "merge", llama_base, a, b, "--weights", "0.7,-0.4", "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    model = PeftModel.from_pretrained(load_base(llama_base), a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "ab", combination_type="cat")
    model.set_adapter("ab")
    with torch.no_grad():
        ref = model.merge_and_unload(adapter_names=["ab"]).eval()(input_ids()).logits
    assert relative_error(model_logits(tmp_path / "merged"), ref) < FP32_RTOL


def test_kohya_file_merges_like_its_peft_folder(llama_base, tmp_path, runner):
    adapter = make_peft_adapter(llama_base, tmp_path / "peft", r=4, lora_alpha=8, target_modules="all-linear")
    adaptools.load(adapter).save(tmp_path / "lora.safetensors", format="kohya")
    result = run_cli(runner, "merge", llama_base, tmp_path / "lora.safetensors", "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert relative_error(model_logits(tmp_path / "merged"), peft_merged_logits(llama_base, adapter)) < FP32_RTOL


# --------------------------------------------------------------------------- PEFT's regression fixtures


def fixture_base(name: str) -> tuple[dict[str, torch.nn.Module], callable]:
    """The tiny torch base of a peft-regression fixture (README: modules built in order after manual_seed(0))."""
    from torch import nn
    from torch.nn import functional as F
    from transformers.pytorch_utils import Conv1D

    X = torch.arange(90).reshape(9, 10)
    torch.manual_seed(0)
    if name == "lora_conv2d":
        mods = {"conv2d": nn.Conv2d(5, 10, 3), "lin0": nn.Linear(10, 2)}
        images = X.float().reshape(2, 5, 3, 3)
        return mods, lambda: F.log_softmax(mods["lin0"](F.relu(mods["conv2d"](images)).flatten(1)), -1)
    if name == "lora_emb_conv1d":
        mods = {"emb": nn.Embedding(100, 5), "conv1d": Conv1D(1, 5), "lin0": nn.Linear(10, 2)}
        return mods, lambda: F.log_softmax(mods["lin0"](F.relu(mods["conv1d"](mods["emb"](X))).flatten(1)), -1)
    mods = {"lin0": nn.Linear(10, 20), "lin1": nn.Linear(20, 2)}
    return mods, lambda: F.log_softmax(mods["lin1"](F.relu(mods["lin0"](X.float()))), -1)


FIXTURES = ["lora_mlp", "lora_mlp_modules_to_save", "lora_conv2d", "lora_emb_conv1d", "adalora_mlp"]


@pytest.mark.parametrize("name", FIXTURES)
def test_peft_regression_fixture_reproduces_its_output(name, shared_fixtures, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = shared_fixtures / "peft-regression" / name
    mods, forward = fixture_base(name)
    (tmp_path / "base").mkdir()
    state = {f"{m}.{k}": t.detach().contiguous() for m, module in mods.items() for k, t in module.state_dict().items()}
    save_file(state, str(tmp_path / "base" / "model.safetensors"))
    with torch.no_grad():
        assert (forward() - torch.load(folder / "output.pt", map_location="cpu", weights_only=True)).abs().max() > 1e-3
    adaptools.merge(tmp_path / "base", folder, out=tmp_path / "merged", allow_pickle=True)
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for m, module in mods.items():
        module.load_state_dict({k.removeprefix(f"{m}."): t for k, t in merged.items() if k.startswith(f"{m}.")})
    expected = torch.load(folder / "output.pt", map_location="cpu", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(forward(), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- validation and errors


def test_unknown_modules_are_an_error_and_nothing_is_written(llama_base, gpt2_base, tmp_path, runner):
    adapter = make_peft_adapter(gpt2_base, tmp_path / "gpt2-adapter", r=2, target_modules=["c_attn"])
    result = run_cli(runner, "merge", llama_base, adapter, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "transformer.h.0.attn.c_attn.weight" in result.stderr
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    with pytest.raises(UnknownModuleError):
        adaptools.merge(llama_base, adapter, out=tmp_path / "out")


def test_shapes_that_do_not_fit_are_an_error(llama_base, tmp_path, runner):
    other = make_base(tmp_path / "wider", "llama", intermediate_size=64)
    adapter = make_peft_adapter(llama_base, tmp_path / "adapter", r=2, target_modules=["up_proj", "q_proj"])
    result = run_cli(runner, "merge", other, adapter, "-o", tmp_path / "out")
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "up_proj" in result.stderr
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    with pytest.raises(ShapeMismatchError):
        adaptools.merge(other, adapter, out=tmp_path / "out")


def test_fp16_overflow_names_the_modules_and_leaves_nothing(llama_base, tmp_path, runner):
    adapter = adaptools.load(make_peft_adapter(llama_base, tmp_path / "adapter", r=2,
                                               target_modules=["v_proj", "q_proj"]))
    big = {n: m.with_factors(m.B * (1e6 if "v_proj" in n else 1.0), m.A, m.scale) for n, m in adapter.items()}
    adapter.with_modules(big).save(tmp_path / "big")
    result = run_cli(runner, "merge", llama_base, tmp_path / "big", "--dtype", "fp16", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "float16 range" in result.stderr
    assert "model.layers.0.self_attn.v_proj.weight" in result.stderr and "q_proj" not in result.stderr
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    with pytest.raises(NonFiniteError):
        adaptools.merge(llama_base, tmp_path / "big", out=tmp_path / "out", dtype=torch.float16)
    adaptools.merge(llama_base, tmp_path / "big", out=tmp_path / "out", dtype="bf16")  # in range for bf16


def test_nan_in_the_base_is_an_error_naming_the_tensor(tmp_path):
    """A NaN in a merged base weight ends the merge (Adapter objects given directly, no PEFT folder)."""
    from safetensors.torch import save_file

    weight = torch.randn(6, 4)
    weight[2, 1] = float("nan")
    (tmp_path / "base").mkdir()
    save_file({"a.weight": weight, "b.weight": torch.randn(6, 4)}, str(tmp_path / "base" / "model.safetensors"))
    adapter = adaptools.Adapter({name: adaptools.LoraModule(A=torch.randn(2, 4), B=torch.randn(6, 2)) for name in "ab"})
    threads = torch.get_num_threads()
    with pytest.raises(NonFiniteError, match=r"NaN or Inf in 1 tensor\(s\): a\.weight$"):
        adaptools.merge(tmp_path / "base", adapter, out=tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert torch.get_num_threads() == threads  # the workers' single-threaded torch ops end with the merge


@pytest.mark.parametrize("io", ["buffered", "direct"])
def test_a_full_disk_is_one_error_line_and_leaves_nothing(llama_base, tmp_path, runner, monkeypatch, request, io):
    """A write failing half way (ENOSPC from a worker thread, or from the direct writer's) ends in one `error:`
    line, exit 2, no output."""
    import errno

    if io == "direct":
        request.getfixturevalue("direct_io")
    adapter = make_peft_adapter(llama_base, tmp_path / "adapter", r=2, target_modules=["q_proj", "v_proj"])
    real = os.pwrite
    writes = []

    def fill_up(fd, data, offset):
        if len(writes) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(offset)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", fill_up)
    result = run_cli(runner, "merge", llama_base, adapter, "--max-shard-size", "30KB", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "No space left on device" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_other_base_name_warns_and_existing_output_needs_overwrite(llama_base, tmp_path, runner):
    adapter = make_peft_adapter(llama_base, tmp_path / "adapter", r=2, target_modules=["q_proj"])
    other = shutil.copytree(llama_base, tmp_path / "renamed-base")
    result = run_cli(runner, "merge", other, adapter, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("warning: ") and str(llama_base) in result.stderr
    again = run_cli(runner, "merge", other, adapter, "-o", tmp_path / "out")
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert run_cli(runner, "merge", other, adapter, "-o", tmp_path / "out", "--overwrite").exit_code == 0
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("options", [["--weights", "1,2"], ["--max-shard-size", "5 parsecs"], ["--device", "tpu"]])
def test_bad_options_are_one_line_errors(options, llama_base, tmp_path, runner):
    adapter = make_peft_adapter(llama_base, tmp_path / "adapter", r=2, target_modules=["q_proj"])
    result = run_cli(runner, "merge", llama_base, adapter, *options, "-o", tmp_path / "out")
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_side_files_are_copied_and_weights_are_not(llama_base, tmp_path):
    base = shutil.copytree(llama_base, tmp_path / "base")
    (base / "tokenizer.json").write_text("{}")
    (base / "pytorch_model.bin").write_bytes(b"stale")
    adapter = make_peft_adapter(llama_base, tmp_path / "adapter", r=2, target_modules=["q_proj"])
    adaptools.merge(base, adapter, out=tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((base / "config.json").read_text())


def test_steps_alternate_between_shards_and_keep_each_shards_order():
    """Steps running at once should write different files: the execution order takes two shards at a time in turn
    (a shard that runs out is replaced by the next, so that only about two files are being written at once)."""
    from adaptools.checkpoints.stored import TensorSpec
    from adaptools.merge.plan import Step, interleave_shards

    specs = {f"{shard}.{i}": TensorSpec((4, 4), torch.float16, shard, 32) for shard, n in [("a", 3), ("b", 1), ("c", 2)]
             for i in range(n)}
    steps = [Step((key,)) for key in specs]
    order = [step.keys[0] for step in interleave_shards(steps, specs)]
    assert order == ["a.0", "b.0", "a.1", "c.0", "a.2", "c.1"]


def test_steps_take_an_order_fixed_by_their_key_names_that_mixes_the_parts_of_the_base():
    """Merges spread through the run whatever the adapter touches (an SDXL file holds its text encoders first), and
    the order, which is the output's tensor order, depends on the base alone."""
    from adaptools.checkpoints.stored import TensorSpec
    from adaptools.merge.plan import Step, mixed_order

    specs = {f"{part}.{i}.weight": TensorSpec((4, 4), torch.float16, "a", 32) for part in ("cond", "unet")
             for i in range(50)}
    steps = [Step((key,)) for key in specs]
    order = mixed_order(steps)
    assert set(order) == set(steps) and len(order) == len(steps)
    assert mixed_order(steps[::-1]) == order
    assert {step.keys[0].split(".")[0] for step in order[:25]} == {"cond", "unet"}
