"""The diffusion name maps against diffusers' own single-file converters on tiny SD1.x, SDXL and Flux models."""
from __future__ import annotations

import pytest
import torch
from diffusion_fixtures import original_state, sd_components, to_diffusers, unet_to_ldm

from adaptools.checkpoints.names_diffusion import DiffusionNames, detect_family, ldm_unet_modules
from adaptools.errors import BaseMismatchError

CASES = [("sd1", ""), ("sd2", ""), ("sdxl", ""), ("sdxl-refiner", ""), ("flux", ""), ("flux", "model.diffusion_model."),
         ("sd3", "")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}{'-prefixed' if p else ''}" for f, p in CASES])
def case(request, single_thread):
    family, prefix = request.param
    components = sd_components(family)
    state = original_state(family, components, prefix)
    return family, state, to_diffusers(family, state, components), components


def kohya(names, name):
    found = names.kohya_names().get(name, set())
    assert len(found) <= 1, found
    return next(iter(found), None)


def stored_slice(state, target) -> torch.Tensor:
    value = state[target.key]
    if target.rows is not None:
        value = value[target.rows[0]:target.rows[1]]
    return value if target.row_order is None else value[target.row_order]


def test_fixtures_map_back_with_diffusers(case):
    """The original-layout fixtures are what diffusers' converters turn into the models' own weights."""
    family, _, converted, components = case
    for component, state in converted.items():
        ours = {k.removeprefix("text_model."): v for k, v in components[component].state_dict().items()
                if not k.endswith("position_ids") and k != "text_projection.weight"}
        theirs = {k.removeprefix("text_model."): v for k, v in state.items() if k != "text_projection.weight"}
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_every_weight_maps_to_its_stored_rows(case):
    """Each diffusers module of each component (both `text_model.` spellings) has a target whose stored rows are
    exactly what diffusers' converter made of them; unfused biases map as whole keys."""
    family, state, converted, _ = case
    names = DiffusionNames({k: tuple(v.shape) for k, v in state.items()})
    assert names.family == family
    checked = 0
    for component, weights in converted.items():
        for key, value in weights.items():
            if key == "text_projection.weight":  # OpenCLIP stores it transposed, outside the text model
                continue
            module, _, param = key.rpartition(".")
            inner = module.removeprefix("text_model.")
            spellings = [module] if component in ("unet", "transformer") else [
                f"{component}.text_model.{inner}", f"{component}.{inner}"]
            for name in spellings:
                target = names.target(name) if param == "weight" else None
                if target is not None:
                    assert torch.equal(stored_slice(state, target), value), name
                    checked += 1
                elif param == "weight" and value.ndim >= 2 and "embedding" not in name:
                    pytest.fail(f"no target for {name}")
                elif names.key(f"{name}.{param}") is not None:
                    assert torch.equal(state[names.key(f"{name}.{param}")], value)
    assert checked > 50


