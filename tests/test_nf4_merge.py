"""NF4 checkpoints through the merge pipeline, against transformers + bitsandbytes (CPU) and PEFT:
`adaptools quantize`, quantize-after-merge (`merge --dtype nf4`), merging into an NF4 base that transformers
saved (kept NF4, or written dequantized), the survival report and warning, and the CLI's errors.

The tiny Llama has hidden 64 and intermediate 128: bitsandbytes' CPU Linear4bit forward (AVX512-BF16) needs
in_features % 64 == 0 and out_features % 32 == 0. Quantized models are saved before any forward (a CPU forward
repacks the weights in place).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from factories import (
    assert_no_output,
    config,
    folder_tensors,
    input_ids,
    make_base,
    make_peft_adapter,
    messages,
    peft_delta_weights,
    peft_model,
)

import adaptools
from adaptools.checkpoints.shards import INDEX_NAME
from adaptools.checkpoints.nf4_quant import QUANT_STATE_SUFFIX

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

LLAMA = dict(hidden_size=64, intermediate_size=128)
QLORA = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
             bnb_4bit_compute_dtype="bfloat16")


def load(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **kwargs).eval()


def load_4bit(path: Path, **options):
    """transformers' own NF4 quantization of an unquantized checkpoint (BitsAndBytesConfig)."""
    from transformers import BitsAndBytesConfig

    return load(path, quantization_config=BitsAndBytesConfig(**{**QLORA, **options}))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids()).logits


def nf4_weights(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.removesuffix(QUANT_STATE_SUFFIX) for k in tensors if k.endswith(QUANT_STATE_SUFFIX))


