"""Exact adapter arithmetic against PEFT's own ΔW (get_delta_weight) and PEFT's forward with several adapters active."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import run_cli
from factories import input_ids, load_base, make_peft_adapter, peft_delta_weights, peft_logits

import adaptools
from adaptools import Adapter, LoraModule
from adaptools.errors import DoraError, InvalidArgumentError, ShapeMismatchError

TOL = 1e-5


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def peft_model(base, adapters: dict, loader=load_base):
    """A PeftModel with each named adapter folder loaded under its name."""
    from peft import PeftModel

    (first, path), *rest = adapters.items()
    model = PeftModel.from_pretrained(loader(base), path, adapter_name=first)
    for name, p in rest:
        model.load_adapter(p, adapter_name=name)
    return model.eval()


def expected_deltas(model, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Σ w_i·ΔW_i with each ΔW_i from PEFT's get_delta_weight (modules of one adapter only carry its term)."""
    total: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        for path, delta in peft_delta_weights(model, name).items():
            total[path] = total.get(path, 0) + w * delta
    return total


class Tiny(torch.nn.Module):
    """Embedding, Conv2d (3x3) and Linear: the three LoRA layer kinds in one small torch model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 6)
        self.conv = torch.nn.Conv2d(2, 5, 3)
        self.lin = torch.nn.Linear(6, 4)


def tiny_adapter(path, seed: int, **lora_kwargs):
    from factories import randomize_adapter
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(Tiny(), LoraConfig(**lora_kwargs))
    randomize_adapter(model, seed)
    model.save_pretrained(path)
    return path


CASES = {
    # rank/alpha patterns, rsLoRA, different target sets, a negative weight
    "llama": dict(
        arch="llama_base",
        a=dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 4},
               alpha_pattern={"up_proj": 3}),
        b=dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "v_proj", "down_proj"]),
        weights=(0.7, -1.3),
    ),
    # LoRA biases (Σ w·s·b)
    "llama-bias": dict(
        arch="llama_base",
        a=dict(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"], lora_bias=True),
        b=dict(r=6, lora_alpha=3, target_modules=["o_proj", "gate_proj"], lora_bias=True),
        weights=(-0.5, 2.0),
    ),
    # fan_in_fan_out (GPT-2 Conv1D) and an embedding
    "gpt2": dict(
        arch="gpt2_base",
        a=dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True),
        b=dict(r=2, lora_alpha=2, use_rslora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        weights=(1.5, -0.25),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_combine_equals_weighted_peft_deltas(case, request, tmp_path):
    spec = CASES[case]
    base = request.getfixturevalue(spec["arch"])
    paths = {  # PEFT adapter names must not be substrings of "lora_"
        "first": make_peft_adapter(base, tmp_path / "a", seed=1, save_embedding_layers=False, **spec["a"]),
        "second": make_peft_adapter(base, tmp_path / "b", seed=2, save_embedding_layers=False, **spec["b"]),
    }
    weights = dict(zip(paths, spec["weights"]))
    model = peft_model(base, paths)
    expected = expected_deltas(model, weights)

    result = adaptools.combine([adaptools.load(p) for p in paths.values()], list(weights.values()))
    assert set(result.modules) == set(expected)
    for name, ref in expected.items():
        assert rel_err(result.delta(name), ref) <= TOL, name
        assert result[name].rank == sum(model.base_model.model.get_submodule(name).r.get(k, 0) for k in paths)

    # what PEFT reads back from the written folder is the same update
    result.save(tmp_path / "sum")
    written = peft_delta_weights(peft_model(base, {"default": tmp_path / "sum"}))
    assert set(written) == set(expected)
    for name, ref in expected.items():
        assert rel_err(written[name], ref) <= TOL, name

    if spec["a"].get("lora_bias"):
        for name in expected:
            layer = model.base_model.model.get_submodule(name)
            ref = sum(w * layer.scaling[k] * layer.lora_B[k].bias for k, w in weights.items() if k in layer.lora_B)
            assert rel_err(result[name].bias, ref.detach()) <= TOL


def test_combine_conv_embedding_linear(tmp_path):
    a = tiny_adapter(tmp_path / "a", 1, r=3, lora_alpha=6, target_modules=["emb", "conv", "lin"])
    b = tiny_adapter(tmp_path / "b", 2, r=2, lora_alpha=5, use_rslora=True, target_modules=["conv", "lin"])
    weights = {"first": 0.4, "second": -2.0}
    expected = expected_deltas(peft_model(None, {"first": a, "second": b}, loader=lambda _: Tiny()), weights)
    result = adaptools.combine([adaptools.load(a), adaptools.load(b)], list(weights.values()))
    assert {m.kind for _, m in result.items()} == {"embedding", "conv", "linear"}
    for name, ref in expected.items():
        assert result.delta(name).shape == ref.shape
        assert rel_err(result.delta(name), ref) <= TOL, name


def test_sum_matches_peft_with_both_adapters_active(llama_base, tmp_path):
    a = make_peft_adapter(llama_base, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = make_peft_adapter(llama_base, tmp_path / "b", seed=2, r=2, lora_alpha=2, use_rslora=True,
                          target_modules=["v_proj", "down_proj"])
    model = peft_model(llama_base, {"first": a, "second": b})
    model.base_model.set_adapter(["first", "second"])
    with torch.no_grad():
        both = model(input_ids()).logits
    (adaptools.load(a) + adaptools.load(b)).save(tmp_path / "sum")
    ours = peft_logits(llama_base, tmp_path / "sum")
    base = load_base(llama_base)(input_ids()).logits.detach()
    assert rel_err(ours - base, both - base) <= 1e-4
    assert rel_err(ours, both) <= 1e-6


@pytest.fixture()
def small():
    g = torch.Generator().manual_seed(0)

    def module(m: int, r: int, n: int, scale: float, **kw) -> LoraModule:
        return LoraModule(A=torch.randn(r, n, generator=g), B=torch.randn(m, r, generator=g), scale=scale, **kw)

    a = Adapter({"x": module(12, 3, 8, 2.0), "y": module(5, 2, 8, 0.5)})
    b = Adapter({"x": module(12, 4, 8, 1.5), "z": module(6, 1, 7, 3.0)})
    return a, b, module


def dense(adapter: Adapter, names) -> dict[str, torch.Tensor]:
    return {n: adapter.delta(n) if n in adapter else 0 for n in names}


def test_operators_and_helpers(small):
    a, b, _ = small
    names = ["x", "y", "z"]
    da, db = dense(a, names), dense(b, names)
    cases = {
        "a + b": (a + b, {n: da[n] + db[n] for n in names}),
        "a - b": (a - b, {n: da[n] - db[n] for n in names}),
        "0.7 * a": (0.7 * a, {n: 0.7 * da[n] for n in names[:2]}),
        "a * -2": (a * -2, {n: -2 * da[n] for n in names[:2]}),
        "-a": (-a, {n: -da[n] for n in names[:2]}),
        "negate": (adaptools.negate(b), {n: -db[n] for n in ("x", "z")}),
        "interpolate": (adaptools.interpolate(a, b, 0.3), {n: 0.7 * da[n] + 0.3 * db[n] for n in names}),
    }
    for label, (result, ref) in cases.items():
        assert list(result.modules) == list(ref), label
        for n in ref:
            assert result[n].scale == 1.0
            assert rel_err(result.delta(n), ref[n]) <= TOL, (label, n)
    assert (0.7 * a)["x"].rank == 3 and (a + b)["x"].rank == 7 and (-a)["y"].rank == 2
    with pytest.raises(TypeError):
        a + 1
    with pytest.raises(TypeError):
        a * b


def test_combine_then_rerank_in_one_pass(small):
    a, b, _ = small
    fused, report = adaptools.combine([a, b], [0.6, -0.3], policy="rank=2")
    reference, ref_report = adaptools.rerank(adaptools.combine([a, b], [0.6, -0.3]), rank=2)
    assert report == ref_report
    assert report.modules["x"].old_rank == 7 and report.modules["x"].new_rank == 2
    for n, m in fused.items():
        assert rel_err(m.delta(), reference.delta(n)) <= TOL


def test_dtypes(small):
    a, b, _ = small
    half = adaptools.combine([a.to(dtype=torch.float16), b.to(dtype=torch.float16)], [1, 1])
    assert all(m.dtype == torch.float16 for _, m in half.items())
    exact = adaptools.combine([a.to(dtype=torch.float16), b.to(dtype=torch.float16)], [1, 1], dtype=torch.float32)
    assert all(m.dtype == torch.float32 for _, m in exact.items())
    for n, m in half.items():  # computed in fp32, rounded once
        assert rel_err(m.delta(), exact.delta(n)) <= 2e-3
    mixed = adaptools.combine([a.to(dtype=torch.float16), b.to(dtype=torch.bfloat16)], [1, 1])
    assert all(m.dtype == torch.float32 for _, m in mixed.items())


def test_layout_and_argument_errors(small):
    a, b, module = small
    with pytest.raises(ShapeMismatchError, match="'x'"):
        adaptools.combine([a, Adapter({"x": module(12, 3, 9, 1.0)})])
    with pytest.raises(ShapeMismatchError, match="fan_in_fan_out"):
        adaptools.combine([a, Adapter({"y": module(5, 2, 8, 1.0, fan_in_fan_out=True)})])
    with pytest.raises(ShapeMismatchError, match="kind"):
        adaptools.combine([a, Adapter({"y": module(5, 2, 8, 1.0, kind="embedding")})])
    with pytest.raises(InvalidArgumentError, match="3 weight"):
        adaptools.combine([a, b], [1, 2, 3])
    with pytest.raises(InvalidArgumentError):
        adaptools.combine([a, b], [1, math.nan])
    with pytest.raises(InvalidArgumentError):
        adaptools.combine([])
    with pytest.raises(InvalidArgumentError, match="kohya"):
        adaptools.combine([a, Adapter({"lora_unet_x": module(12, 3, 8, 1.0)})])


def test_dora_refused(llama_base, tmp_path):
    dora = make_peft_adapter(llama_base, tmp_path / "d", r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(DoraError, match="dora to-lora"):
        adaptools.combine([adaptools.load(dora), adaptools.load(dora)], [0.5, 0.5])
    with pytest.raises(DoraError):
        -adaptools.load(dora)


def test_full_tensors(llama_base, tmp_path):
    kw = dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    a = adaptools.load(make_peft_adapter(llama_base, tmp_path / "a", seed=1, **kw))
    b = adaptools.load(make_peft_adapter(llama_base, tmp_path / "b", seed=2, **kw))
    plain = adaptools.load(make_peft_adapter(llama_base, tmp_path / "p", seed=3, r=2, target_modules=["q_proj"]))
    head_a, head_b = a.extra["lm_head.weight"], b.extra["lm_head.weight"]

    mix = adaptools.interpolate(a, b, 0.25)  # weights sum to 1: W + Σ w_i (T_i − W) = Σ w_i T_i, exact
    assert torch.allclose(mix.extra["lm_head.weight"], 0.75 * head_a + 0.25 * head_b, atol=1e-7)
    mix.save(tmp_path / "mix")
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(load_base(llama_base), tmp_path / "mix")
    assert torch.equal(loaded.base_model.model.lm_head.modules_to_save["default"].weight, mix.extra["lm_head.weight"])

    summed = adaptools.combine([a, b], [1, 3])  # normalised: (T_a + 3 T_b) / 4
    assert torch.allclose(summed.extra["lm_head.weight"], (head_a + 3 * head_b) / 4, atol=1e-7)
    with pytest.raises(InvalidArgumentError, match="some adapters only"):
        adaptools.combine([a, plain])
    with pytest.raises(InvalidArgumentError, match="weights >= 0"):
        a - b
    with pytest.raises(InvalidArgumentError, match="drop"):
        -a
    dropped = adaptools.combine([a, plain], [1, -1], full_tensors="drop")
    assert dropped.extra == {} and dropped.config.get("modules_to_save") is None
    with pytest.raises(InvalidArgumentError, match="full_tensors"):
        adaptools.combine([a, b], full_tensors="sum")


# --------------------------------------------------------------------------- CLI


@pytest.fixture()
def two(llama_base, tmp_path):
    a = make_peft_adapter(llama_base, tmp_path / "a", seed=1, r=4, target_modules=["q_proj", "v_proj"])
    b = make_peft_adapter(llama_base, tmp_path / "b", seed=2, r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"])
    return a, b


def test_cli_combine_exact_and_reranked(runner, two, tmp_path):
    a, b = two
    res = run_cli(runner, "combine", a, b, "--weights", "0.7,-0.3", "--layout", "compact", "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output + res.stderr
    expected = adaptools.combine([adaptools.load(a), adaptools.load(b)], [0.7, -0.3])
    written = adaptools.load(tmp_path / "out")
    assert written.ranks == expected.ranks
    assert {r for n, r in written.ranks.items() if n.endswith("v_proj")} == {6}
    for n in expected:
        assert rel_err(written.delta(n), expected.delta(n)) <= TOL
    assert "rank before" in res.output and "(exact)" in res.output and "0.7 x" in res.output

    res = run_cli(runner, "combine", a, b, "--weights", "-1,2", "--rank", "3", "-o", tmp_path / "r3")
    assert res.exit_code == 0, res.output + res.stderr
    _, report = adaptools.combine([adaptools.load(a), adaptools.load(b)], [-1, 2], policy="rank=3")
    assert max(adaptools.load(tmp_path / "r3").ranks.values()) == 3
    assert "rank=3" in res.output and f"{report.worst_rel_error:.4g}" in res.output


def test_cli_interpolate_negate_kohya(runner, two, llama_base, tmp_path):
    a, b = two
    res = run_cli(runner, "interpolate", a, b, "--t", "0.3", "-o", tmp_path / "i")
    assert res.exit_code == 0, res.output + res.stderr
    ref = adaptools.interpolate(adaptools.load(a), adaptools.load(b), 0.3)
    got = adaptools.load(tmp_path / "i")
    assert all(rel_err(got.delta(n), ref.delta(n)) <= TOL for n in ref)

    res = run_cli(runner, "negate", a, "-o", tmp_path / "n.safetensors", "--format", "kohya")
    assert res.exit_code == 0, res.output + res.stderr
    neg = adaptools.load(tmp_path / "n.safetensors", base=llama_base)
    orig = adaptools.load(a)
    assert set(neg.modules) == set(orig.modules)
    assert all(rel_err(neg.delta(n), -orig.delta(n)) <= TOL for n in orig)


def test_cli_combine_kohya_input_needs_base(runner, two, llama_base, tmp_path):
    a, b = two
    adaptools.load(a).save(tmp_path / "a.safetensors", format="kohya")
    res = run_cli(runner, "combine", tmp_path / "a.safetensors", b, "-o", tmp_path / "out")
    assert res.exit_code == 2 and "--base" in res.stderr and not (tmp_path / "out").exists()
    res = run_cli(runner, "combine", tmp_path / "a.safetensors", b, "--base", llama_base, "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output + res.stderr
    ref = adaptools.load(a) + adaptools.load(b)
    got = adaptools.load(tmp_path / "out")
    assert set(got.modules) == set(ref.modules)
    assert all(rel_err(got.delta(n), ref.delta(n)) <= TOL for n in ref)


@pytest.mark.parametrize("args,message", [
    (["--weights", "1,2,3"], "3 weight"),
    (["--weights", "1,x"], "comma-separated"),
    (["--rank", "2", "--energy", "0.9"], "exactly one"),
    (["--energy", "1.5"], "energy"),
    (["--rank", "0"], "rank"),
])
def test_cli_combine_errors(runner, two, tmp_path, args, message):
    a, b = two
    res = run_cli(runner, "combine", a, b, *args, "-o", tmp_path / "out")
    assert res.exit_code == 2
    assert res.stderr.startswith("error:") and message in res.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_existing_output(runner, two, tmp_path):
    a, b = two
    (tmp_path / "out").mkdir()
    res = run_cli(runner, "combine", a, b, "-o", tmp_path / "out")
    assert res.exit_code == 2 and "already exists" in res.stderr
    res = run_cli(runner, "combine", a, b, "-o", tmp_path / "out", "--overwrite")
    assert res.exit_code == 0 and (tmp_path / "out" / "adapter_config.json").exists()


def test_cli_kohya_inputs_give_kohya_output_by_default(runner, two, tmp_path):
    """A kohya file re-ranked or negated stays a kohya file unless --format says otherwise."""
    a, _ = two
    adaptools.load(a).save(tmp_path / "a.safetensors", format="kohya")
    res = run_cli(runner, "negate", tmp_path / "a.safetensors", "-o", tmp_path / "neg.safetensors")
    assert res.exit_code == 0, res.output + res.stderr
    negated = adaptools.load(tmp_path / "neg.safetensors")
    original = adaptools.load(tmp_path / "a.safetensors")
    assert negated.source_format == "kohya"
    assert all(rel_err(negated.delta(n), -original.delta(n)) <= TOL for n in original)
