"""Tiny SD1.x / SDXL / Flux models made with diffusers and transformers, saved as single-file checkpoints in their
original layouts (LDM, OpenCLIP, Black Forest Labs).

The original key names are written here, independently of adaptools' name map, from the diffusers models'
structure (as diffusers' own diffusers→original scripts do); `to_diffusers` proves each file maps back with
diffusers' own converters (`diffusers.loaders.single_file_utils`), so a test of adaptools' map against these files
is a test against diffusers.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch
from torch import Tensor

SD1_UNET = dict(block_out_channels=(8, 16), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24, norm_num_groups=4,
                attention_head_dim=2)
SDXL_UNET = dict(block_out_channels=(8, 16), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=56, norm_num_groups=4,
                 attention_head_dim=2, transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=40)
SD2_UNET = dict(SD1_UNET, cross_attention_dim=32, use_linear_projection=True)
REFINER_UNET = dict(SDXL_UNET, block_out_channels=(8, 16, 24, 24), sample_size=16, cross_attention_dim=32,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 1, 2, 1), projection_class_embeddings_input_dim=52)
"""The SDXL refiner's UNet in small: four down blocks, attention in the middle two, conditioned on bigG alone."""
CLIP_L = dict(hidden_size=24, intermediate_size=40, num_attention_heads=4, num_hidden_layers=2, vocab_size=100,
              max_position_embeddings=16, projection_dim=24, bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_G = dict(CLIP_L, hidden_size=32, intermediate_size=48, projection_dim=32, hidden_act="gelu")
REFINER_CLIP_G = dict(CLIP_G, num_hidden_layers=10)
"""Ten layers: diffusers tells a refiner by `conditioner.embedders.0.model.transformer.resblocks.9...`."""
FLUX = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4))

SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
           joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
           pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")


def seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`module` with every parameter drawn again from N(0, 0.2²) (zero-initialised layers become non-trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return module.eval()


def make_unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return seeded(UNet2DConditionModel(**config), seed)


def make_clip(config: dict, projection: bool, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return seeded(cls(CLIPTextConfig(**config)), seed)


def make_sd3(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return seeded(SD3Transformer2DModel(**SD3), seed)


def make_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return seeded(FluxTransformer2DModel(**FLUX), seed)


# ---- diffusers → original names (written from the structure, as diffusers' reverse scripts do) -------------------

RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                 "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def unet_to_ldm(state: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """A diffusers UNet2DConditionModel state dict in LDM names (`model.diffusion_model.` prefix)."""
    per = config["layers_per_block"] + 1
    up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    out = {}
    for key, value in state.items():
        new = None
        for old, ldm in fixed.items():
            if key.startswith(old + "."):
                new = ldm + key[len(old):]
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(\w+)(.*)", key):
            i, kind, j, part, rest = m.groups()
            n = 1 + int(i) * per + int(j)
            new = (f"input_blocks.{n}.0.{RESNET_TO_LDM.get(part, part)}{rest}" if kind == "resnets"
                   else f"input_blocks.{n}.1.{part}{rest}")
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(\w+)(.*)", key):
            i, kind, j, part, rest = m.groups()
            n = int(i) * per + int(j)
            new = (f"output_blocks.{n}.0.{RESNET_TO_LDM.get(part, part)}{rest}" if kind == "resnets"
                   else f"output_blocks.{n}.1.{part}{rest}")
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            i = int(m[1])
            new = f"output_blocks.{i * per + per - 1}.{2 if up_attention[i] else 1}.conv.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(\w+)(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{RESNET_TO_LDM.get(m[2], m[2])}{m[3]}"
        elif key.startswith("mid_block.attentions.0."):
            new = "middle_block.1." + key[len("mid_block.attentions.0."):]
        assert new is not None, key
        out["model.diffusion_model." + new] = value
    return out


def clip_to_ldm(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """A transformers CLIPTextModel state dict under an LDM prefix (with `text_model.`, as the files hold it)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


OPEN_CLIP = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_to_ldm(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """A CLIPTextModelWithProjection state dict as OpenCLIP keys: q, k, v fused into `attn.in_proj_*` = [q; k; v]."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
           prefix + "text_projection": state.pop("text_projection.weight").T.contiguous()}
    state.pop("embeddings.position_ids", None)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for n in layers:
        head = f"encoder.layers.{n}."
        for param in ("weight", "bias"):
            out[f"{prefix}transformer.resblocks.{n}.attn.in_proj_{param}"] = torch.cat(
                [state.pop(f"{head}self_attn.{p}_proj.{param}") for p in "qkv"])
            for ours, theirs in OPEN_CLIP.items():
                out[f"{prefix}transformer.resblocks.{n}.{theirs}.{param}"] = state.pop(f"{head}{ours}.{param}")
    assert not state, sorted(state)
    return out


FLUX_PLAIN = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
              "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
              "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
              "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
              "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
              "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
              "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
FLUX_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "ff.net.0.proj": "img_mlp.0",
               "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
               "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"}
FLUX_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm",
              "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}


def flux_to_bfl(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """A FluxTransformer2DModel state dict in the BFL layout (fused qkv and linear1, final modulation halves swapped)."""
    state = dict(state)
    out: dict[str, Tensor] = {}
    for ours, theirs in FLUX_PLAIN.items():
        for param in ("weight", "bias"):
            out[f"{theirs}.{param}"] = state.pop(f"{ours}.{param}")
    for param in ("weight", "bias"):
        shift_last = state.pop(f"norm_out.linear.{param}")
        scale, shift = shift_last.chunk(2)
        out[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([shift, scale])
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    for n in blocks:
        ours, theirs = f"transformer_blocks.{n}.", f"double_blocks.{n}."
        for param in ("weight", "bias"):
            for a, b in FLUX_DOUBLE.items():
                out[f"{theirs}{b}.{param}"] = state.pop(f"{ours}{a}.{param}")
            out[f"{theirs}img_attn.qkv.{param}"] = torch.cat([state.pop(f"{ours}attn.to_{p}.{param}") for p in "qkv"])
            out[f"{theirs}txt_attn.qkv.{param}"] = torch.cat(
                [state.pop(f"{ours}attn.add_{p}_proj.{param}") for p in "qkv"])
        for a, b in FLUX_NORMS.items():
            out[f"{theirs}{b if 'added' in a else 'img_attn.' + b}.scale"] = state.pop(f"{ours}{a}.weight")
    singles = sorted({int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")})
    for n in singles:
        ours, theirs = f"single_transformer_blocks.{n}.", f"single_blocks.{n}."
        for param in ("weight", "bias"):
            out[f"{theirs}modulation.lin.{param}"] = state.pop(f"{ours}norm.linear.{param}")
            out[f"{theirs}linear2.{param}"] = state.pop(f"{ours}proj_out.{param}")
            out[f"{theirs}linear1.{param}"] = torch.cat(
                [state.pop(f"{ours}attn.to_{p}.{param}") for p in "qkv"] + [state.pop(f"{ours}proj_mlp.{param}")])
        out[f"{theirs}norm.query_norm.scale"] = state.pop(f"{ours}attn.norm_q.weight")
        out[f"{theirs}norm.key_norm.scale"] = state.pop(f"{ours}attn.norm_k.weight")
    assert not state, sorted(state)
    return {prefix + k: v for k, v in out.items()}


SD3_PLAIN = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "context_embedder": "context_embedder",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
SD3_BLOCK = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
             "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
             "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
             "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
             "attn2.to_out.0": "x_block.attn2.proj", "norm1.linear": "x_block.adaLN_modulation.1",
             "norm1_context.linear": "context_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1",
             "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1",
             "ff_context.net.2": "context_block.mlp.fc2"}


def swapped(value: Tensor) -> Tensor:
    first, second = value.chunk(2)
    return torch.cat([second, first])


def sd3_to_original(state: dict[str, Tensor], prefix: str = "model.diffusion_model.") -> dict[str, Tensor]:
    """An SD3Transformer2DModel state dict in the MMDiT layout (fused qkv; the last block's context modulation and
    the final modulation stored shift, scale)."""
    state = dict(state)
    out = {"pos_embed": state.pop("pos_embed.pos_embed")}
    for ours, theirs in SD3_PLAIN.items():
        for param in ("weight", "bias"):
            out[f"{theirs}.{param}"] = state.pop(f"{ours}.{param}")
    for param in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{param}"] = swapped(state.pop(f"norm_out.linear.{param}"))
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    for n in blocks:
        ours, theirs = f"transformer_blocks.{n}.", f"joint_blocks.{n}."
        for fused, parts in (("x_block.attn.qkv", "attn.to_{}"), ("context_block.attn.qkv", "attn.add_{}_proj"),
                             ("x_block.attn2.qkv", "attn2.to_{}")):
            for param in ("weight", "bias"):
                if f"{ours}{parts.format('q')}.{param}" in state:
                    out[f"{theirs}{fused}.{param}"] = torch.cat(
                        [state.pop(f"{ours}{parts.format(p)}.{param}") for p in "qkv"])
        for a, b in SD3_BLOCK.items():
            for param in ("weight", "bias"):
                if f"{ours}{a}.{param}" in state:
                    value = state.pop(f"{ours}{a}.{param}")
                    last = n == blocks[-1] and a == "norm1_context.linear"
                    out[f"{theirs}{b}.{param}"] = swapped(value) if last else value
    assert not state, sorted(state)
    return {prefix + k: v for k, v in out.items()}


OPEN_CLIP_PREFIX = {"sdxl": "conditioner.embedders.1.model.", "sdxl-refiner": "conditioner.embedders.0.model."}
"""Where SDXL files keep OpenCLIP bigG: the base's second embedder, the refiner's only one."""


# ---- original → diffusers with diffusers' own converters ----------------------------------------------------------

def flux_converter(inner_dim: int):
    """diffusers' `convert_flux_transformer_checkpoint_to_diffusers` with its hard-coded inner_dim 3072 replaced
    (DESIGN §15): the function's own source, one constant changed."""
    from diffusers.loaders import single_file_utils

    source = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in source
    namespace = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), namespace)  # noqa: S102 (diffusers' code)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def to_diffusers(family: str, state: dict[str, Tensor], components: dict) -> dict[str, dict[str, Tensor]]:
    """A single file's tensors as diffusers component state dicts, by diffusers' own converters."""
    from diffusers.loaders import single_file_utils as sfu

    state = {k: v.clone() for k, v in state.items()}  # the Flux converter mutates its input
    if family == "flux":
        inner = FLUX["num_attention_heads"] * FLUX["attention_head_dim"]
        return {"transformer": flux_converter(inner)(state)}
    if family == "sd3":
        return {"transformer": sfu.convert_sd3_transformer_checkpoint_to_diffusers(state)}
    out = {"unet": sfu.convert_ldm_unet_checkpoint(state, components["unet_config"])}
    if family == "sd2":
        out["text_encoder"] = sfu.convert_open_clip_checkpoint(components["text_encoder"], state,
                                                               prefix="cond_stage_model.model.")
    if family == "sd1":
        out["text_encoder"] = sfu.convert_ldm_clip_checkpoint(state)
    if family == "sdxl":
        out["text_encoder"] = sfu.convert_ldm_clip_checkpoint(state)
    if family.startswith("sdxl"):
        out["text_encoder_2"] = sfu.convert_open_clip_checkpoint(components["text_encoder_2"], state,
                                                                 prefix=OPEN_CLIP_PREFIX[family])
    return out


def sd_components(family: str, seed: int = 0) -> dict:
    """The tiny diffusers/transformers models of a family, by component name (plus `unet_config`)."""
    if family == "flux":
        return {"transformer": make_flux(seed)}
    if family == "sd3":
        return {"transformer": make_sd3(seed)}
    config = {"sd1": SD1_UNET, "sd2": SD2_UNET, "sdxl": SDXL_UNET, "sdxl-refiner": REFINER_UNET}[family]
    components = {"unet": make_unet(config, seed), "unet_config": dict(config)}
    if family != "sdxl-refiner":  # the refiner has no CLIP-L
        components["text_encoder"] = (make_clip(CLIP_G, projection=True, seed=seed + 1) if family == "sd2"
                                      else make_clip(CLIP_L, projection=False, seed=seed + 1))
    if family.startswith("sdxl"):
        clip_g = REFINER_CLIP_G if family == "sdxl-refiner" else CLIP_G
        components["text_encoder_2"] = make_clip(clip_g, projection=True, seed=seed + 2)
    return components


def original_state(family: str, components: dict, flux_prefix: str = "") -> dict[str, Tensor]:
    """The components' weights in the family's original single-file layout."""
    if family == "flux":
        return flux_to_bfl(components["transformer"].state_dict(), flux_prefix)
    if family == "sd3":
        return sd3_to_original(components["transformer"].state_dict())
    state = unet_to_ldm(components["unet"].state_dict(), components["unet_config"])
    if family == "sd2":  # OpenCLIP ViT-H as SD2's only text encoder
        state.update(open_clip_to_ldm(components["text_encoder"].state_dict(), "cond_stage_model.model."))
        return state
    if "text_encoder" in components:
        te_prefix = "cond_stage_model.transformer." if family == "sd1" else "conditioner.embedders.0.transformer."
        state.update(clip_to_ldm(components["text_encoder"].state_dict(), te_prefix))
    if family.startswith("sdxl"):
        state.update(open_clip_to_ldm(components["text_encoder_2"].state_dict(), OPEN_CLIP_PREFIX[family]))
    state["first_stage_model.quant_conv.weight"] = torch.linspace(-1, 1, 32).reshape(2, 4, 2, 2)  # a VAE stand-in
    return state


def write_single_file(path: Path, family: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                      flux_prefix: str = "", metadata: dict[str, str] | None = None) -> tuple[Path, dict]:
    """(file, components): a tiny `family` model saved as one original-layout safetensors file in `dtype`."""
    from safetensors.torch import save_file

    components = sd_components(family, seed)
    state = {k: v.to(dtype).contiguous() for k, v in original_state(family, components, flux_prefix).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata or {"modelspec.title": f"tiny {family}"})
    return path, components
