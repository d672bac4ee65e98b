"""mlx-lm adapters: the documented formula (ΔW = scale·(lora_a @ lora_b)ᵀ), and mlx-lm's own loader
(`mlx_lm.tuner.utils.load_adapters` + each LoRA layer's `fuse`) on a tiny mlx-lm Llama where the mlx CPU wheel installs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptools
from adaptools import Adapter, LoraModule

from conftest import run_cli
from test_errors_cli import assert_one_line_error

HIDDEN, INTER, LAYERS = 16, 24, 2
TARGETS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (8, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}


def mlx_tensors(rank: int, seed: int, dora: bool = False) -> dict[str, torch.Tensor]:
    """mlx-lm's adapter keys for every layer: lora_a (in, r), lora_b (r, out), DoRA's m (out,)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(LAYERS):
        for key, (out, inp) in TARGETS.items():
            path = f"model.layers.{layer}.{key}"
            state[f"{path}.lora_a"] = torch.randn(inp, rank, generator=gen) * 0.3
            state[f"{path}.lora_b"] = torch.randn(rank, out, generator=gen) * 0.3
            if dora:
                state[f"{path}.m"] = torch.rand(out, generator=gen) + 0.5
    return state


def write_mlx(folder: Path, rank: int = 4, scale: float = 2.5, seed: int = 1, dora: bool = False) -> Path:
    folder.mkdir(parents=True)
    save_file(mlx_tensors(rank, seed, dora), str(folder / "adapters.safetensors"), metadata={"format": "mlx"})
    config = {"fine_tune_type": "dora" if dora else "lora", "num_layers": LAYERS,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(TARGETS)}}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_mlx_folder_reads_with_the_documented_formula(tmp_path):
    folder = write_mlx(tmp_path / "mlx", scale=2.5)
    adapter = adaptools.load(folder)
    assert adaptools.detect_format(folder) == "mlx" and adapter.source_format == "mlx"
    tensors = load_file(folder / "adapters.safetensors")
    assert len(adapter) == LAYERS * len(TARGETS)
    for name in adapter:
        expected = 2.5 * (tensors[f"{name}.lora_a"] @ tensors[f"{name}.lora_b"]).T
        torch.testing.assert_close(adapter.delta(name), expected)


def test_npz_archive_needs_a_scale(tmp_path, runner):
    folder = tmp_path / "old"
    folder.mkdir()
    tensors = mlx_tensors(rank=2, seed=2)
    np.savez(folder / "adapters.npz", **{k: v.numpy() for k, v in tensors.items()})
    assert_one_line_error(run_cli(runner, "info", folder / "adapters.npz"), "a numpy .npz archive without a scale")
    result = run_cli(runner, "info", folder, "--scale", "3")
    assert result.exit_code == 0 and "format: mlx" in result.stdout
    adapter = adaptools.load(folder / "adapters.npz", scale=3.0)
    name = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(adapter.delta(name), 3.0 * (tensors[f"{name}.lora_a"] @ tensors[f"{name}.lora_b"]).T)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "adapters.npz", obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(adaptools.AdapterFormatError, match="plain arrays"):
        adaptools.load(tmp_path / "adapters.npz", scale=1.0)


def test_full_fine_tune_is_refused(tmp_path):
    folder = write_mlx(tmp_path / "full")
    (folder / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full", "num_layers": 2}))
    with pytest.raises(adaptools.UnsupportedAdapterError, match="full fine-tune"):
        adaptools.load(folder)


def peft_like(seed: int = 3) -> Adapter:
    """An adapter with mixed ranks and scales over the mlx model's paths."""
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for i, (key, (out, inp)) in enumerate(TARGETS.items()):
        r = 2 + i
        modules[f"model.layers.1.{key}"] = LoraModule(torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen),
                                                      scale=0.5 + i)
    return Adapter(modules)


