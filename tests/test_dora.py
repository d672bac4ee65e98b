"""LoRA ↔ DoRA against PEFT 0.21: to_dora keeps PEFT's outputs, to_lora at full rank is PEFT's DoRA merge."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from factories import load_base, make_base, make_peft_adapter, peft_logits, peft_merged_logits
from safetensors.torch import load_file, save_file

import adaptools
from adaptools.dora import (
    choose_svd,
    delta_energy,
    dora_delta_operator,
    dora_row_norms,
    row_norm_terms,
)
from adaptools.errors import BaseMismatchError, DoraError, InvalidArgumentError, UnknownModuleError
from adaptools.checkpoints.nf4_quant import dequantize_nf4, nf4_state_dict, quantize_nf4

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
ATOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    return (a - b).abs().max().item() <= atol * max(1.0, b.abs().max().item())


@pytest.fixture(scope="module")
def adapters(llama_base, gpt2_base, tmp_path_factory) -> dict[str, Path]:
    """PEFT LoRA and DoRA adapters (random factors and magnitudes) on the tiny Llama and GPT-2 bases."""
    root = tmp_path_factory.mktemp("dora_adapters")
    llama = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, rank_pattern={"v_proj": 2},
                 alpha_pattern={"v_proj": 3})
    gpt2 = dict(r=4, lora_alpha=6, target_modules=GPT2_TARGETS, fan_in_fan_out=True)
    return {
        "llama_lora": make_peft_adapter(llama_base, root / "llama_lora", seed=1, **llama),
        "llama_dora": make_peft_adapter(llama_base, root / "llama_dora", seed=2, use_dora=True, **llama),
        "gpt2_lora": make_peft_adapter(gpt2_base, root / "gpt2_lora", seed=3, **gpt2),
        "gpt2_dora": make_peft_adapter(gpt2_base, root / "gpt2_dora", seed=4, use_dora=True, **gpt2),
    }


@pytest.fixture(scope="module")
def bases(llama_base, gpt2_base) -> dict[str, Path]:
    return {"llama": llama_base, "gpt2": gpt2_base}


def stacked_modules(seed: int = 0, batch: int = 3, out: int = 12, inp: int = 9, r: int = 3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(batch, out, inp, generator=g)
    B, A = torch.randn(batch, out, r, generator=g), torch.randn(batch, r, inp, generator=g)
    scale = torch.rand(batch, generator=g) + 0.5
    magnitude = torch.rand(batch, out, generator=g) + 1.0
    return W, B, A, scale, magnitude


def test_batched_math_matches_dense():
    W, B, A, scale, magnitude = stacked_modules()
    V = W + scale[:, None, None] * (B @ A)
    norms = V.norm(dim=-1)
    assert close(dora_row_norms(W, B, A, scale), norms)
    assert close(dora_row_norms(W[0], B[0], A[0], float(scale[0])), norms[0])
    merged = (magnitude / norms)[..., None] * V
    delta, gain = merged - W, magnitude / norms
    op = dora_delta_operator(W, B, A, scale, gain)
    X, Y = torch.randn(3, 9, 4), torch.randn(3, 12, 4)
    assert close(op.matmul(X), delta @ X) and close(op.rmatmul(Y), delta.mT @ Y)
    energy = delta_energy(row_norm_terms(W, B, A, scale), gain)
    assert close(energy.float(), delta.square().sum((-2, -1)), 1e-5)


def test_choose_svd_by_size():
    assert choose_svd("auto", (64, 64)) == "exact"
    assert choose_svd("auto", (2048, 5632), 16) == "randomized"
    assert choose_svd("auto", (2048, 2048), 1024) == "exact"
    assert choose_svd("auto", (8192, 8192), 8000) == "randomized"
    assert choose_svd("exact", (2048, 2048), 16) == "exact"
    with pytest.raises(InvalidArgumentError):
        choose_svd("dense", (4, 4))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_to_dora_keeps_peft_outputs(arch, adapters, bases, tmp_path):
    lora = adaptools.load(adapters[f"{arch}_lora"])
    dora = adaptools.to_dora(lora, bases[arch])
    assert dora.is_dora and all(m.is_dora for m in dora.modules.values())
    dora.save(tmp_path / "dora")
    assert json.loads((tmp_path / "dora" / "adapter_config.json").read_text())["use_dora"] is True
    reference = peft_logits(bases[arch], adapters[f"{arch}_lora"])
    assert close(peft_logits(bases[arch], tmp_path / "dora"), reference)
    # PEFT initialises a DoRA magnitude as exactly this norm: a zero update on top of the LoRA
    merged = peft_merged_logits(bases[arch], tmp_path / "dora")
    assert close(merged, reference, 1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_to_lora_full_rank_is_peft_dora_merge(arch, adapters, bases, tmp_path):
    dora = adaptools.load(adapters[f"{arch}_dora"])
    lora, report = adaptools.to_lora(dora, bases[arch], rank=10_000, svd="exact")
    assert not lora.is_dora and set(report.modules) == set(dora.modules)
    assert report.rel_error < 1e-5 and {f.method for f in report.modules.values()} == {"exact"}
    lora.save(tmp_path / "lora")
    reference = peft_merged_logits(bases[arch], adapters[f"{arch}_dora"])
    assert close(peft_logits(bases[arch], tmp_path / "lora"), reference, 1e-4)
    assert close(peft_logits(bases[arch], adapters[f"{arch}_dora"]), reference, 1e-4)


def peft_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW = W' − W per base weight, from PEFT's own merge_and_unload (in the base layout)."""
    from peft import PeftModel

    before = {k: v.clone() for k, v in load_base(base).state_dict().items()}
    after = PeftModel.from_pretrained(load_base(base), adapter).merge_and_unload().state_dict()
    return {k.removesuffix(".weight"): after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}


