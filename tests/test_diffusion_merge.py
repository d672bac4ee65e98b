"""Merging into single-file SD1.x / SDXL / Flux checkpoints, checked against diffusers: our merged file, turned
into diffusers' layout by diffusers' own single-file converters, equals diffusers' `lora_state_dict` +
`load_lora_into_*` + fuse on the same tiny models (fp32, fp16, bf16 bases)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from diffusion_fixtures import sd_components, to_diffusers, write_single_file
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adaptools

ALPHA = 3.0


def kohya_lora(path: Path, modules: dict[str, tuple[int, int, tuple[int, ...]]], seed: int, rank: int = 2,
               alphas: dict[str, float] | None = None) -> Path:
    """A kohya file: per module (out, in, kernel) lora_down (r, in, *kernel), lora_up (out, r[, 1, 1]), alpha."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out, inp, kernel) in modules.items():
        state[f"{name}.lora_down.weight"] = torch.randn(rank, inp, *kernel, generator=g) * 0.5
        state[f"{name}.lora_up.weight"] = torch.randn(out, rank, *((1,) * len(kernel)), generator=g) * 0.5
        state[f"{name}.alpha"] = torch.tensor((alphas or {}).get(name, ALPHA))
    save_file(state, str(path))
    return path


def diffusers_lora(path: Path, modules: dict[str, tuple[int, int]], seed: int, rank: int = 2,
                   alpha: float | None = ALPHA, dora: bool = False, bias: bool = False,
                   component: str = "transformer") -> Path:
    """A diffusers (PEFT-style keys) LoRA of `component` with `.alpha` keys (none when `alpha` is None: scale 1);
    with `dora`, PEFT DoRA magnitudes (`lora_magnitude_vector`); with `bias`, LoRA biases (`lora_B.bias`)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out, inp) in modules.items():
        state[f"{component}.{name}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * 0.5
        state[f"{component}.{name}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.5
        if dora:
            state[f"{component}.{name}.lora_magnitude_vector"] = torch.rand(out, generator=g) + 0.5
        if bias:
            state[f"{component}.{name}.lora_B.bias"] = torch.randn(out, generator=g)
        if alpha is not None:
            state[f"{component}.{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


def merge_lora_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's merge of every LoRA layer diffusers injected (what fuse_lora runs), as a plain state dict."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def diffusers_reference(family: str, lora: Path, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' own loading and fusing of `lora` into the tiny models (weights rounded to `dtype`, math fp32)."""
    from diffusers.loaders import (FluxLoraLoaderMixin, SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin,
                                   StableDiffusionXLLoraLoaderMixin)

    components = sd_components(family)
    for name, model in components.items():
        if isinstance(model, torch.nn.Module):
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(dtype).float())
    if family == "sd3":
        state = SD3LoraLoaderMixin.lora_state_dict(str(lora))
        SD3LoraLoaderMixin.load_lora_into_transformer(state, transformer=components["transformer"])
        return {"transformer": merge_lora_layers(components["transformer"])}
    if family == "flux":
        state, alphas = FluxLoraLoaderMixin.lora_state_dict(str(lora), return_alphas=True)
        FluxLoraLoaderMixin.load_lora_into_transformer(state, network_alphas=alphas,
                                                       transformer=components["transformer"])
        return {"transformer": merge_lora_layers(components["transformer"])}
    mixin = StableDiffusionXLLoraLoaderMixin if family.startswith("sdxl") else StableDiffusionLoraLoaderMixin
    state, alphas = mixin.lora_state_dict(str(lora), unet_config=components["unet"].config)
    mixin.load_lora_into_unet(state, alphas, unet=components["unet"])
    encoders = tuple(name for name in ("text_encoder", "text_encoder_2") if name in components)
    for name in encoders:
        if any(k.startswith(f"{name}.") for k in state):
            mixin.load_lora_into_text_encoder(state, alphas, text_encoder=components[name], prefix=name)
    return {name: merge_lora_layers(components[name]) for name in ("unet", *encoders)}


def peft_reference(model: torch.nn.Module, lora: Path, component: str) -> dict[str, torch.Tensor]:
    """PEFT's own merge of a diffusers-named LoRA file's `component` modules injected into `model` (LoraConfig:
    rank and alpha from the file, DoRA and lora_bias when it has magnitudes and biases)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    state = {k.removeprefix(f"{component}."): v for k, v in load_file(lora).items() if k.startswith(f"{component}.")}
    alphas = {k.removesuffix(".alpha"): float(v) for k, v in state.items() if k.endswith(".alpha")}
    rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
    config = LoraConfig(r=rank, lora_alpha=next(iter(alphas.values())), target_modules=sorted(alphas),
                        use_dora=any(k.endswith("lora_magnitude_vector") for k in state),
                        lora_bias=any(k.endswith("lora_B.bias") for k in state))
    inject_adapter_in_model(config, model)
    set_peft_model_state_dict(model, {k: v for k, v in state.items() if not k.endswith(".alpha")})
    return merge_lora_layers(model)


def assert_matches_diffusers(family: str, base: Path, merged: Path, lora: Path, dtype: torch.dtype,
                             components: dict, changed: set[str],
                             reference: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """The merged file, converted by diffusers, equals diffusers' fused models (or the `reference` component state
    dicts given); exactly the `changed` stored keys differ from the base, the others are the base's bytes."""
    ours_state, base_state = load_file(merged), load_file(base)
    assert list(ours_state) == list(base_state) or set(ours_state) == set(base_state)
    assert {k: v.dtype for k, v in ours_state.items()} == {k: v.dtype for k, v in base_state.items()}
    differs = {k for k in base_state if not torch.equal(ours_state[k], base_state[k])}
    assert differs == changed
    ours = to_diffusers(family, {k: v.float() for k, v in ours_state.items()}, components)
    theirs = reference or diffusers_reference(family, lora, dtype)
    for component, state in theirs.items():
        for key, value in state.items():
            key = key.removeprefix("text_model.")
            mine = {k.removeprefix("text_model."): v for k, v in ours[component].items()}
            if key.endswith("position_ids") or key == "text_projection.weight":
                continue
            torch.testing.assert_close(mine[key].to(dtype), value.to(dtype), msg=f"{component}.{key}",
                                       rtol=1e-5 if dtype == torch.float32 else None,
                                       atol=1e-5 if dtype == torch.float32 else None)


