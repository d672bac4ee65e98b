"""FP8 checkpoints through the merge pipeline, against compressed-tensors 0.20.1, DeepSeek's weight_quant rule and
transformers 5.25 on the CPU: merging into FP8 bases (kept FP8 in their own scheme, or written dequantized),
quantize-after-merge (`merge --dtype fp8`), `quantize --to fp8`, `--each`, and FP8 bases in extract, dora and
spectrum.

The reference for a requantized weight is the layout's quantizer applied to the same float32 merge, which
`merge --dtype fp32` writes exactly (the dequantized base plus ΔW); unchanged tensors must keep the base's bytes.
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
from fp8_factories import (
    FP8_LLAMA,
    ct_dequantize,
    ct_quantize,
    deepseek_quantize,
    is_quantized_linear,
    make_ct_fp8_base,
    make_fine_grained_base,
)

import adaptools

pytest.importorskip("compressed_tensors")

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("bf16") / "base", "llama", dtype=torch.bfloat16, **FP8_LLAMA)


@pytest.fixture(scope="module")
def adapter(bf16_base, tmp_path_factory) -> Path:
    return make_peft_adapter(bf16_base, tmp_path_factory.mktemp("adapter") / "lora", r=4, lora_alpha=8,
                             target_modules=TARGETS)


@pytest.fixture(scope="module")
def deltas(bf16_base, adapter) -> dict[str, torch.Tensor]:
    return peft_delta_weights(peft_model(bf16_base, adapter))


@pytest.fixture(scope="module", params=["tensor", "channel", "block", "fine-grained"])
def fp8_base(request, tmp_path_factory) -> tuple[str, Path]:
    """(strategy, folder) of the bf16 base's weights (same seed) saved by compressed-tensors, or in the fine-grained
    layout; the folder is named `base` like the bf16 base (no base-name warning)."""
    folder = tmp_path_factory.mktemp(request.param) / "base"
    if request.param == "fine-grained":
        return request.param, make_fine_grained_base(folder)
    return request.param, make_ct_fp8_base(folder, request.param)


def scale_key(strategy: str, key: str) -> str:
    return key + ("_scale_inv" if strategy == "fine-grained" else "_scale")


def reference_quantize(strategy: str, weight: torch.Tensor, scale_dtype: torch.dtype):
    return deepseek_quantize(weight) if strategy == "fine-grained" else ct_quantize(weight, strategy, scale_dtype)


def dequantized(strategy: str, tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """q·s of a stored FP8 weight in float32, by compressed-tensors' own decompress (float32 scales)."""
    q, scale = tensors[key], tensors[scale_key(strategy, key)].float()
    if strategy == "fine-grained":
        return ct_dequantize(q, scale, "block")
    return ct_dequantize(q, scale, strategy)


def test_merge_into_fp8_base_keeps_the_scheme_bit_exact(fp8_base, adapter, deltas, tmp_path, runner):
    strategy, base = fp8_base
    result = run_cli(runner, "merge", base, adapter, "--dtype", "fp32", "-o", tmp_path / "fp32")
    assert result.exit_code == 0 and not messages(result.stderr), result.output
    result = run_cli(runner, "merge", base, adapter, "-o", tmp_path / "fp8")
    assert result.exit_code == 0 and not messages(result.stderr), result.output
    assert "ΔW surviving FP8 requantization: mean" in result.stdout and "14 weights quantized" in result.stdout

    stored, dense, ours = folder_tensors(base), folder_tensors(tmp_path / "fp32"), folder_tensors(tmp_path / "fp8")
    quantized = [k for k, v in stored.items() if v.dtype == torch.float8_e4m3fn]
    assert len(quantized) == 14
    # FP8 → fp32: the dequantized base plus ΔW, no quantization_config and no scale tensors
    assert "quantization_config" not in config(tmp_path / "fp32") and dense.keys() == {
        k for k in stored if not k.endswith(("_scale", "_scale_inv", "input_scale"))}
    for key in quantized:
        delta = deltas.get(key.removesuffix(".weight"))
        expected = dequantized(strategy, stored, key) + (0 if delta is None else delta)
        torch.testing.assert_close(dense[key], expected, rtol=1e-6, atol=1e-7)

    # FP8 → FP8: same keys, dtypes and config; merged weights and scales are the reference quantizer's of that
    # float32 merge in the base's scale dtype, every other tensor (input scales included) the base's bytes
    assert ours.keys() == stored.keys() and config(tmp_path / "fp8") == config(base)
    for key, value in stored.items():
        module = key.rsplit(".", 1)[0]
        if module not in deltas:
            assert value.dtype == ours[key].dtype and torch.equal(value.view(torch.uint8), ours[key].view(torch.uint8))
        elif key.endswith(".weight"):
            q, scale = reference_quantize(strategy, dense[key], stored[scale_key(strategy, key)].dtype)
            assert torch.equal(ours[key].view(torch.uint8), q.view(torch.uint8)), key
            assert torch.equal(ours[scale_key(strategy, key)], scale.reshape(stored[scale_key(strategy, key)].shape))

    # survival (in the recipe's report) = <deq(ours) − W, ΔW> / |ΔW|²
    rows = json.loads((tmp_path / "fp8" / "adaptools_recipe.json").read_text())["report"]
    assert sorted(row["module"] for row in rows) == sorted(deltas)
    for row in rows:
        key, delta = f"{row['module']}.weight", deltas[row["module"]]
        kept = (dequantized(strategy, ours, key) - dequantized(strategy, stored, key)).mul(delta).sum()
        assert row["survival"] == pytest.approx((kept / delta.square().sum()).item(), rel=1e-4)