def test_to_lora_error_falls_with_rank_and_is_reported_exactly(adapters, llama_base):
    dora = adaptools.load(adapters["llama_dora"])
    deltas = peft_deltas(llama_base, adapters["llama_dora"])
    assert set(deltas) >= set(dora.modules)
    errors = []
    for rank in (1, 2, 4, 8, 16):
        lora, report = adaptools.to_lora(dora, llama_base, rank=rank)
        assert all(f.rank == min(rank, f.out_features, f.in_features) for f in report.modules.values())
        for name, fit in report.modules.items():
            true = (deltas[name] - lora.delta(name)).norm() / deltas[name].norm()
            assert abs(true.item() - fit.rel_error) < 1e-4
            assert abs(fit.retained_energy - (1 - fit.rel_error**2)) < 1e-6
        errors.append(report.rel_error)
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_randomized_svd_agrees_with_exact(adapters, llama_base, tmp_path):
    dora = adaptools.load(adapters["llama_dora"])
    for rank in (2, 8):
        _, exact = adaptools.to_lora(dora, llama_base, rank=rank, svd="exact")
        _, rand = adaptools.to_lora(dora, llama_base, rank=rank, svd="randomized", power_iters=2)
        assert {f.method for f in rand.modules.values()} == {"randomized"}
        for name, fit in exact.modules.items():
            assert fit.rel_error - 1e-6 <= rand.modules[name].rel_error <= fit.rel_error * 1.05 + 1e-6
    lora, _ = adaptools.to_lora(dora, llama_base, rank=10_000, svd="randomized")
    lora.save(tmp_path / "lora")
    reference = peft_merged_logits(llama_base, adapters["llama_dora"])
    assert close(peft_logits(llama_base, tmp_path / "lora"), reference, 1e-4)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_energy_policy_keeps_the_fewest_values(svd, adapters, llama_base):
    dora = adaptools.load(adapters["llama_dora"])
    _, report = adaptools.to_lora(dora, llama_base, energy=0.9, svd=svd)
    _, full = adaptools.to_lora(dora, llama_base, rank=10_000, svd="exact")
    smaller = {k: adaptools.to_lora(dora, llama_base, rank=k, svd="exact")[1]
               for k in {f.rank - 1 for f in report.modules.values()} - {0}}
    for name, fit in report.modules.items():
        assert fit.retained_energy >= 0.9 - 1e-9
        assert abs(fit.norm - full.modules[name].norm) <= 1e-5 * full.modules[name].norm
        if fit.rank > 1:
            assert smaller[fit.rank - 1].modules[name].retained_energy < 0.9


