"""PEFT's own LOHA, LOKR and IA3 adapter types against PEFT: `get_delta_weight` per layer and the logits of PEFT's
`merge_and_unload`, on tiny transformers models made here (Llama, GPT-2 with Conv1D, a ViT with a conv patch embedding).
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from factories import load_model, logits, peft_model

import adaptools

pytestmark = pytest.mark.usefixtures("single_thread")

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def make_adapter(base, path, config, seed: int = 1):
    """get_peft_model(base, config) with random values (seeded) for every adapter tensor, saved to `path`."""
    from peft import get_peft_model

    model = get_peft_model(load_model(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(k in name for k in ("hada_", "lokr_", "ia3_l")):
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(1 + 0.3 * noise if "ia3_l" in name else 0.3 * noise)
    model.save_pretrained(path)
    return path


def lycoris_configs():
    from peft import LoHaConfig, LoKrConfig

    return {
        "loha": LoHaConfig(r=2, alpha=3, target_modules=LLAMA_TARGETS, rank_pattern={"down_proj": 3},
                           alpha_pattern={"v_proj": 5}),
        "lokr": LoKrConfig(r=2, alpha=3, target_modules=LLAMA_TARGETS, rank_pattern={"q_proj": 1}),
        "lokr-decompose-both": LoKrConfig(r=1, alpha=2, target_modules=LLAMA_TARGETS, decompose_both=True),
        "lokr-full": LoKrConfig(r=8, alpha=2, target_modules=LLAMA_TARGETS),  # both factors full: scale alpha / r
        "lokr-factor": LoKrConfig(r=2, alpha=3, target_modules=LLAMA_TARGETS, decompose_factor=4),
    }


@pytest.mark.parametrize("kind", ["loha", "lokr", "lokr-decompose-both", "lokr-full", "lokr-factor"])
def test_peft_loha_lokr_match_get_delta_weight_and_merged_logits(kind, llama_base, tmp_path):
    config = lycoris_configs()[kind]
    path = make_adapter(llama_base, tmp_path / kind, config)
    adapter = adaptools.load(path)
    assert adapter.source_format == f"peft-{kind.split('-')[0]}" and len(adapter) == 6
    reference = peft_model(llama_base, path)
    for name, layer in reference.named_modules():
        if hasattr(layer, "get_delta_weight") and name.endswith(tuple(LLAMA_TARGETS)):
            module = adapter[name.removeprefix("base_model.model.")]
            expected = layer.get_delta_weight("default")
            assert expected.abs().max() > 1e-3
            torch.testing.assert_close(module.delta(), expected, rtol=1e-4, atol=1e-6)
            assert module.scale == pytest.approx(layer.scaling["default"])
    report = adaptools.merge(llama_base, path, out=tmp_path / "merged")
    assert report.modules["merged"] == 6
    with torch.no_grad():
        expected = logits(reference.merge_and_unload())
    torch.testing.assert_close(logits(load_model(tmp_path / "merged")), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("effective", [False, True])
def test_peft_loha_and_lokr_on_a_convolution(effective, vit_base, tmp_path):
    """The ViT's 4x4 patch-embedding conv: factors stored flattened, or with Tucker cores (use_effective_conv2d)."""
    from peft import LoHaConfig, LoKrConfig

    targets = ["projection", "query"]
    for kind, config in (("loha", LoHaConfig(r=2, alpha=3, target_modules=targets, use_effective_conv2d=effective)),
                         ("lokr", LoKrConfig(r=2, alpha=3, target_modules=targets, use_effective_conv2d=effective))):
        path = make_adapter(vit_base, tmp_path / kind, config)
        reference = peft_model(vit_base, path)
        conv = reference.base_model.model.vit.embeddings.patch_embeddings.projection
        adapter = adaptools.load(path)
        module = adapter["vit.embeddings.patch_embeddings.projection"]
        expected = conv.get_delta_weight("default")
        torch.testing.assert_close(module.delta().reshape(expected.shape), expected, rtol=1e-4, atol=1e-6)
        adaptools.merge(vit_base, path, out=tmp_path / f"{kind}-merged")
        with torch.no_grad():
            wanted = logits(reference.merge_and_unload())
        torch.testing.assert_close(logits(load_model(tmp_path / f"{kind}-merged")), wanted, rtol=1e-4, atol=1e-4)


def test_peft_rank_other_than_config_is_an_error(llama_base, tmp_path):
    path = make_adapter(llama_base, tmp_path / "loha", lycoris_configs()["loha"])
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {}}))
    with pytest.raises(adaptools.ShapeMismatchError, match="config says r=2"):
        adaptools.load(path)


IA3_CASES = {  # (target_modules, feedforward_modules)
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "vit": (["projection", "query", "key"], ["key"]),
    "vit-feedforward-conv": (["projection", "value"], ["projection"]),
}