def bnb_dequantize(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit of NF4 weight `key` from checkpoint tensors."""
    stats = {k.removeprefix(f"{key}."): v for k, v in tensors.items() if k.startswith(f"{key}.")}
    return F.dequantize_4bit(tensors[key], F.QuantState.from_dict(stats, device=torch.device("cpu")))


def bnb_quantize(weight: torch.Tensor, key: str, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """The checkpoint tensors bitsandbytes writes for `weight` quantized to NF4 (blocksize 64)."""
    packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    return {key: packed} | {f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()}


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("bf16") / "base", "llama", dtype=torch.bfloat16, **LLAMA)


@pytest.fixture(scope="module")
def nf4_base(bf16_base, tmp_path_factory) -> Path:
    """The bf16 base as transformers saves it after loading in 4-bit (double quant), in several shards; the folder
    is also named `base`, so adapters made on the bf16 base raise no base-name warning."""
    folder = tmp_path_factory.mktemp("nf4") / "base"
    load_4bit(bf16_base).save_pretrained(folder, max_shard_size="20KB")
    return folder


# --------------------------------------------------------------------------- quantize


def test_quantize_equals_transformers_quantization_and_loads_as_linear4bit(bf16_base, tmp_path, runner):
    """`quantize --skip down_proj` writes the tensors transformers + bitsandbytes write for the same weights and
    skip modules; transformers loads it with Linear4bit layers (nn.Linear where skipped) and the same logits."""
    out = tmp_path / "nf4"
    result = run_cli(runner, "quantize", bf16_base, "--skip", "down_proj", "-o", out)
    assert result.exit_code == 0, result.output
    assert "quantized 12 weights to NF4" in result.stdout and not messages(result.stderr)
    assert (out / "README.md").exists() and (out / "adaptools_recipe.json").exists()
    skip = config(out)["quantization_config"]["llm_int8_skip_modules"]
    assert "down_proj" in skip
    reference = load_4bit(bf16_base, llm_int8_skip_modules=skip)
    reference.save_pretrained(tmp_path / "reference")
    ours, theirs = folder_tensors(out), folder_tensors(tmp_path / "reference")
    assert ours.keys() == theirs.keys() and len(nf4_weights(ours)) == 12
    assert all(ours[k].dtype == v.dtype and torch.equal(ours[k], v) for k, v in theirs.items())
    base = folder_tensors(bf16_base)
    assert all(torch.equal(ours[k], base[k]) for k in base if "down_proj" in k or "embed" in k or "norm" in k)
    assert config(out)["quantization_config"] == config(tmp_path / "reference")["quantization_config"]

    model = load(out)
    assert isinstance(model.model.layers[1].self_attn.k_proj, bnb.nn.Linear4bit)
    assert type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert torch.equal(logits(model), logits(reference))


def test_skip_patterns_follow_transformers_rule():
    from transformers.quantizers.quantizers_utils import should_convert_module

    from adaptools.checkpoints.quantizing import DEFAULT_SKIP, skipped

    names = ["lm_head", "model.embed_tokens", "transformer.wte", "gpt_neox.embed_out", "model.layers.1.mlp.down_proj",
             "model.layers.11.mlp.gate_proj", "model.layers.1.self_attn.q_proj", "transformer.h.0.attn.c_attn"]
    patterns = [*DEFAULT_SKIP, "down_proj", "model.layers.1", r"model\.layers\.\d+\.mlp", "mlp.gate", "proj", "attn"]
    for name in names:
        for pattern in patterns:
            assert skipped(name, [pattern]) == (not should_convert_module(name, [pattern])), (name, pattern)
    assert [n for n in names if skipped(n, DEFAULT_SKIP)] == names[:4]


def test_gpt2_conv1d_weights_are_quantized_and_merged_transposed(tmp_path):
    """GPT-2's Conv1D weights (stored (in, out)) are quantized transposed, as transformers does (here without
    double quant); merging into that NF4 base sees them in the stored layout again (fan_in_fan_out adapter).
    n_embd 64: bitsandbytes' CPU dequantize is wrong for a last dimension that is not a multiple of 64."""
    gpt2_base = make_base(tmp_path / "gpt2", "gpt2", n_embd=64)
    nf4 = tmp_path / "nf4" / "gpt2"  # named like the base: no base-name warning
    report = adaptools.quantize(gpt2_base, nf4, double_quant=False)
    load_4bit(gpt2_base, bnb_4bit_use_double_quant=False).save_pretrained(tmp_path / "reference")
    ours, theirs = folder_tensors(nf4), folder_tensors(tmp_path / "reference")
    assert report.quantized == 8 and len(nf4_weights(ours)) == 8 and ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())

    adapter = make_peft_adapter(gpt2_base, tmp_path / "adapter", r=2, target_modules=["c_attn", "c_fc"],
                                fan_in_fan_out=True)
    adaptools.merge(nf4, adapter, out=tmp_path / "merged", dtype="fp32")
    merged, deltas = folder_tensors(tmp_path / "merged"), peft_delta_weights(peft_model(gpt2_base, adapter))
    for key in nf4_weights(ours):
        W = bnb_dequantize(ours, key).float().T
        expected = W + deltas[key.removesuffix(".weight")] if key.removesuffix(".weight") in deltas else W
        torch.testing.assert_close(merged[key], expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- quantize after merge


def test_merge_to_nf4_equals_peft_merge_quantized_by_bitsandbytes(tmp_path, runner):
    """fp32 base + LoRA --dtype nf4: the logits of PEFT's merge_and_unload (fp32), saved and loaded in 4-bit."""
    base = make_base(tmp_path / "base", "llama", **LLAMA)
    adapter = make_peft_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    out = tmp_path / "merged"
    result = run_cli(runner, "merge", base, adapter, "--dtype", "nf4", "-o", out)
    assert result.exit_code == 0, result.output
    assert "14 weights quantized" in result.stdout and "surviving" not in result.stdout
    peft_model(base, adapter).merge_and_unload().save_pretrained(tmp_path / "peft-merged")
    reference = load_4bit(tmp_path / "peft-merged")
    model = load(out)
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert config(out)["quantization_config"]["bnb_4bit_use_double_quant"] is True
    assert torch.equal(logits(model), logits(reference))
    assert not torch.equal(logits(model), logits(load_4bit(base)))  # the adapter matters


# --------------------------------------------------------------------------- merging into an NF4 base


def test_merge_into_nf4_base_keeps_nf4_and_equals_dequantize_merge_by_hand(bf16_base, nf4_base, tmp_path, runner):
    adapter = make_peft_adapter(bf16_base, tmp_path / "adapter", r=4, lora_alpha=8,
                                target_modules=["q_proj", "v_proj", "down_proj"])
    result = run_cli(runner, "merge", nf4_base, adapter, "--dtype", "bf16", "-o", tmp_path / "bf16")
    assert result.exit_code == 0 and not messages(result.stderr), result.output
    result = run_cli(runner, "merge", nf4_base, adapter, "-o", tmp_path / "nf4")
    assert result.exit_code == 0 and not messages(result.stderr), result.output
    assert "ΔW surviving NF4 requantization: mean" in result.stdout

    stored, dense, ours = folder_tensors(nf4_base), folder_tensors(tmp_path / "bf16"), folder_tensors(tmp_path / "nf4")
    deltas = peft_delta_weights(peft_model(bf16_base, adapter))
    # NF4 → bf16: the dequantized base plus ΔW (float32), rounded to bf16; no quantization_config
    assert "quantization_config" not in config(tmp_path / "bf16") and config(tmp_path / "bf16")["dtype"] == "bfloat16"
    for key in nf4_weights(stored):
        W = bnb_dequantize(stored, key)
        delta = deltas.get(key.removesuffix(".weight"))
        expected = W if delta is None else (W.float() + delta).to(torch.bfloat16)
        torch.testing.assert_close(dense[key], expected, rtol=torch.finfo(torch.bfloat16).eps, atol=0)
    assert type(load(tmp_path / "bf16").model.layers[0].self_attn.q_proj) is torch.nn.Linear

    # NF4 → NF4: same keys, shards and config; merged weights are bitsandbytes' quantization of that bf16 merge,
    # the others the base's bytes
    assert ours.keys() == stored.keys() and config(tmp_path / "nf4") == config(nf4_base)
    assert json.loads((tmp_path / "nf4" / INDEX_NAME).read_text())["weight_map"] == json.loads(
        (nf4_base / INDEX_NAME).read_text())["weight_map"]
    for key in nf4_weights(stored):
        expected = bnb_quantize(dense[key], key) if key.removesuffix(".weight") in deltas else stored
        group = [k for k in ours if k == key or k.startswith(f"{key}.")]
        assert all(torch.equal(ours[k], expected[k]) for k in group), key
    assert isinstance(load(tmp_path / "nf4").model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)

    # survival (recorded in the recipe's per-module report) = <deq(ours) − W, ΔW> / |ΔW|², computed with bitsandbytes
    rows = json.loads((tmp_path / "nf4" / "adaptools_recipe.json").read_text())["report"]
    assert sorted(row["module"] for row in rows) == sorted(deltas)
    for row in rows:
        key, delta = f"{row['module']}.weight", deltas[row["module"]]
        kept = (bnb_dequantize(ours, key).float() - bnb_dequantize(stored, key).float()).mul(delta).sum()
        assert row["survival"] == pytest.approx((kept / delta.square().sum()).item(), rel=1e-3)
        assert 0.5 < row["survival"] < 1.1


def test_small_updates_warn_that_requantization_erases_them(bf16_base, nf4_base, tmp_path, runner):
    adapter = adaptools.load(make_peft_adapter(bf16_base, tmp_path / "adapter", r=4, lora_alpha=8,
                                               target_modules=["q_proj", "up_proj"]))
    small = adapter.with_modules({n: m.with_factors(m.B * 0.01, m.A, m.scale) for n, m in adapter.items()})
    small.save(tmp_path / "small")
    result = run_cli(runner, "merge", nf4_base, tmp_path / "small", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    [warning] = messages(result.stderr)
    assert warning.startswith("warning: ") and "--dtype nf4" in warning and "4 of 4 modules" in warning

    with pytest.warns(UserWarning, match="quantize after the merge"):
        report = adaptools.merge(nf4_base, small, out=tmp_path / "lib")
    assert report.dtype == "nf4" and report.quantized == 14 and report.modules == {"lib": 4}
    assert len(report.survival["lib"]) == 4 and all(v < 0.5 for v in report.survival["lib"].values())
    assert json.loads(json.dumps(report.to_dict()))["survival"] == report.survival


# --------------------------------------------------------------------------- errors


ERRORS = {
    "nf4-base-other-double-quant": ("nf4", "merge", "--no-double-quant"),
    "double-quant-for-dequantized-output": ("nf4", "merge", "--dtype", "bf16", "--double-quant"),
    "double-quant-without-nf4": ("bf16", "merge", "--double-quant"),
    "quantize-nf4-base": ("nf4", "quantize"),
    "skip-matching-nothing": ("bf16", "quantize", "--skip", "mlp.gate"),
    "skip-not-a-regex": ("bf16", "quantize", "--skip", "q_proj("),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_options_are_one_line_errors_and_write_nothing(case, bf16_base, nf4_base, tmp_path, runner):
    which, command, *options = ERRORS[case]
    base = nf4_base if which == "nf4" else bf16_base
    inputs = [base]
    if command == "merge":
        inputs.append(make_peft_adapter(bf16_base, tmp_path / "adapter", r=2, target_modules=["q_proj"]))
    result = run_cli(runner, command, *inputs, *options, "-o", tmp_path / "out")
    assert_no_output(result, tmp_path / "out")


def test_retained_fraction_leaves_its_inputs_alone():
    """merge --each measures every output against the same decoded base: measuring must not change it."""
    from adaptools.checkpoints.nf4 import retained_fraction

    base, after, merged = (torch.randn(64, 32, generator=torch.Generator().manual_seed(i)) for i in range(3))
    kept = base.clone()
    retained_fraction(base, after, merged)
    assert torch.equal(base, kept)