def test_kohya_dora_scale_converts(adapters, llama_base, tmp_path):
    lora_modules = {n: m for n, m in adaptools.load(adapters["llama_lora"]).items() if m.kind == "linear"}
    dora_modules = {n: m for n, m in adaptools.load(adapters["llama_dora"]).items() if m.kind == "linear"}
    peft_dora = adaptools.load(adapters["llama_dora"]).with_modules(dora_modules, extra={})
    peft_dora.save(tmp_path / "dora.safetensors", format="kohya")
    assert any(k.endswith(".dora_scale") for k in load_file(tmp_path / "dora.safetensors"))
    kohya = adaptools.load(tmp_path / "dora.safetensors")  # kohya names: to_lora maps them with the base
    from_kohya, report = adaptools.to_lora(kohya, llama_base, rank=3)
    from_peft, _ = adaptools.to_lora(peft_dora, llama_base, rank=3)
    assert set(from_kohya.modules) == set(from_peft.modules) == set(report.modules)
    for name in from_peft.modules:
        assert close(from_kohya.delta(name), from_peft.delta(name))
    # a kohya LoRA → kohya DoRA (dora_scale) with the outputs of the LoRA
    plain = adaptools.load(adapters["llama_lora"]).with_modules(lora_modules, extra={})
    plain.save(tmp_path / "lora.safetensors", format="kohya")
    as_dora = adaptools.to_dora(adaptools.load(tmp_path / "lora.safetensors"), llama_base)
    as_dora.save(tmp_path / "k.safetensors", format="kohya")
    adaptools.load(tmp_path / "k.safetensors", base=llama_base).save(tmp_path / "k_peft")
    plain.save(tmp_path / "lora_peft")
    assert close(peft_logits(llama_base, tmp_path / "k_peft"), peft_logits(llama_base, tmp_path / "lora_peft"))


class ConvNet(torch.nn.Module):
    """A tiny conv model for PEFT's Conv2d DoRA."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.lin = torch.nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.lin(torch.relu(self.conv(x)).flatten(1))


def test_conv_dora_against_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    net = ConvNet()
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    x = torch.randn(2, 3, 6, 6)

    def saved(use_dora: bool, name: str) -> Path:
        torch.manual_seed(1)
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["conv"], use_dora=use_dora)
        model = get_peft_model(copy.deepcopy(net), config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    noise = torch.randn_like(p) * 0.3
                    p.copy_((noise + p).abs() if "magnitude" in n else noise)  # a magnitude is a row norm: positive
        model.save_pretrained(tmp_path / name)
        return tmp_path / name

    def outputs(adapter: Path, merge: bool = False) -> torch.Tensor:
        base = ConvNet()
        base.load_state_dict(net.state_dict())
        model = PeftModel.from_pretrained(base, adapter).eval()
        with torch.no_grad():
            return (model.merge_and_unload() if merge else model)(x)

    lora_dir, dora_dir = saved(False, "lora"), saved(True, "dora")
    adaptools.to_dora(adaptools.load(lora_dir), tmp_path / "base").save(tmp_path / "as_dora")
    assert close(outputs(tmp_path / "as_dora"), outputs(lora_dir))
    lora, report = adaptools.to_lora(adaptools.load(dora_dir), tmp_path / "base", rank=6)
    assert report.modules["conv"].rel_error < 1e-5
    lora.save(tmp_path / "as_lora")
    assert close(outputs(tmp_path / "as_lora"), outputs(dora_dir, merge=True), 1e-4)


def write_nf4_base(base: Path, out: Path, double_quant: bool) -> Path:
    """The base with every linear layer weight of the decoder NF4-quantized by adaptools' codec."""
    out.mkdir()
    tensors = {}
    for key, tensor in load_file(base / "model.safetensors").items():
        if key.endswith("proj.weight"):
            tensors |= nf4_state_dict(key, *quantize_nf4(tensor, 64, double_quant))
        else:
            tensors[key] = tensor
    save_file(tensors, out / "model.safetensors")
    return out


