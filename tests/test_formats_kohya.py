"""kohya files (lora_down / lora_up / alpha, dora_scale): written from PEFT adapters and read back through the base's
module names, PEFT gives the same logits; what kohya cannot hold is refused clearly; hand-made files mean alpha/r·up@down.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import load_base, load_model, logits, make_peft_adapter, peft_model
from safetensors.torch import load_file, save_file

import adaptools
from adaptools.formats.kohya import kohya_name

pytestmark = pytest.mark.usefixtures("single_thread")

ROUND_TRIP = {
    "llama_gqa": ("llama_base", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])),
    "rslora": ("llama_base", dict(target_modules=["q_proj", "v_proj"], use_rslora=True)),
    "patterns": ("llama_base", dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})),
    "dora": ("llama_base", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    # transformers 5 saves ViT's attention under legacy names (encoder.layer.N.attention.attention.query), so only
    # the Conv2d patch projection has the same path in the model, the adapter and the checkpoint
    "conv2d": ("vit_base", dict(target_modules=["projection"])),
    "conv2d_dora": ("vit_base", dict(target_modules=["projection"], use_dora=True)),
}

UNSTORABLE = {
    "embedding": ("llama_base", dict(target_modules=["embed_tokens", "q_proj"]), "cannot hold an embedding LoRA"),
    "fan_in_fan_out": ("gpt2_base", dict(target_modules=["c_attn"], fan_in_fan_out=True), "cannot hold a fan_in_fan_out"),
    "lora_bias": ("vit_base", dict(target_modules=["q_proj", "fc1"], lora_bias=True), "cannot hold a LoRA bias"),
    "modules_to_save": ("llama_base", dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "cannot hold full tensors"),
}


def make(request, tmp_path: Path, base_name: str, lora: dict) -> tuple[Path, Path]:
    """(base folder, PEFT adapter folder made on it)."""
    base = request.getfixturevalue(base_name)
    return base, make_peft_adapter(base, tmp_path / "peft", r=4, lora_alpha=8, **lora)


@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_peft_to_kohya_to_peft_gives_identical_logits(case, request, tmp_path):
    base, folder = make(request, tmp_path, *ROUND_TRIP[case])
    source = adaptools.load(folder)
    source.save(tmp_path / "lora.safetensors", format="kohya")
    assert adaptools.detect_format(tmp_path / "lora.safetensors") == "kohya"

    kohya = adaptools.load(tmp_path / "lora.safetensors")
    assert set(kohya.modules) == {kohya_name(name) for name in source.modules}
    back = adaptools.load(tmp_path / "lora.safetensors", base=base)
    assert set(back.modules) == set(source.modules)
    for name, module in back.items():
        torch.testing.assert_close(module.delta(), source.delta(name))
        if module.is_dora:
            assert torch.equal(module.magnitude, source[name].magnitude)
    back.save(tmp_path / "back")
    torch.testing.assert_close(
        logits(peft_model(base, tmp_path / "back")), logits(peft_model(base, folder)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("case", list(UNSTORABLE))
def test_what_kohya_cannot_hold_is_refused(case, request, tmp_path):
    base_name, lora, message = UNSTORABLE[case]
    _, folder = make(request, tmp_path, base_name, lora)
    with pytest.raises(adaptools.AdapterFormatError, match=message):
        adaptools.load(folder).save(tmp_path / "out.safetensors", format="kohya")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]  # no output, no temporary folder


def kohya_file(path: Path, modules: dict[str, tuple[int, int, int]], seed: int = 0, alpha: dict | None = None,
               extra: dict | None = None) -> dict[str, torch.Tensor]:
    """Write a kohya file with random lora_down (r, in) / lora_up (out, r) per name -> (out, in, r); returns its tensors."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out, inp, r) in modules.items():
        state[f"{name}.lora_down.weight"] = torch.randn(r, inp, generator=generator)
        state[f"{name}.lora_up.weight"] = torch.randn(out, r, generator=generator) * 0.1
        if alpha and name in alpha:
            state[f"{name}.alpha"] = torch.tensor(float(alpha[name]))
    state.update(extra or {})
    save_file(state, path)
    return state


def test_alpha_missing_means_rank_and_base_names_come_back(llama_base, tmp_path):
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
    kq, kv = kohya_name(q), kohya_name(v, "lora_te_")
    state = kohya_file(tmp_path / "k.safetensors", {kq: (32, 32, 4), kv: (16, 32, 2)}, alpha={kq: 2.0})
    adapter = adaptools.load(tmp_path / "k.safetensors", base=llama_base)
    assert adapter[q].scale == pytest.approx(2.0 / 4) and adapter[v].scale == 1.0  # no alpha: alpha = r
    for name, key, scale in ((q, kq, 0.5), (v, kv, 1.0)):
        expected = scale * state[f"{key}.lora_up.weight"] @ state[f"{key}.lora_down.weight"]
        torch.testing.assert_close(adapter.delta(name), expected)