def test_merge_each_into_fp8_base_equals_single_merges(adapter, bf16_base, tmp_path):
    base = make_ct_fp8_base(tmp_path / "ct" / "base", "block")
    other = make_peft_adapter(bf16_base, tmp_path / "adapters" / "other", seed=9, r=2,
                              target_modules=["q_proj", "up_proj"])  # q_proj in both: one decoded base for two
    report = adaptools.merge(base, [adapter, other], out=tmp_path / "each", each=True)
    assert report.dtype == "fp8" and set(report.survival) == {"lora", "other"}
    for name, path in (("lora", adapter), ("other", other)):
        adaptools.merge(base, path, out=tmp_path / "single" / name)
        single, each = folder_tensors(tmp_path / "single" / name), folder_tensors(tmp_path / "each" / name)
        assert single.keys() == each.keys()
        assert all(torch.equal(single[k].view(torch.uint8), each[k].view(torch.uint8)) for k in single)


def test_quantize_to_fp8_equals_compressed_tensors_checkpoint(bf16_base, tmp_path, runner):
    """`quantize --to fp8 --fp8-scheme channel` of the bf16 base writes the tensors compressed-tensors' own
    ModelCompressor saved for the same weights (FP8_DYNAMIC preset), and transformers loads it."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out = tmp_path / "fp8"
    result = run_cli(runner, "quantize", bf16_base, "--to", "fp8", "--fp8-scheme", "channel", "-o", out)
    assert result.exit_code == 0 and not messages(result.stderr), result.output
    assert "quantized 14 weights to FP8" in result.stdout
    reference = make_ct_fp8_base(tmp_path / "reference", "channel")
    ours, theirs = folder_tensors(out), folder_tensors(reference)
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == v.dtype and torch.equal(ours[k].view(torch.uint8), v.view(torch.uint8))
               for k, v in theirs.items())
    group = config(out)["quantization_config"]["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["targets"] == ["Linear"]
    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    weights = dict(model.named_parameters())
    for key in (k for k in ours if ours[k].dtype == torch.float8_e4m3fn):
        assert torch.equal(weights[key], ct_dequantize(ours[key], ours[key + "_scale"], "channel")), key


def test_merge_to_fp8_loads_in_transformers_close_to_the_bf16_merge(bf16_base, adapter, tmp_path, runner):
    """bf16 base + LoRA --dtype fp8 (compressed-tensors, 128x128 blocks): each weight is compressed-tensors'
    quantization of the bf16 merge; transformers loads it (dequantize=True) with logits close to the bf16 merge's."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    assert run_cli(runner, "merge", bf16_base, adapter, "-o", tmp_path / "bf16").exit_code == 0
    result = run_cli(runner, "merge", bf16_base, adapter, "--dtype", "fp8", "-o", tmp_path / "fp8")
    assert result.exit_code == 0 and not messages(result.stderr), result.output
    assert "14 weights quantized" in result.stdout and "surviving" not in result.stdout
    merged, ours = folder_tensors(tmp_path / "bf16"), folder_tensors(tmp_path / "fp8")
    for key, value in merged.items():
        if is_quantized_linear(key, value):
            q, scale = ct_quantize(value, "block", torch.bfloat16)
            assert torch.equal(ours[key].view(torch.uint8), q.view(torch.uint8)) and torch.equal(
                ours[key + "_scale"], scale)
        else:
            assert torch.equal(ours[key], value)
    assert config(tmp_path / "fp8")["quantization_config"]["ignore"] == ["lm_head", "model.embed_tokens"]
    fp8 = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", quantization_config=CompressedTensorsConfig(
        dequantize=True), dtype=torch.float32).eval()
    weights = dict(fp8.named_parameters())
    assert all(torch.equal(weights[k], ct_dequantize(ours[k], ours[k + "_scale"], "block").float())
               for k in ours if ours[k].dtype == torch.float8_e4m3fn)
    with torch.no_grad():
        a, merged, base = (model(input_ids()).logits for model in (fp8, *(AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32).eval() for path in (tmp_path / "bf16", bf16_base))))
    error = ((a - merged).norm() / merged.norm()).item()
    assert error < 0.1 and error < ((a - base).norm() / base.norm()).item() / 2  # e4m3 steps are 6%; ΔW matters