def test_nf4_base_is_dequantized_and_norms_depend_on_it(adapters, llama_base, tmp_path):
    lora = adaptools.load(adapters["llama_lora"])
    nf4_base = write_nf4_base(llama_base, tmp_path / "nf4", double_quant=True)
    from_nf4 = adaptools.to_dora(lora, nf4_base)
    simulated = adaptools.to_dora(lora, llama_base, base_weights="nf4-dq")
    stored = adaptools.to_dora(lora, llama_base)
    weights = load_file(llama_base / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    m = lora[name]
    W = dequantize_nf4(*quantize_nf4(weights[f"{name}.weight"], 64, True))
    reference = (W + m.scale * m.B @ m.A).norm(dim=1)
    assert close(from_nf4[name].magnitude, reference) and close(simulated[name].magnitude, reference)
    assert close(stored[name].magnitude, (weights[f"{name}.weight"] + m.scale * m.B @ m.A).norm(dim=1))
    assert not close(stored[name].magnitude, reference, 1e-4)
    no_dq = adaptools.to_dora(lora, llama_base, base_weights="nf4")
    assert not torch.equal(no_dq[name].magnitude, simulated[name].magnitude)


def test_bad_inputs(adapters, llama_base, gpt2_base, tmp_path):
    lora, dora = adaptools.load(adapters["llama_lora"]), adaptools.load(adapters["llama_dora"])
    with pytest.raises(DoraError):
        adaptools.to_lora(lora, llama_base, rank=2)
    with pytest.raises(DoraError):
        adaptools.to_dora(dora, llama_base)
    with pytest.raises(InvalidArgumentError):
        adaptools.to_dora(lora, None)
    with pytest.raises(InvalidArgumentError):
        adaptools.to_lora(dora, llama_base, rank=2, energy=0.9)
    with pytest.raises(InvalidArgumentError):
        adaptools.to_lora(dora, llama_base, rank=2, svd="dense")
    with pytest.raises(InvalidArgumentError):
        adaptools.to_dora(lora, llama_base, base_weights="int8")
    with pytest.raises(UnknownModuleError):
        adaptools.to_dora(lora, gpt2_base)
    other = make_base(tmp_path / "other", "llama", intermediate_size=40)
    with pytest.raises(BaseMismatchError):
        adaptools.to_lora(dora, other, rank=2)


def test_cli_round_trip(adapters, llama_base, runner, tmp_path):
    result = run_cli(runner, "dora", "to-dora", adapters["llama_lora"], "--base", llama_base, "-o", tmp_path / "d")
    assert result.exit_code == 0, result.output
    assert "model.layers.0.self_attn.q_proj" in result.stdout and "max m" in result.stdout
    assert adaptools.load(tmp_path / "d").is_dora
    # m = ‖W + s·B·A‖ makes ΔW = s·B·A again: rank r recovers the LoRA
    result = run_cli(runner, "dora", "to-lora", tmp_path / "d", "--base", llama_base, "--rank", "4",
                     "-o", tmp_path / "l", "--report", tmp_path / "r.json", "--svd", "randomized", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "rel. error" in result.stdout and "randomized" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["methods"] == ["randomized"] and report["policy"] == "rank=4" and report["worst_rel_error"] < 1e-4
    assert close(peft_logits(llama_base, tmp_path / "l"), peft_logits(llama_base, adapters["llama_lora"]), 1e-4)
    result = run_cli(runner, "dora", "to-lora", adapters["llama_dora"], "--base", llama_base, "--energy", "0.5",
                     "-o", tmp_path / "e", "--to", "peft")
    assert result.exit_code == 0, result.output
    assert not adaptools.load(tmp_path / "e").is_dora


@pytest.mark.parametrize(
    "args, message",
    [
        (["to-lora", "{lora}", "--base", "{base}", "--rank", "2"], "plain LoRA"),
        (["to-dora", "{dora}", "--base", "{base}"], "already DoRA"),
        (["to-dora", "{lora}", "--base", "{gpt2}"], "no weight in the base"),
        (["to-lora", "{dora}", "--base", "{base}"], "--rank"),
        (["to-dora", "{lora}"], "--base"),
    ],
)
def test_cli_errors_write_nothing(args, message, adapters, llama_base, gpt2_base, runner, tmp_path):
    values = {"lora": adapters["llama_lora"], "dora": adapters["llama_dora"], "base": llama_base, "gpt2": gpt2_base}
    result = run_cli(runner, "dora", *(a.format(**values) for a in args), "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_existing_output(adapters, llama_base, runner, tmp_path):
    (tmp_path / "out").mkdir()
    result = run_cli(runner, "dora", "to-dora", adapters["llama_lora"], "--base", llama_base, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert list((tmp_path / "out").iterdir()) == []
    result = run_cli(runner, "dora", "to-dora", adapters["llama_lora"], "--base", llama_base, "-o", tmp_path / "out",
                     "--overwrite")
    assert result.exit_code == 0 and adaptools.load(tmp_path / "out").is_dora