def test_round_trip_peft_mlx_peft_keeps_every_update(tmp_path):
    source = peft_like()
    source.save(tmp_path / "peft")
    adaptools.load(tmp_path / "peft").save(tmp_path / "mlx", format="mlx")
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["scale"] == 1.0 and config["lora_parameters"]["rank"] == 4
    assert config["lora_parameters"]["keys"] == sorted(TARGETS) and config["num_layers"] == -1
    adaptools.load(tmp_path / "mlx").save(tmp_path / "back")
    back = adaptools.load(tmp_path / "back")
    for name, m in source.items():
        torch.testing.assert_close(back.delta(name), m.delta(), rtol=1e-5, atol=1e-5)


def test_what_mlx_cannot_hold_is_refused(tmp_path):
    outside = Adapter({"lm_head": LoraModule(torch.ones(1, 4), torch.ones(4, 1))})
    with pytest.raises(adaptools.AdapterFormatError, match="inside the transformer layers"):
        outside.save(tmp_path / "a", format="mlx")
    conv = Adapter({"model.layers.0.conv": LoraModule(torch.ones(1, 18), torch.ones(4, 1), kind="conv", kernel=(3, 3))})
    with pytest.raises(adaptools.AdapterFormatError, match="cannot hold a conv"):
        conv.save(tmp_path / "b", format="mlx")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- mlx-lm's own loader ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlx_model_factory(tmp_path_factory):
    """(make a fresh tiny mlx-lm Llama with fixed weights, its weights saved as a base checkpoint folder)."""
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=HIDDEN, num_hidden_layers=LAYERS, intermediate_size=INTER,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=32,
                           head_dim=4, tie_word_embeddings=False)
    mx.random.seed(0)
    weights = dict(tree_flatten(llama.Model(args).parameters()))
    base = tmp_path_factory.mktemp("mlx_base")
    save_file({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, str(base / "model.safetensors"))

    def make():
        model = llama.Model(args)
        model.load_weights(list(weights.items()))
        return model

    return make, base


def mlx_fused(model_factory, adapter_folder: Path) -> dict[str, np.ndarray]:
    """mlx-lm's load_adapters, then each LoRA/DoRA layer's own fuse: the fused weights by checkpoint key."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import load_adapters

    model = load_adapters(model_factory(), str(adapter_folder))
    fused = {}
    for name, module in model.named_modules():
        if hasattr(module, "fuse") and hasattr(module, "lora_a"):
            fused[f"{name}.weight"] = np.array(module.fuse().weight)
    assert fused
    plain = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] == "weight"}
    return {**plain, **fused}


@pytest.mark.parametrize("dora", [False, True])
def test_mlx_adapter_merges_as_mlx_lm_fuses_it(dora, mlx_model_factory, tmp_path):
    make, base = mlx_model_factory
    folder = write_mlx(tmp_path / "mlx", rank=3, scale=1.7, dora=dora)
    theirs = mlx_fused(make, folder)
    adaptools.merge(base, [folder], out=tmp_path / "merged")
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    changed = [k for k in theirs if ".lora" not in k and k in ours and "_proj" in k]
    assert len([k for k in changed if not np.allclose(theirs[k], load_file(base / "model.safetensors")[k])]) == 6
    for key in changed:
        np.testing.assert_allclose(ours[key].numpy(), theirs[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_convert_to_mlx_is_loaded_by_mlx_lm(mlx_model_factory, tmp_path, runner):
    make, base = mlx_model_factory
    source = peft_like()
    source.save(tmp_path / "peft")
    result = run_cli(runner, "convert", tmp_path / "peft", "--to", "mlx", "-o", tmp_path / "mlx")
    assert result.exit_code == 0, result.stderr
    theirs = mlx_fused(make, tmp_path / "mlx")
    stored = load_file(base / "model.safetensors")
    for name, m in source.items():
        np.testing.assert_allclose(theirs[f"{name}.weight"], (stored[f"{name}.weight"] + m.delta()).numpy(),
                                   rtol=1e-5, atol=1e-5)