SD1_LORA = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (8, 8, ()),
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k": (8, 24, ()),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": (128, 16, ()),
    "lora_unet_down_blocks_0_resnets_1_conv2": (8, 8, (3, 3)),  # a LoCon on a resnet conv
    "lora_unet_up_blocks_0_resnets_2_conv1": (16, 24, (3, 3)),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (24, 24, ()),
    "lora_te_text_model_encoder_layers_1_self_attn_out_proj": (24, 24, ()),  # diffusers' kohya TE inference needs it
    "lora_te_text_model_encoder_layers_1_mlp_fc1": (40, 24, ()),
}
SD1_CHANGED = {
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
    "model.diffusion_model.input_blocks.2.0.out_layers.3.weight",
    "model.diffusion_model.output_blocks.2.0.in_layers.2.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.out_proj.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight",
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_sd1_kohya_with_locon_matches_diffusers(tmp_path, dtype, single_thread):
    base, components = write_single_file(tmp_path / "sd15.safetensors", "sd1", dtype)
    lora = kohya_lora(tmp_path / "lora.safetensors", SD1_LORA, seed=1)
    report = adaptools.merge(base, [lora], out=tmp_path / "merged.safetensors")
    assert report.base == "sd1 single file" and report.modules == {"merged.safetensors": len(SD1_LORA)}
    assert_matches_diffusers("sd1", base, tmp_path / "merged.safetensors", lora, dtype, components, SD1_CHANGED)
    with safe_open(str(tmp_path / "merged.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.title"] == "tiny sd1"  # the base's metadata kept


def test_sd1_merge_written_with_direct_io_matches_diffusers(tmp_path, direct_io):
    """The merge through the direct-I/O writer (blocks of two pages: tiles straddle them, blocks spill) on two
    workers gives the same weights."""
    base, components = write_single_file(tmp_path / "sd15.safetensors", "sd1", torch.float16)
    lora = kohya_lora(tmp_path / "lora.safetensors", SD1_LORA, seed=1)
    adaptools.merge(base, [lora], out=tmp_path / "merged.safetensors")
    assert direct_io
    assert_matches_diffusers("sd1", base, tmp_path / "merged.safetensors", lora, torch.float16, components,
                             SD1_CHANGED)


SD2_LORA = {  # the only text encoder is OpenCLIP: q and v land in its fused in_proj
    "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_v": (8, 32, ()),
    "lora_unet_down_blocks_0_attentions_1_proj_out": (8, 8, ()),
    "lora_te_text_model_encoder_layers_1_self_attn_q_proj": (32, 32, ()),
    "lora_te_text_model_encoder_layers_1_self_attn_v_proj": (32, 32, ()),
    "lora_te_text_model_encoder_layers_1_self_attn_out_proj": (32, 32, ()),
}
SD2_CHANGED = {
    "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_v.weight",
    "model.diffusion_model.input_blocks.2.1.proj_out.weight",
    "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight",
    "cond_stage_model.model.transformer.resblocks.1.attn.out_proj.weight",
}


def test_sd2_kohya_on_the_openclip_text_encoder_matches_diffusers(tmp_path, single_thread):
    base, components = write_single_file(tmp_path / "sd2.safetensors", "sd2", torch.float16)
    lora = kohya_lora(tmp_path / "lora.safetensors", SD2_LORA, seed=16)
    report = adaptools.merge(base, [lora], out=tmp_path / "merged.safetensors")
    assert report.base == "sd2 single file"
    assert_matches_diffusers("sd2", base, tmp_path / "merged.safetensors", lora, torch.float16, components,
                             SD2_CHANGED)


SDXL_LORA = {  # kohya SDXL names in the LDM style, both text encoders (q/k/v of te2 land in the fused in_proj)
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": (16, 16, ()),
    "lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_v": (16, 56, ()),
    "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2": (16, 64, ()),
    "lora_unet_input_blocks_4_1_proj_in": (16, 16, ()),
    "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": (24, 24, ()),
    "lora_te1_text_model_encoder_layers_0_self_attn_out_proj": (24, 24, ()),
    "lora_te2_text_model_encoder_layers_1_self_attn_q_proj": (32, 32, ()),
    "lora_te2_text_model_encoder_layers_1_self_attn_v_proj": (32, 32, ()),
    "lora_te2_text_model_encoder_layers_1_self_attn_out_proj": (32, 32, ()),
    "lora_te2_text_model_encoder_layers_0_mlp_fc2": (32, 48, ()),
}
SDXL_CHANGED = {
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
    "model.diffusion_model.output_blocks.1.1.transformer_blocks.0.attn2.to_v.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.1.ff.net.2.weight",
    "model.diffusion_model.input_blocks.4.1.proj_in.weight",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.out_proj.weight",
    "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
    "conditioner.embedders.1.model.transformer.resblocks.1.attn.out_proj.weight",
    "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.weight",
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_sdxl_kohya_both_text_encoders_and_fused_in_proj_match_diffusers(tmp_path, dtype, single_thread):
    base, components = write_single_file(tmp_path / "sdxl.safetensors", "sdxl", dtype)
    lora = kohya_lora(tmp_path / "lora.safetensors", SDXL_LORA, seed=2)
    report = adaptools.merge(base, [lora], out=tmp_path / "merged.safetensors")
    assert report.base == "sdxl single file"
    assert_matches_diffusers("sdxl", base, tmp_path / "merged.safetensors", lora, dtype, components, SDXL_CHANGED)
    in_proj = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    merged, stored = load_file(tmp_path / "merged.safetensors")[in_proj], load_file(base)[in_proj]
    assert torch.equal(merged[32:64], stored[32:64])  # k's rows: no adapter module names them


REFINER_LORA = {  # kohya SDXL names (LDM style) on the refiner's four-block UNet, and its only encoder (bigG)
    "lora_unet_input_blocks_7_1_transformer_blocks_1_attn1_to_q": (24, 24, ()),
    "lora_unet_output_blocks_4_1_transformer_blocks_0_attn2_to_k": (24, 32, ()),
    "lora_unet_output_blocks_7_1_proj_out": (16, 16, ()),
    "lora_unet_middle_block_0_in_layers_2": (24, 24, (3, 3)),  # a LoCon on the middle resnet
    "lora_unet_output_blocks_5_2_conv": (24, 24, (3, 3)),  # an upsampler after attention: index 2
    "lora_te2_text_model_encoder_layers_9_self_attn_q_proj": (32, 32, ()),
    "lora_te2_text_model_encoder_layers_9_self_attn_v_proj": (32, 32, ()),
    "lora_te2_text_model_encoder_layers_3_self_attn_out_proj": (32, 32, ()),
    "lora_te2_text_model_encoder_layers_0_mlp_fc1": (48, 32, ()),
}
REFINER_CHANGED = {
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn1.to_q.weight",
    "model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.output_blocks.7.1.proj_out.weight",
    "model.diffusion_model.middle_block.0.in_layers.2.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "conditioner.embedders.0.model.transformer.resblocks.9.attn.in_proj_weight",
    "conditioner.embedders.0.model.transformer.resblocks.3.attn.out_proj.weight",
    "conditioner.embedders.0.model.transformer.resblocks.0.mlp.c_fc.weight",
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_sdxl_refiner_kohya_matches_diffusers(tmp_path, dtype, single_thread):
    """The SDXL refiner (bigG alone at `conditioner.embedders.0.model.`, four UNet blocks): detected and named, a
    kohya LoRA in the LDM style (kohya SDXL files; diffusers drops those names when a file mixes both styles)
    merged as diffusers' SDXL loader + fuse give it."""
    base, components = write_single_file(tmp_path / "refiner.safetensors", "sdxl-refiner", dtype)
    lora = kohya_lora(tmp_path / "lora.safetensors", REFINER_LORA, seed=29)
    report = adaptools.merge(base, [lora], out=tmp_path / "merged.safetensors")
    assert report.base == "sdxl-refiner single file"
    assert_matches_diffusers("sdxl-refiner", base, tmp_path / "merged.safetensors", lora, dtype, components,
                             REFINER_CHANGED)


OPEN_CLIP_SLICES = {f"text_model.encoder.layers.{n}.self_attn.{p}_proj": (32, 32) for n, p in ((0, "q"), (1, "k"), (1, "v"))}
OPEN_CLIP_CHANGED = {f"conditioner.embedders.1.model.transformer.resblocks.{n}.attn.in_proj_{{}}" for n in (0, 1)}


@pytest.mark.parametrize("kind", ["dora", "bias"])
def test_sdxl_dora_and_biases_on_the_fused_openclip_in_proj_match_peft(tmp_path, kind, single_thread):
    """PEFT DoRA / LoRA-bias modules on the bigG encoder's q, k, v (diffusers' names) land on their rows of the
    fused in_proj weight (and bias) as PEFT's own merge of them into the CLIP model (diffusers 0.42.1's text-encoder
    loader under transformers 5 drops DoRA magnitudes and `.alpha` keys, so it is no reference here)."""
    base, components = write_single_file(tmp_path / "sdxl.safetensors", "sdxl")
    lora = diffusers_lora(tmp_path / "lora.safetensors", OPEN_CLIP_SLICES, seed=28, component="text_encoder_2",
                          **{kind: True})
    adaptools.merge(base, [lora], out=tmp_path / "merged.safetensors")
    changed = {k.format(p) for k in OPEN_CLIP_CHANGED for p in (("weight", "bias") if kind == "bias" else ("weight",))}
    reference = {"text_encoder_2": peft_reference(sd_components("sdxl")["text_encoder_2"], lora, "text_encoder_2")}
    assert_matches_diffusers("sdxl", base, tmp_path / "merged.safetensors", lora, torch.float32, components, changed,
                             reference)


FLUX_DIFFUSERS_LORA = {  # slices of the fused qkv / linear1, and the swapped final modulation
    "transformer_blocks.0.attn.to_q": (16, 16), "transformer_blocks.0.attn.to_v": (16, 16),
    "transformer_blocks.1.attn.add_k_proj": (16, 16), "single_transformer_blocks.1.attn.to_k": (16, 16),
    "single_transformer_blocks.1.proj_mlp": (64, 16), "single_transformer_blocks.0.proj_out": (16, 80),
    "transformer_blocks.1.ff.net.0.proj": (64, 16), "norm_out.linear": (32, 16),
}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bfl", "prefixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flux_diffusers_lora_on_fused_slices_matches_diffusers(tmp_path, dtype, prefix, single_thread):
    base, components = write_single_file(tmp_path / "flux.safetensors", "flux", dtype, flux_prefix=prefix)
    lora = diffusers_lora(tmp_path / "lora.safetensors", FLUX_DIFFUSERS_LORA, seed=3)
    report = adaptools.merge(base, [lora], out=tmp_path / "merged.safetensors")
    assert report.base == "flux single file"
    changed = {prefix + k for k in ("double_blocks.0.img_attn.qkv.weight", "double_blocks.1.txt_attn.qkv.weight",
                                    "single_blocks.1.linear1.weight", "single_blocks.0.linear2.weight",
                                    "double_blocks.1.img_mlp.0.weight", "final_layer.adaLN_modulation.1.weight")}
    assert report.modules == {"merged.safetensors": len(changed)}
    assert_matches_diffusers("flux", base, tmp_path / "merged.safetensors", lora, dtype, components, changed)


FLUX_SLICES = {  # DoRA / bias on slices of every fused kind, a whole weight, and the swapped final modulation
    "transformer_blocks.0.attn.to_q": (16, 16), "transformer_blocks.0.attn.to_v": (16, 16),
    "transformer_blocks.1.attn.add_k_proj": (16, 16), "single_transformer_blocks.1.attn.to_k": (16, 16),
    "single_transformer_blocks.1.proj_mlp": (64, 16), "transformer_blocks.1.ff.net.0.proj": (64, 16),
}
FLUX_SLICES_CHANGED = {"double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.qkv", "single_blocks.1.linear1",
                       "double_blocks.1.img_mlp.0"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flux_dora_on_fused_slices_matches_diffusers(tmp_path, dtype, single_thread):
    """A PEFT DoRA LoRA in diffusers' names: each slice's rows of the fused weight get PEFT's DoRA merge of the
    unfused module (its norm is per output row), as diffusers' load_lora_into_transformer + fuse give it."""
    base, components = write_single_file(tmp_path / "flux.safetensors", "flux", dtype)
    lora = diffusers_lora(tmp_path / "dora.safetensors", FLUX_SLICES, seed=23, dora=True)
    report = adaptools.merge(base, [lora], out=tmp_path / "merged.safetensors")
    assert report.modules == {"merged.safetensors": len(FLUX_SLICES_CHANGED)}
    assert_matches_diffusers("flux", base, tmp_path / "merged.safetensors", lora, dtype, components,
                             {f"{k}.weight" for k in FLUX_SLICES_CHANGED})


def test_flux_lora_biases_on_fused_slices_match_diffusers(tmp_path, single_thread):
    """PEFT's lora_bias=True in diffusers' names: a slice's b·s lands on its rows of the fused bias (the swapped
    final modulation's bias swapped too)."""
    base, components = write_single_file(tmp_path / "flux.safetensors", "flux")
    modules = dict(FLUX_SLICES, **{"norm_out.linear": (32, 16)})
    lora = diffusers_lora(tmp_path / "bias.safetensors", modules, seed=24, bias=True)
    adaptools.merge(base, [lora], out=tmp_path / "merged.safetensors")
    changed = {f"{k}.{p}" for k in (*FLUX_SLICES_CHANGED, "final_layer.adaLN_modulation.1") for p in ("weight", "bias")}
    assert_matches_diffusers("flux", base, tmp_path / "merged.safetensors", lora, torch.float32, components, changed)
    merged, stored = load_file(tmp_path / "merged.safetensors"), load_file(base)
    assert torch.equal(merged["double_blocks.0.img_attn.qkv.bias"][16:32], stored["double_blocks.0.img_attn.qkv.bias"][16:32])


def test_dora_slices_beside_plain_slices_and_overlaps_refused(tmp_path):
    """In one output a DoRA slice and plain LoRAs on other rows of the fused weight both apply; a DoRA slice and
    an update of the same rows (the whole fused weight, kohya-named) is ambiguous: refused before any output."""
    base, _ = write_single_file(tmp_path / "flux.safetensors", "flux")
    dora = diffusers_lora(tmp_path / "dora.safetensors", {"transformer_blocks.0.attn.to_q": (16, 16)}, seed=25,
                          dora=True)
    plain = diffusers_lora(tmp_path / "plain.safetensors", {"transformer_blocks.0.attn.to_v": (16, 16)}, seed=26)
    both = adaptools.merge(base, [dora, plain], out=tmp_path / "both.safetensors")
    assert both.modules == {"both.safetensors": 1}
    adaptools.merge(base, [dora], out=tmp_path / "first.safetensors")
    adaptools.merge(tmp_path / "first.safetensors", [plain], out=tmp_path / "then.safetensors")
    key = "double_blocks.0.img_attn.qkv.weight"  # disjoint rows: one after the other gives the same
    torch.testing.assert_close(load_file(tmp_path / "both.safetensors")[key],
                               load_file(tmp_path / "then.safetensors")[key], rtol=0, atol=1e-6)
    kohya = kohya_lora(tmp_path / "kohya.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": (48, 16, ())}, seed=27)
    with pytest.raises(adaptools.DoraError, match=r"DoRA update of rows 0\.\.16 and another update"):
        adaptools.merge(base, [dora, kohya], out=tmp_path / "refused.safetensors")
    assert not (tmp_path / "refused.safetensors").exists()


def test_flux_kohya_names_on_fused_weights_match_diffusers(tmp_path, single_thread):
    """kohya's BFL-style names (one down, the up's rows split over q, k, v: a LoRA on the fused weight); the
    reference is diffusers on the same update written with diffusers' names (the up split by rows, as diffusers'
    kohya Flux converter does; that converter hard-codes Flux-dev's sizes)."""
    base, components = write_single_file(tmp_path / "flux.safetensors", "flux")
    modules = {"lora_unet_double_blocks_0_img_attn_qkv": (48, 16, ()), "lora_unet_single_blocks_1_linear1": (112, 16, ()),
               "lora_unet_double_blocks_1_txt_mlp_0": (64, 16, ())}
    kohya = kohya_lora(tmp_path / "kohya.safetensors", modules, seed=4)
    merged = tmp_path / "merged.safetensors"
    adaptools.merge(base, [kohya], out=merged)
    k = load_file(kohya)
    split = {"lora_unet_double_blocks_0_img_attn_qkv": [("transformer_blocks.0.attn.to_" + p, 16) for p in "qkv"],
             "lora_unet_single_blocks_1_linear1": [("single_transformer_blocks.1.attn.to_" + p, 16) for p in "qkv"]
             + [("single_transformer_blocks.1.proj_mlp", 64)],
             "lora_unet_double_blocks_1_txt_mlp_0": [("transformer_blocks.1.ff_context.net.0.proj", 64)]}
    state, row = {}, 0
    for name, parts in split.items():
        row = 0
        for module, rows in parts:
            state[f"transformer.{module}.lora_A.weight"] = k[f"{name}.lora_down.weight"].clone()
            state[f"transformer.{module}.lora_B.weight"] = k[f"{name}.lora_up.weight"][row:row + rows].contiguous()
            state[f"transformer.{module}.alpha"] = k[f"{name}.alpha"].clone()
            row += rows
    save_file(state, str(tmp_path / "diffusers.safetensors"))
    changed = {"double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight", "double_blocks.1.txt_mlp.0.weight"}
    assert_matches_diffusers("flux", base, merged, tmp_path / "diffusers.safetensors", torch.float32, components, changed)


def test_a_kohya_and_a_diffusers_lora_on_one_fused_weight_add(tmp_path):
    """Two adapters in one output: the whole fused qkv (kohya) and its q slice (diffusers) add up."""
    base, _ = write_single_file(tmp_path / "flux.safetensors", "flux")
    kohya = kohya_lora(tmp_path / "kohya.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": (48, 16, ())}, seed=5)
    diff = diffusers_lora(tmp_path / "diff.safetensors", {"transformer_blocks.0.attn.to_q": (16, 16)}, seed=6)
    adaptools.merge(base, [kohya, diff], weights=[0.5, 2.0], out=tmp_path / "merged.safetensors")
    key = "double_blocks.0.img_attn.qkv.weight"
    k, d = load_file(kohya), load_file(diff)
    expected = load_file(base)[key].double()
    expected += 0.5 * ALPHA / 2 * k["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].double() @ \
        k["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].double()
    expected[:16] += 2.0 * ALPHA / 2 * d["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"].double() @ \
        d["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].double()
    torch.testing.assert_close(load_file(tmp_path / "merged.safetensors")[key].double(), expected, rtol=0, atol=1e-5)


def test_each_writes_one_file_per_adapter(tmp_path):
    base, _ = write_single_file(tmp_path / "sd15.safetensors", "sd1")
    a = kohya_lora(tmp_path / "a.safetensors", dict(list(SD1_LORA.items())[:2]), seed=7)
    b = kohya_lora(tmp_path / "b.safetensors", dict(list(SD1_LORA.items())[3:5]), seed=8)
    report = adaptools.merge(base, [a, b], out=tmp_path / "out", each=True)
    assert report.outputs == {"a": tmp_path / "out" / "a.safetensors", "b": tmp_path / "out" / "b.safetensors"}
    for name, lora in (("a", a), ("b", b)):
        alone = adaptools.merge(base, [lora], out=tmp_path / f"{name}.merged.safetensors")
        assert load_file(report.outputs[name]).keys() == load_file(base).keys()
        ours, single = load_file(report.outputs[name]), load_file(alone.outputs[f"{name}.merged.safetensors"])
        assert all(torch.equal(ours[k], single[k]) for k in ours)


def test_cli_merge_names_the_family_and_embeds_the_recipe(tmp_path, runner):
    base, _ = write_single_file(tmp_path / "sd15.safetensors", "sd1")
    lora = kohya_lora(tmp_path / "lora.safetensors", dict(list(SD1_LORA.items())[:3]), seed=9)
    out = tmp_path / "merged.safetensors"
    result = run_cli(runner, "merge", base, lora, "-o", out)
    assert result.exit_code == 0, result.output
    assert "sd1 single file" in result.output and out.is_file()
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["modelspec.title"] == "tiny sd1"
    assert json.loads(metadata["adaptools_recipe"])["command"] == ["merge"]


def test_cli_lora_matching_nothing_is_one_error_line_and_no_output(tmp_path, runner):
    base, _ = write_single_file(tmp_path / "sd15.safetensors", "sd1")
    lora = kohya_lora(tmp_path / "lora.safetensors", {"lora_unet_down_blocks_9_attentions_0_proj_in": (8, 8, ()),
                                                       "lora_te_text_model_encoder_layers_7_mlp_fc1": (40, 24, ())},
                      seed=10)
    out = tmp_path / "merged.safetensors"
    result = run_cli(runner, "merge", base, lora, "-o", out)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 2 kohya module(s) match no weight of the base")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors", "sd15.safetensors"]


def save_pipeline(folder: Path, family: str, max_shard_size: str | None = None) -> dict:
    """A tiny pipeline folder of `family` (the models of `sd_components`, no VAE or tokenizer) and its components."""
    from diffusers import DDIMScheduler, FluxPipeline, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline

    components = sd_components(family)
    if family == "flux":
        pipe = FluxPipeline(transformer=components["transformer"], scheduler=None, vae=None, text_encoder=None,
                            tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    elif family == "sdxl-refiner":  # as stabilityai/stable-diffusion-xl-refiner-1.0 is saved: no CLIP-L
        pipe = StableDiffusionXLImg2ImgPipeline(vae=None, text_encoder=None, text_encoder_2=components["text_encoder_2"],
                                                tokenizer=None, tokenizer_2=None, unet=components["unet"],
                                                scheduler=DDIMScheduler(), requires_aesthetics_score=True)
    else:
        pipe = StableDiffusionPipeline(vae=None, text_encoder=components["text_encoder"], tokenizer=None,
                                       unet=components["unet"], scheduler=DDIMScheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, max_shard_size=max_shard_size)
    return components


def load_pipeline(folder: Path, family: str):
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline

    if family == "flux":
        return FluxPipeline.from_pretrained(folder, scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                            text_encoder_2=None, tokenizer_2=None)
    if family == "sdxl-refiner":
        return StableDiffusionXLImg2ImgPipeline.from_pretrained(folder, vae=None, text_encoder=None, tokenizer=None,
                                                                tokenizer_2=None)
    return StableDiffusionPipeline.from_pretrained(folder, vae=None, tokenizer=None, safety_checker=None,
                                                   feature_extractor=None, image_encoder=None)


@pytest.mark.parametrize("family, shard", [("sd1", None), ("sdxl-refiner", None), ("flux", None), ("flux", "40KB")],
                         ids=["sd1", "sdxl-refiner", "flux", "flux-sharded"])
def test_pipeline_folder_merges_and_loads_with_from_pretrained(tmp_path, runner, family, shard, single_thread):
    save_pipeline(tmp_path / "pipe", family, shard)
    (tmp_path / "pipe" / "scheduler").mkdir(exist_ok=True)
    (tmp_path / "pipe" / "scheduler" / "note.txt").write_text("copied as is")
    lora = (kohya_lora(tmp_path / "lora.safetensors", {"sd1": SD1_LORA, "sdxl-refiner": REFINER_LORA}[family], seed=11)
            if family != "flux" else diffusers_lora(tmp_path / "lora.safetensors", FLUX_DIFFUSERS_LORA, seed=12))
    result = run_cli(runner, "merge", tmp_path / "pipe", lora, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"{family} pipeline" in result.output
    assert (tmp_path / "out" / "scheduler" / "note.txt").read_text() == "copied as is"
    if shard:
        shards = sorted(p.name for p in (tmp_path / "out" / "transformer").glob("*.safetensors"))
        assert len(shards) > 1 and shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
        assert (tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = load_pipeline(tmp_path / "out", family)
    theirs = diffusers_reference(family, lora, torch.float32)
    for component, state in theirs.items():
        ours = getattr(loaded, component).state_dict()
        for key, value in state.items():
            torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-5, msg=f"{component}.{key}")


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner", "flux"])
def test_info_shows_family_components_and_dtypes(tmp_path, runner, family):
    base, components = write_single_file(tmp_path / "model.safetensors", family, torch.float16)
    result = run_cli(runner, "info", base, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["family"] == family and summary["container"] == f"{family} single file"
    for name, model in components.items():
        if isinstance(model, torch.nn.Module):
            params = sum(v.numel() for k, v in model.state_dict().items() if not k.endswith("position_ids"))
            assert summary["components"][name]["parameters"] == params, name
            assert set(summary["components"][name]["dtypes"]) == {"F16"}
    table = run_cli(runner, "info", base)
    assert table.exit_code == 0 and f"family: {family}" in table.output


def tuned_copy(base: Path, out: Path, keys: list[str], seed: int) -> Path:
    """`base` with the tensors `keys` changed by a random full-rank amount (everything else as stored)."""
    g = torch.Generator().manual_seed(seed)
    state = load_file(base)
    for key in keys:
        state[key] = state[key] + torch.randn(state[key].shape, generator=g).to(state[key].dtype) * 0.05
    save_file(state, str(out))
    return out


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_extract_full_rank_round_trip_with_locon_convs(tmp_path, runner, family, single_thread):
    """Full-rank extraction from a single-file pair (kohya by default; convs as LoCon factors, the OpenCLIP in_proj
    as q/k/v modules) merged back into the base reproduces the tuned file's changed weights."""
    base, _ = write_single_file(tmp_path / "base.safetensors", family)
    changed = (["model.diffusion_model.input_blocks.1.0.in_layers.2.weight",  # a 3x3 resnet conv
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight",
                "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
               if family == "sdxl" else
               ["double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight", "img_in.weight"])
    tuned = tuned_copy(base, tmp_path / "tuned.safetensors", changed, seed=13)
    lora = tmp_path / "extracted.safetensors"
    result = run_cli(runner, "extract", base, tuned, "--rank", "200", "-o", lora)
    assert result.exit_code == 0, result.output
    assert adaptools.detect_format(lora) == "kohya"
    names = list(load_file(lora))
    if family == "sdxl":
        assert "lora_te2_text_model_encoder_layers_0_self_attn_v_proj.lora_up.weight" in names
        assert "lora_te1_text_model_encoder_layers_1_mlp_fc2.lora_down.weight" in names
        down = load_file(lora)["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
        assert down.shape[1:] == (8, 3, 3)  # LoCon: (r, in, kh, kw)
    else:
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in names
    adaptools.merge(base, [lora], out=tmp_path / "merged.safetensors")
    merged, want, stored = load_file(tmp_path / "merged.safetensors"), load_file(tuned), load_file(base)
    for key in stored:
        if key in changed:
            torch.testing.assert_close(merged[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(merged[key], stored[key]), key


def test_spectrum_base_reads_fused_slices_and_kohya_names(tmp_path):
    """`spectrum --base` finds a slice's base rows through the name map, and kohya names through its namespaces."""
    base, _ = write_single_file(tmp_path / "flux.safetensors", "flux")
    diff = diffusers_lora(tmp_path / "diff.safetensors", {"single_transformer_blocks.1.proj_mlp": (64, 16)}, seed=14)
    doc = adaptools.spectrum(diff, base=base, device="cpu")
    (record,) = doc["modules"].values()
    rows = load_file(base)["single_blocks.1.linear1.weight"][48:112]
    assert record["base_frobenius_norm"] == pytest.approx(float(torch.linalg.matrix_norm(rows)), rel=1e-5)
    sd1, _ = write_single_file(tmp_path / "sd15.safetensors", "sd1")
    kohya = kohya_lora(tmp_path / "k.safetensors", dict(list(SD1_LORA.items())[5:6]), seed=15)
    doc = adaptools.spectrum(kohya, base=sd1, device="cpu")
    assert list(doc["modules"]) == ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]


def test_lora_to_dora_on_a_fused_slice_uses_its_rows(tmp_path):
    """`dora to-dora --base` on a single file: m = ‖W + s·B·A‖ per row, W the slice's own rows of the fused weight."""
    base, _ = write_single_file(tmp_path / "flux.safetensors", "flux")
    lora = diffusers_lora(tmp_path / "diff.safetensors", {"transformer_blocks.1.attn.add_v_proj": (16, 16)}, seed=17)
    dora = adaptools.to_dora(adaptools.load(lora), base)
    (module,) = dora.modules.values()
    W = load_file(base)["double_blocks.1.txt_attn.qkv.weight"][32:48].double()
    expected = torch.linalg.vector_norm(W + module.scale * module.B.double() @ module.A.double(), dim=1)
    torch.testing.assert_close(module.magnitude.double(), expected, rtol=1e-5, atol=1e-6)


def test_cli_each_writes_files_with_one_recipe_beside_them(tmp_path, runner):
    base, _ = write_single_file(tmp_path / "sd15.safetensors", "sd1")
    a = kohya_lora(tmp_path / "a.safetensors", dict(list(SD1_LORA.items())[:2]), seed=18)
    b = kohya_lora(tmp_path / "b.safetensors", dict(list(SD1_LORA.items())[2:4]), seed=19)
    result = run_cli(runner, "merge", base, a, b, "--each", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md", "a.safetensors", "adaptools_recipe.json", "b.safetensors"]
    assert load_file(tmp_path / "out" / "a.safetensors").keys() == load_file(base).keys()


def test_convert_base_maps_kohya_names_to_diffusers_paths(tmp_path, runner):
    """`convert --base CKPT.safetensors`: kohya names resolved through the family's map (LDM-style SDXL names to
    diffusers paths); the converted diffusers file merges into the checkpoint as the kohya file does."""
    base, _ = write_single_file(tmp_path / "sdxl.safetensors", "sdxl")
    lora = kohya_lora(tmp_path / "lora.safetensors", SDXL_LORA, seed=20)
    out = tmp_path / "converted.safetensors"
    result = run_cli(runner, "convert", lora, "--base", base, "--to", "diffusers", "-o", out)
    assert result.exit_code == 0, result.output
    keys = set(load_file(out))
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.lora_A.weight" in keys
    assert "text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj.lora_B.weight" in keys
    adaptools.merge(base, [lora], out=tmp_path / "a.safetensors")
    adaptools.merge(base, [out], out=tmp_path / "b.safetensors")
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_lycoris_loha_merges_into_a_single_file(tmp_path):
    """A LyCORIS LoHa file (kohya names) lands on the LDM key: ΔW = (alpha/r)·(w1a·w1b) ⊙ (w2a·w2b) (the LoHa
    reading itself is checked against LyCORIS in test_lycoris.py)."""
    base, _ = write_single_file(tmp_path / "sd15.safetensors", "sd1")
    g = torch.Generator().manual_seed(21)
    name = "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k"
    parts = {"hada_w1_a": (8, 2), "hada_w1_b": (2, 24), "hada_w2_a": (8, 2), "hada_w2_b": (2, 24)}
    state = {f"{name}.{p}": torch.randn(shape, generator=g) for p, shape in parts.items()}
    state[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(state, str(tmp_path / "loha.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})
    adaptools.merge(base, [tmp_path / "loha.safetensors"], out=tmp_path / "merged.safetensors")
    key = "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"
    s = {p: state[f"{name}.{p}"].double() for p in parts}
    delta = 0.5 * (s["hada_w1_a"] @ s["hada_w1_b"]) * (s["hada_w2_a"] @ s["hada_w2_b"])
    torch.testing.assert_close(load_file(tmp_path / "merged.safetensors")[key].double(),
                               load_file(base)[key].double() + delta, rtol=0, atol=1e-5)


SD3_LORA = {  # slices of the fused qkv weights (attn, context, attn2) and the last block's swapped modulation
    "transformer_blocks.0.attn.to_q": (16, 16), "transformer_blocks.0.attn2.to_v": (16, 16),
    "transformer_blocks.1.attn.add_k_proj": (16, 16), "transformer_blocks.1.ff.net.0.proj": (64, 16),
    "transformer_blocks.2.norm1_context.linear": (32, 16), "norm_out.linear": (32, 16),
}


def test_sd3_diffusers_lora_on_fused_slices_matches_diffusers(tmp_path, single_thread):
    base, components = write_single_file(tmp_path / "sd3.safetensors", "sd3", torch.float16)
    lora = diffusers_lora(tmp_path / "lora.safetensors", SD3_LORA, seed=22, alpha=None)  # SD3's loader reads no alphas
    report = adaptools.merge(base, [lora], out=tmp_path / "merged.safetensors")
    assert report.base == "sd3 single file"
    changed = {"model.diffusion_model." + k for k in (
        "joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.x_block.attn2.qkv.weight",
        "joint_blocks.1.context_block.attn.qkv.weight", "joint_blocks.1.x_block.mlp.fc1.weight",
        "joint_blocks.2.context_block.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.weight")}
    assert_matches_diffusers("sd3", base, tmp_path / "merged.safetensors", lora, torch.float16, components, changed)


def test_dtype_casts_a_single_file_and_refuses_quantized_outputs(tmp_path, runner):
    base, _ = write_single_file(tmp_path / "sd15.safetensors", "sd1")
    lora = kohya_lora(tmp_path / "lora.safetensors", dict(list(SD1_LORA.items())[:2]), seed=23)
    adaptools.merge(base, [lora], dtype="bf16", out=tmp_path / "bf16.safetensors")
    assert {v.dtype for v in load_file(tmp_path / "bf16.safetensors").values()} == {torch.bfloat16}
    result = run_cli(runner, "merge", base, lora, "--dtype", "nf4", "-o", tmp_path / "nf4.safetensors")
    assert result.exit_code == 2 and "--dtype nf4 does not apply" in result.stderr
    assert not (tmp_path / "nf4.safetensors").exists()


def test_extract_from_pipeline_folders_round_trips(tmp_path, runner, single_thread):
    """extract on two pipeline folders (kohya by default) and the result merged into the base pipeline reproduces
    the tuned one's changed weights (a resnet conv as LoCon factors, a text-encoder linear)."""
    save_pipeline(tmp_path / "base", "sd1")
    shutil.copytree(tmp_path / "base", tmp_path / "tuned")
    for component, key in (("unet", "down_blocks.0.resnets.1.conv2.weight"),
                           ("text_encoder", "encoder.layers.1.mlp.fc1.weight")):
        folder = tmp_path / "tuned" / component
        (weights,) = folder.glob("*.safetensors")
        state = load_file(weights)
        key = key if key in state else f"text_model.{key}"
        state[key] = state[key] + 0.05 * torch.randn(state[key].shape, generator=torch.Generator().manual_seed(24))
        save_file(state, str(weights))
    lora = tmp_path / "extracted.safetensors"
    result = run_cli(runner, "extract", tmp_path / "base", tmp_path / "tuned", "--rank", "400", "-o", lora)
    assert result.exit_code == 0, result.output
    assert sorted(k.split(".")[0] for k in load_file(lora) if k.endswith("lora_down.weight")) == [
        "lora_te_text_model_encoder_layers_1_mlp_fc1", "lora_unet_down_blocks_0_resnets_1_conv2"]
    adaptools.merge(tmp_path / "base", [lora], out=tmp_path / "merged")
    for component in ("unet", "text_encoder"):
        (merged,) = (tmp_path / "merged" / component).glob("*.safetensors")
        (tuned,) = (tmp_path / "tuned" / component).glob("*.safetensors")
        ours, want = load_file(merged), load_file(tuned)
        for key in want:
            torch.testing.assert_close(ours[key], want[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("hostile", ["index", "model_index"])
def test_hostile_pipeline_folders_are_one_error_line(tmp_path, runner, hostile):
    """A shard index naming a file outside its component, or a model_index.json that is no object: exit 2, one
    `error:` line, nothing written."""
    save_pipeline(tmp_path / "pipe", "flux", "40KB")
    if hostile == "index":
        index = tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
        data = json.loads(index.read_text())
        data["weight_map"][next(iter(data["weight_map"]))] = "../../victim.safetensors"
        index.write_text(json.dumps(data))
    else:
        (tmp_path / "pipe" / "model_index.json").write_text("[1, 2]")
    lora = diffusers_lora(tmp_path / "lora.safetensors", {"transformer_blocks.0.attn.to_q": (16, 16)}, seed=25)
    for args in (["merge", tmp_path / "pipe", lora, "-o", tmp_path / "out"], ["info", tmp_path / "pipe"]):
        result = run_cli(runner, *args)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()