def test_hand_made_kohya_file_converted_to_peft_matches_the_dense_merge(llama_base, tmp_path):
    """The PEFT folder written from a kohya file gives, in PEFT, the logits of W + (alpha/r)·up@down merged by hand."""
    modules = {"model.layers.0.self_attn.q_proj": (32, 32, 4), "model.layers.1.mlp.down_proj": (32, 48, 3)}
    named = {kohya_name(m): shape for m, shape in modules.items()}
    state = kohya_file(tmp_path / "k.safetensors", named, alpha={kohya_name("model.layers.0.self_attn.q_proj"): 8})
    adaptools.load(tmp_path / "k.safetensors", base=llama_base).save(tmp_path / "peft")

    model = load_base(llama_base)
    weights = model.state_dict()
    for module, (_, _, r) in modules.items():
        key = kohya_name(module)
        alpha = state[f"{key}.alpha"].item() if f"{key}.alpha" in state else r
        weights[f"{module}.weight"] += alpha / r * state[f"{key}.lora_up.weight"] @ state[f"{key}.lora_down.weight"]
    model.load_state_dict(weights)
    torch.testing.assert_close(logits(peft_model(llama_base, tmp_path / "peft")), logits(model), rtol=1e-4, atol=1e-5)


def test_conv_kohya_file_reads_as_conv(vit_base, tmp_path):
    name = kohya_name("vit.embeddings.patch_embeddings.projection")
    down, up = torch.randn(2, 3, 4, 4), torch.randn(32, 2, 1, 1)
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)},
              tmp_path / "k.safetensors")
    module = adaptools.load(tmp_path / "k.safetensors", base=vit_base)["vit.embeddings.patch_embeddings.projection"]
    assert module.kind == "conv" and module.weight_shape == tuple(load_model(vit_base).state_dict()[
        "vit.embeddings.patch_embeddings.projection.weight"].shape)
    expected = 0.5 * torch.einsum("or,rikl->oikl", up.flatten(1), down)
    torch.testing.assert_close(module.delta(), expected)


def test_dora_scale_is_read_as_magnitude(tmp_path):
    name = kohya_name("model.layers.0.self_attn.q_proj")
    magnitude = torch.rand(32, 1) + 0.5
    kohya_file(tmp_path / "k.safetensors", {name: (32, 32, 4)}, extra={f"{name}.dora_scale": magnitude})
    adapter = adaptools.load(tmp_path / "k.safetensors")
    assert adapter.is_dora and torch.equal(adapter[name].magnitude, magnitude.reshape(-1))
    kohya_file(tmp_path / "per_input.safetensors", {name: (32, 48, 4)}, extra={f"{name}.dora_scale": torch.rand(1, 48)})
    with pytest.raises(adaptools.AdapterFormatError, match="not one value per output row"):
        adaptools.load(tmp_path / "per_input.safetensors")


def test_kohya_errors_are_typed(llama_base, tmp_path):
    name = kohya_name("model.layers.0.self_attn.q_proj")
    kohya_file(tmp_path / "k.safetensors", {name: (32, 32, 4)})
    with pytest.raises(adaptools.InvalidArgumentError, match="--base"):
        adaptools.load(tmp_path / "k.safetensors").save(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()

    kohya_file(tmp_path / "unknown.safetensors", {"lora_unet_model_layers_9_self_attn_q_proj": (32, 32, 4)})
    with pytest.raises(adaptools.UnknownModuleError, match="match no weight of the base"):
        adaptools.load(tmp_path / "unknown.safetensors", base=llama_base)

    state = load_file(tmp_path / "k.safetensors")
    save_file({**state, f"{name}.lora_side.weight": torch.zeros(4, 4)}, tmp_path / "odd.safetensors")
    with pytest.raises(adaptools.AdapterFormatError, match="unexpected key"):
        adaptools.load(tmp_path / "odd.safetensors")
    save_file({**state, f"{name}.lora_mid.weight": torch.zeros(4, 4)}, tmp_path / "mid.safetensors")
    with pytest.raises(adaptools.ShapeMismatchError, match="are not a Tucker LoCon"):
        adaptools.load(tmp_path / "mid.safetensors")

    save_file({**state, f"{name}.lora_up.weight": torch.zeros(32, 3)}, tmp_path / "rank.safetensors")
    with pytest.raises(adaptools.RankMismatchError, match="lora_down has rank 4 but lora_up has rank 3"):
        adaptools.load(tmp_path / "rank.safetensors")

    save_file({**state, f"{name}.lora_down.weight": torch.full((4, 32), float("nan"))}, tmp_path / "nan.safetensors")
    with pytest.raises(adaptools.NonFiniteError):
        adaptools.load(tmp_path / "nan.safetensors")


def test_ambiguous_kohya_names_are_an_error(tmp_path):
    """Two base weights that spell the same kohya name (`a.b_c` and `a_b.c`) cannot be told apart."""
    import torch

    import adaptools
    from adaptools.checkpoints import NameMap
    from adaptools.formats.kohya import remap_to_base

    module = adaptools.LoraModule(A=torch.ones(1, 4), B=torch.ones(4, 1))
    adapter = adaptools.Adapter({"lora_unet_a_b_c": module}, source_format="kohya")
    with pytest.raises(adaptools.UnknownModuleError, match="several weights"):
        remap_to_base(adapter, NameMap(["a.b_c.weight", "a_b.c.weight"]).kohya_names())
    assert list(remap_to_base(adapter, NameMap(["a.b_c.weight", "x.weight"]).kohya_names()).modules) == ["a.b_c"]