def test_fused_rows_and_swaps(case):
    family, state, _, _ = case
    names = DiffusionNames({k: tuple(v.shape) for k, v in state.items()})
    if family == "flux":
        prefix = next(k for k in state if k.endswith("img_in.weight"))[: -len("img_in.weight")]
        assert names.target("transformer_blocks.0.attn.add_k_proj").rows == (16, 32)
        assert names.target("single_transformer_blocks.1.proj_mlp").rows == (48, 48 + 64)
        assert names.target("single_transformer_blocks.1.proj_mlp").key == f"{prefix}single_blocks.1.linear1.weight"
        assert names.target("norm_out.linear").row_order is not None
        assert names.target("double_blocks.0.img_attn.qkv").rows is None  # kohya's BFL-style names: whole keys
        assert kohya(names, "lora_unet_double_blocks_0_img_attn_qkv") == "double_blocks.0.img_attn.qkv"
        assert kohya(names, "lora_unet_single_transformer_blocks_0_attn_to_q") == "single_transformer_blocks.0.attn.to_q"
    elif family == "sd3":
        target = names.target("transformer_blocks.0.attn2.to_v")
        assert (target.key, target.rows) == ("model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight", (32, 48))
        assert names.target("transformer_blocks.2.norm1_context.linear").row_order is not None  # the last block's
        assert names.target("transformer_blocks.1.norm1_context.linear").row_order is None
        assert kohya(names, "lora_unet_joint_blocks_1_context_block_attn_qkv") == "joint_blocks.1.context_block.attn.qkv"
    elif family == "sdxl":
        q = names.target("text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj")
        assert (q.key, q.rows) == ("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight", (64, 96))
        assert kohya(names, "lora_te2_text_model_encoder_layers_1_self_attn_v_proj") == \
            "text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj"
        assert kohya(names, "lora_te1_text_model_encoder_layers_1_mlp_fc1") == \
            "text_encoder.text_model.encoder.layers.1.mlp.fc1"
        assert kohya(names, "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q") == \
            "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"  # LDM-style kohya names: diffusers paths
        assert names.target("input_blocks.4.1.transformer_blocks.1.attn1.to_q") == \
            names.target("down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q")
    elif family == "sdxl-refiner":  # bigG is the refiner's only encoder (diffusers' text_encoder_2), embedder 0
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type

        assert infer_diffusers_model_type(state) == "xl_refiner"
        k = names.target("text_encoder_2.text_model.encoder.layers.9.self_attn.k_proj")
        assert (k.key, k.rows) == ("conditioner.embedders.0.model.transformer.resblocks.9.attn.in_proj_weight", (32, 64))
        assert kohya(names, "lora_te2_text_model_encoder_layers_9_mlp_fc1") == \
            "text_encoder_2.text_model.encoder.layers.9.mlp.fc1"
        assert kohya(names, "lora_te1_text_model_encoder_layers_0_mlp_fc1") is None
        assert kohya(names, "lora_unet_output_blocks_2_1_conv") == "up_blocks.0.upsamplers.0.conv"  # no attention
        assert kohya(names, "lora_unet_output_blocks_5_2_conv") == "up_blocks.1.upsamplers.0.conv"
        assert kohya(names, "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_k") == \
            "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k"
    else:
        assert kohya(names, "lora_te_text_model_encoder_layers_0_self_attn_q_proj") == \
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
        assert kohya(names, "lora_unet_down_blocks_0_resnets_1_conv2") == "down_blocks.0.resnets.1.conv2"
        assert names.target("down_blocks.0.resnets.1.conv2").key == "model.diffusion_model.input_blocks.2.0.out_layers.3.weight"


def test_ldm_names_of_a_diffusers_unet(case):
    """A pipeline's UNet (diffusers paths) takes kohya's LDM-style names: the inverted map gives every module the
    LDM path the fixtures' own diffusers → LDM naming gives it; a transformer has none."""
    family, _, _, components = case
    denoiser = components.get("unet", components.get("transformer"))
    modules = {k.removesuffix(".weight") for k in denoiser.state_dict() if k.endswith(".weight")}
    found = ldm_unet_modules(modules)
    if "unet" not in components:
        assert found == {}
        return
    ldm = unet_to_ldm({f"{m}.weight": m for m in modules}, components["unet_config"])
    assert found == {k.removeprefix("model.diffusion_model.").removesuffix(".weight"): m for k, m in ldm.items()}


def test_unknown_layout_is_named():
    with pytest.raises(BaseMismatchError, match="keys start with 'encoder', 'lm_head'"):
        detect_family({"lm_head.weight": (4, 4), "encoder.x.weight": (2, 2)})
    assert detect_family({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (6, 2)}) == "sd3"


def test_unet_alone_by_cross_attention_width():
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert detect_family({key: (320, 768)}) == "sd1"
    assert detect_family({key: (640, 2048)}) == "sdxl"
    assert detect_family({key: (768, 1280)}) == "sdxl-refiner"