@pytest.mark.parametrize("arch", list(IA3_CASES))
def test_ia3_merge_matches_peft_merge_and_unload(arch, llama_base, gpt2_base, vit_base, tmp_path):
    """Feedforward modules scale input columns (a conv's input channels), the others output rows and their biases;
    GPT-2's Conv1D stores weights (in, out) (PEFT forces fan_in_fan_out)."""
    from peft import IA3Config

    base = {"llama": llama_base, "gpt2": gpt2_base}.get(arch, vit_base)
    targets, feedforward = IA3_CASES[arch]
    path = make_adapter(base, tmp_path / "ia3", IA3Config(target_modules=targets, feedforward_modules=feedforward))
    with torch.no_grad():
        expected = logits(peft_model(base, path).merge_and_unload())
        assert (logits(load_model(base)) - expected).abs().max() > 1e-3
    report = adaptools.merge(base, path, out=tmp_path / "merged")
    assert report.modules["merged"] >= len(adaptools.load_ia3(path))
    torch.testing.assert_close(logits(load_model(tmp_path / "merged")), expected, rtol=1e-4, atol=1e-4)


def test_ia3_arithmetic_is_refused_with_the_reason(llama_base, tmp_path, runner):
    from peft import IA3Config

    path = make_adapter(llama_base, tmp_path / "ia3", IA3Config(target_modules=["v_proj", "down_proj"],
                                                                 feedforward_modules=["down_proj"]))
    with pytest.raises(adaptools.UnsupportedAdapterError, match="a sum of IA3 adapters is not a weight update"):
        adaptools.load(path)
    ia3 = adaptools.load_ia3(path)
    assert ia3["model.layers.0.mlp.down_proj"].feedforward and not ia3["model.layers.0.self_attn.v_proj"].feedforward
    for operation in (lambda: ia3 + ia3, lambda: -ia3, lambda: 0.5 * ia3):
        with pytest.raises(adaptools.UnsupportedAdapterError, match="multiplies weights by learned vectors"):
            operation()
    commands = [("combine", path, path, "-o", tmp_path / "sum"), ("rerank", path, "--rank", "1", "-o", tmp_path / "r"),
                ("convert", path, "--to", "kohya", "-o", tmp_path / "k.safetensors"), ("spectrum", path)]
    for command in commands:
        result = run_cli(runner, *command)
        assert result.exit_code == 2 and result.stdout == "" and result.stderr.count("\n") == 1, command
        assert "a sum of IA3 adapters is not a weight update" in result.stderr
    with pytest.raises(adaptools.InvalidArgumentError, match="takes no weight"):
        adaptools.merge(llama_base, [path], [0.5], out=tmp_path / "half")
    lora = adaptools.Adapter({"model.layers.0.mlp.down_proj": adaptools.LoraModule(torch.ones(1, 48), torch.ones(32, 1))})
    with pytest.raises(adaptools.InvalidArgumentError, match="IA3 scaling and another update"):
        adaptools.merge(llama_base, [path, lora], out=tmp_path / "both")
    assert not (tmp_path / "half").exists() and not (tmp_path / "both").exists()
    result = run_cli(runner, "merge", llama_base, path, "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.stderr
    torch.testing.assert_close(logits(load_model(tmp_path / "merged")), logits(peft_model(llama_base, path)),
                               rtol=1e-4, atol=1e-4)
    info = run_cli(runner, "info", path)
    assert info.exit_code == 0 and "model.layers.1.mlp.down_proj" in info.stdout and "input" in info.stdout


def test_peft_lokr_conv1d_with_a_full_factor_is_refused(tmp_path):
    """PEFT reshapes kron(W1 (a, c), W2 (b, d, k)) of unequal dimensions: not a Kronecker product, so refused."""
    from peft import LoKrConfig, get_peft_model

    class Conv1dModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv1d(4, 6, 3)

    get_peft_model(Conv1dModel(), LoKrConfig(r=8, alpha=3, target_modules=["c"])).save_pretrained(tmp_path / "c1")
    with pytest.raises(adaptools.UnsupportedAdapterError, match="Conv1d layer with a full second factor"):
        adaptools.load(tmp_path / "c1")


def test_peft_lokr_converts_to_a_lora_peft_loads(llama_base, tmp_path, runner):
    """convert --to peft: a plain PEFT LoRA of the expanded rank, whose PEFT forward is the LoKr's."""
    from factories import peft_logits

    path = make_adapter(llama_base, tmp_path / "lokr", lycoris_configs()["lokr"])
    result = run_cli(runner, "convert", path, "--to", "peft", "-o", tmp_path / "lora")
    assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    torch.testing.assert_close(peft_logits(llama_base, tmp_path / "lora"), peft_logits(llama_base, path),
                               rtol=1e-4, atol=1e-4)