def test_fine_grained_output_loads_in_transformers(tmp_path, runner):
    """`quantize --to fp8 --fp8-format fine-grained` (DeepSeek's rule, weight_scale_inv): transformers' fine-grained
    FP8 loader dequantizes it on the CPU (every dimension a multiple of 128) to q·s."""
    from transformers import AutoModelForCausalLM

    base = make_base(tmp_path / "base", "llama", dtype=torch.bfloat16, hidden_size=128, intermediate_size=256,
                     num_key_value_heads=4)
    out = tmp_path / "fp8"
    result = run_cli(runner, "quantize", base, "--to", "fp8", "--fp8-format", "fine-grained", "-o", out)
    assert result.exit_code == 0 and not messages(result.stderr), result.output
    stored, ours = folder_tensors(base), folder_tensors(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    weights = dict(model.named_parameters())
    for key, value in stored.items():
        if is_quantized_linear(key, value):
            q, scale = deepseek_quantize(value)
            assert torch.equal(ours[key].view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(ours[key + "_scale_inv"], scale)
            torch.testing.assert_close(weights[key], ct_dequantize(q, scale, "block"), rtol=0, atol=0)


def test_fp8_from_nf4_base_and_errors(bf16_base, tmp_path, runner):
    """An NF4 base quantized to FP8 (dequantized first, no NF4 tensor left); FP8 options that do not apply are
    one error line."""
    nf4 = tmp_path / "nf4"
    adaptools.quantize(bf16_base, nf4)
    report = adaptools.quantize(nf4, tmp_path / "fp8", to="fp8", fp8_scheme="tensor")
    ours = folder_tensors(tmp_path / "fp8")
    assert report.quantized == 14 and not any(".absmax" in k or "quant_state" in k for k in ours)
    assert config(tmp_path / "fp8")["quantization_config"]["quant_method"] == "compressed-tensors"
    base = make_ct_fp8_base(tmp_path / "ct" / "base", "block")
    for options in (["quantize", base, "--to", "fp8"], ["quantize", bf16_base, "--to", "fp8", "--blocksize", "64"],
                    ["quantize", bf16_base, "--fp8-scheme", "tensor"],
                    ["quantize", bf16_base, "--to", "fp8", "--fp8-format", "fine-grained", "--fp8-scheme", "channel"],
                    ["merge", base, tmp_path / "missing", "--fp8-scheme", "tensor"]):
        assert_no_output(run_cli(runner, *options, "-o", tmp_path / "out"), tmp_path / "out")


def test_extract_dora_and_spectrum_read_fp8_bases(fp8_base, adapter, deltas, tmp_path):
    """extract from an FP8 base recovers the LoRA merged into its fp32 dequantization (no traceback: the scales
    are side tensors of their weights); dora --base and spectrum --base use the dequantized weights."""
    strategy, base = fp8_base
    if strategy in ("tensor", "channel"):
        pytest.skip("one per-tensor layout suffices here")
    adaptools.merge(base, adapter, out=tmp_path / "tuned", dtype="fp32")
    extracted, _ = adaptools.extract(base, tmp_path / "tuned", rank=4)
    assert sorted(extracted.modules) == sorted(deltas)
    for name, delta in deltas.items():
        torch.testing.assert_close(extracted[name].delta(), delta, rtol=1e-3, atol=1e-5)

    stored = folder_tensors(base)
    lora = adaptools.load(adapter)
    dora = adaptools.to_dora(lora, base)
    for name in deltas:
        W = dequantized(strategy, stored, f"{name}.weight")
        torch.testing.assert_close(dora[name].magnitude, (W + lora[name].delta()).norm(dim=1), rtol=1e-5, atol=1e-6)
    doc = adaptools.spectrum(lora, base=base)
    for name in deltas:
        W = dequantized(strategy, stored, f"{name}.weight")
        assert doc["modules"][name]["base_frobenius_norm"] == pytest.approx(W.double().norm().item(), rel=1e-5)


def edit_tensors(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


Q = "model.layers.0.self_attn.q_proj.weight"
HOSTILE = {
    "nan scale": ("ct", lambda t: t[Q + "_scale"].view(-1).__setitem__(0, float("nan")), Q + "_scale"),
    "zero scale": ("ct", lambda t: t[Q + "_scale"].view(-1).__setitem__(-1, 0.0), "finite, positive"),
    "negative scale": ("fg", lambda t: t[Q + "_scale_inv"].view(-1).__setitem__(0, -1.0), Q + "_scale_inv"),
    "huge scale": ("fg", lambda t: t[Q + "_scale_inv"].view(-1).__setitem__(0, 1e37), "at most"),
    "missing scale": ("ct", lambda t: t.pop(Q + "_scale"), f"has no scale tensor '{Q}_scale'"),
    "scale shape": ("ct", lambda t: t.__setitem__(Q + "_scale", t[Q + "_scale"].reshape(-1)), "of shape [2, 2]"),
    "int scale": ("fg", lambda t: t.__setitem__(Q + "_scale_inv", t[Q + "_scale_inv"].to(torch.int32)), "float tensor"),
    "e5m2 weight": ("ct", lambda t: t.__setitem__(Q, t[Q].to(torch.float8_e5m2)), "only F8_E4M3"),
    "block size": ("fg", {"weight_block_size": [0, 128]}, "weight_block_size must be two positive integers"),
    "block type": ("fg", {"weight_block_size": "128"}, "weight_block_size"),
    "fmt": ("fg", {"fmt": "e5m2"}, "fmt 'e5m2' is not supported"),
    "ue8m0": ("fg", {"scale_fmt": "ue8m0"}, "scale_fmt"),
    "strategy": ("ct", {"config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "float", "strategy": "group", "symmetric": True}}}}, "strategy 'group'"),
    "int weights": ("ct", {"config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "strategy": "channel"}}}}, "8-bit float"),
    "no group": ("ct", {"config_groups": {"g": {"targets": ["re:lm_head"], "weights": {
        "num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]}}}},
                 "matches no config group"),
    "no config": ("ct", None, "declares no FP8 quantization_config"),
    "static without input scale": ("fg", {"activation_scheme": "static"}, "static activation scheme"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_scales_and_configs_are_one_error_line(case, adapter, tmp_path, runner):
    which, change, fragment = HOSTILE[case]
    base = tmp_path / "base"
    make_ct_fp8_base(base, "block") if which == "ct" else make_fine_grained_base(base)
    if change is None or isinstance(change, dict):
        data = config(base)
        if change is None:
            data.pop("quantization_config")
        else:
            data["quantization_config"].update(change)
        (base / "config.json").write_text(json.dumps(data))
    else:
        edit_tensors(base, change)
    for command in (["merge", base, adapter], ["extract", base, base, "--rank", "2"]):
        result = run_cli(runner, *command, "-o", tmp_path / "out")
        assert_no_output(result, tmp_path / "out")
        assert fragment in result.stderr, result.stderr


def test_small_updates_warn_that_fp8_requantization_erases_them(adapter, tmp_path):
    base = make_ct_fp8_base(tmp_path / "ct" / "base", "channel")
    lora = adaptools.load(adapter)
    small = lora.with_modules({n: m.with_factors(m.B * 1e-4, m.A, m.scale) for n, m in lora.items()})
    with pytest.warns(UserWarning, match=r"FP8 requantization keeps less than 50% .*--dtype fp8\)"):
        report = adaptools.merge(base, small, out=tmp_path / "out")
    assert report.dtype == "fp8" and len(report.survival["out"]) == 6
    assert all(v < 0.5 for v in report.survival["out"].values())


def test_quantize_to_fp8_with_skip_lists_the_kept_modules_and_loads(bf16_base, tmp_path):
    """`--skip down_proj`: those weights stay bf16 and are named in `ignore`, so compressed-tensors leaves them
    nn.Linear when transformers loads the output (else it would look for their scales)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    report = adaptools.quantize(bf16_base, tmp_path / "fp8", to="fp8", skip=["down_proj"])
    ours, stored = folder_tensors(tmp_path / "fp8"), folder_tensors(bf16_base)
    ignore = config(tmp_path / "fp8")["quantization_config"]["ignore"]
    assert report.quantized == 12 and ignore == ["lm_head", "model.embed_tokens", "model.layers.0.mlp.down_proj",
                                                 "model.layers.1.mlp.down_proj"]
    kept = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]
    assert all(torch.equal(ours[key], stored[key]) for key in kept)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", quantization_config=CompressedTensorsConfig(
        dequantize=True))
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, stored["model.layers.1.mlp.down_proj.weight"])
