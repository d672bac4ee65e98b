"""Names of single-file diffusion checkpoints (DESIGN §15): the model family from the keys and shapes, and per
family one mapping from the stored keys (LDM / OpenCLIP / Black Forest Labs layouts) to the diffusers module paths
adapters name, with the row block of a fused weight each diffusers module occupies.

The mapping is written once, original key → diffusers key(s), and inverted: `DiffusionNames.target(module)` gives
the stored key (and row block, or row permutation) of a diffusers module path (`down_blocks.0...to_q`,
`text_encoder.text_model.encoder...`, `text_encoder_2...`, Flux `transformer_blocks.0.attn.to_q`) or of an
original module path (`input_blocks.1.1...`, `double_blocks.0.img_attn.qkv`, as kohya's LDM-style names spell it).
Only key names and shapes are used: a header is enough.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import BaseMismatchError
from ..names import listed, shown
from .names import NameMap, Target

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = {"cond_stage_model.transformer.": "text_encoder", "conditioner.embedders.0.transformer.": "text_encoder",
                 "text_encoders.clip_l.transformer.": "text_encoder", "text_encoders.clip_g.transformer.": "text_encoder_2"}
"""HF-layout CLIP text encoders (SD1, SDXL's CLIP-L, SD3's CLIP-L and CLIP-G) → diffusers component."""
OPEN_CLIP_PREFIXES = {"cond_stage_model.model.": "text_encoder", "conditioner.embedders.1.model.": "text_encoder_2",
                      "conditioner.embedders.0.model.": "text_encoder_2"}
"""OpenCLIP text encoders (SD2; SDXL's bigG; the SDXL refiner's only encoder) → diffusers component."""
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
KOHYA_NAMESPACES = {"lora_unet_": None, "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                    "lora_te2_": "text_encoder_2"}
"""kohya prefix → the component its names live in (None: the denoiser)."""


# ---- UNet (SD1.x, SD2.x, SDXL): LDM ↔ diffusers -------------------------------------------------------------------

RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2",
          "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut"}
UNET_LAYERS = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
               "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _resnet(rest: list[str]) -> str:
    """A resnet's inner LDM path (`in_layers.2.weight`) in diffusers' names (`conv1.weight`)."""
    joined = ".".join(rest)
    for old, new in RESNET.items():
        if joined.startswith(old + "."):
            return new + joined[len(old):]
    return joined


@dataclass(frozen=True)
class UnetShape:
    """What the LDM numbering depends on: resnets per down block and the name of the `label_emb` embedding."""

    layers_per_block: int
    label_embedding: str  # "add_embedding" (SDXL) or "class_embedding"


def unet_shape(keys: Iterable[str], label_embedding: str) -> UnetShape:
    """Layers per block from the LDM input blocks: n down blocks hold n·(L+1) input blocks (conv_in included)."""
    inputs, downsamplers = set(), set()
    for key in keys:
        parts = key.split(".")
        if parts[0] == "input_blocks" and len(parts) > 2 and parts[1].isdigit():
            inputs.add(int(parts[1]))
            if parts[2:4] == ["0", "op"]:
                downsamplers.add(int(parts[1]))
    blocks = len(downsamplers) + 1
    if not inputs or (max(inputs) + 1) % blocks:
        raise BaseMismatchError(f"the UNet's input blocks ({len(inputs)}) do not form {blocks} down blocks")
    return UnetShape((max(inputs) + 1) // blocks - 1, label_embedding)


def unet_to_diffusers(key: str, shape: UnetShape) -> str | None:
    """An LDM UNet key (without `model.diffusion_model.`) in diffusers' UNet2DConditionModel names (None: unknown)."""
    for old, new in UNET_LAYERS.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    if key.startswith("label_emb.0."):
        index, _, rest = key[len("label_emb.0."):].partition(".")
        return f"{shape.label_embedding}.linear_{1 if index == '0' else 2}.{rest}" if index in "02" else None
    parts = key.split(".")
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    head, n = parts[0], int(parts[1])
    if head == "middle_block":
        inside = ".".join(parts[2:])
        return (f"mid_block.resnets.{n // 2}." + _resnet(parts[2:]) if n in (0, 2)
                else f"mid_block.attentions.0.{inside}" if n == 1 else None)
    if len(parts) < 4 or not parts[2].isdigit():
        return None
    sub, rest = parts[2], parts[3:]
    per = shape.layers_per_block + 1
    if head == "input_blocks" and n > 0:
        i, j = divmod(n - 1, per)
        if sub == "0" and rest[0] == "op":
            return f"down_blocks.{i}.downsamplers.0.conv." + ".".join(rest[1:])
        return (f"down_blocks.{i}.resnets.{j}." + _resnet(rest) if sub == "0"
                else f"down_blocks.{i}.attentions.{j}." + ".".join(rest) if sub == "1" else None)
    if head == "output_blocks":
        i, j = divmod(n, per)
        if rest[0] == "conv" and sub in "12":
            return f"up_blocks.{i}.upsamplers.0.conv." + ".".join(rest[1:])
        return (f"up_blocks.{i}.resnets.{j}." + _resnet(rest) if sub == "0"
                else f"up_blocks.{i}.attentions.{j}." + ".".join(rest) if sub == "1" else None)
    return None


def ldm_block_prefixes(modules: set[str], shape: UnetShape) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) of every block a diffusers UNet with these module paths has, longest first:
    `unet_to_diffusers` applied to each LDM block prefix its shape allows (an upsampler's index by whether its up
    block has attention)."""
    per = shape.layers_per_block + 1
    down = len({m.split(".")[1] for m in modules if m.startswith("down_blocks.")})
    up = len({m.split(".")[1] for m in modules if m.startswith("up_blocks.")})
    ldm = [f"{old}." for old in UNET_LAYERS] + ["label_emb.0.0.", "label_emb.0.2."]
    ldm += [f"middle_block.{n}." for n in range(3)]
    ldm += [f"input_blocks.{n}.{sub}" for n in range(1, down * per) for sub in ("0.", "1.")]
    ldm += [f"input_blocks.{n}.0.op." for n in range(per, down * per, per)]  # a down block's last: downsampler
    for n in range(up * per):
        attention = any(m.startswith(f"up_blocks.{n // per}.attentions.") for m in modules)
        ldm += [f"output_blocks.{n}.0.", f"output_blocks.{n}.1."]
        ldm += [f"output_blocks.{n}.{2 if attention else 1}.conv."] if n % per == per - 1 else []
    pairs = [(unet_to_diffusers(prefix + "_", shape), prefix) for prefix in ldm]
    return sorted(((q[:-1], p) for q, p in pairs if q is not None and q.endswith("._")), key=lambda qp: -len(qp[0]))


def ldm_unet_modules(modules: Iterable[str]) -> dict[str, str]:
    """LDM module path → diffusers module path for the module paths of a diffusers UNet (a pipeline's `unet/`, which
    kohya's LDM-style SDXL names address): `unet_to_diffusers` inverted, each result checked by mapping it forward."""
    modules = set(modules)
    resnets = {int(m.split(".")[3]) for m in modules if m.startswith("down_blocks.0.resnets.")}
    if not resnets:
        return {}
    shape = UnetShape(max(resnets) + 1, "add_embedding" if any(m.startswith("add_embedding.") for m in modules)
                      else "class_embedding")
    back = {new: old for old, new in RESNET.items()}
    prefixes = ldm_block_prefixes(modules, shape)
    found: dict[str, str] = {}
    for module in modules:
        for diffusers_prefix, ldm_prefix in prefixes:
            if not f"{module}.".startswith(diffusers_prefix):
                continue
            inner = f"{module}."[len(diffusers_prefix):]  # "" for a module that is the whole block (conv_in)
            head, dot, rest = inner.partition(".")
            for candidate in (ldm_prefix + back.get(head, head) + dot + rest, ldm_prefix + inner):
                if unet_to_diffusers(f"{candidate}weight", shape) == f"{module}.weight":
                    found[candidate[:-1]] = module
                    break
            break
    return found


# ---- text encoders --------------------------------------------------------------------------------------------------

OPEN_CLIP_LAYER = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
OPEN_CLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                 "positional_embedding": "embeddings.position_embedding.weight",
                 "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}


def open_clip_to_diffusers(key: str, rows: int) -> list[tuple[str, tuple[int, int] | None]]:
    """An OpenCLIP key (after its prefix) as CLIP text-model keys (without `text_model.`), with row blocks: the fused
    `attn.in_proj_weight`/`_bias` (`rows` rows) is [q; k; v], I = rows / 3 each. [] for keys without a counterpart
    (text_projection, which diffusers stores transposed in another module)."""
    if key in OPEN_CLIP_TOP:
        return [(OPEN_CLIP_TOP[key], None)]
    fused = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
    if fused:
        layer, param = fused.groups()
        inner = rows // 3
        return [(f"encoder.layers.{layer}.self_attn.{p}_proj.{param}", (k * inner, (k + 1) * inner))
                for k, p in enumerate("qkv")]
    match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if match and match.group(2) in OPEN_CLIP_LAYER:
        layer, module, param = match.groups()
        return [(f"encoder.layers.{layer}.{OPEN_CLIP_LAYER[module]}.{param}", None)]
    return []


# ---- Flux (Black Forest Labs layout) --------------------------------------------------------------------------------

FLUX_TOP = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
            "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
            "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
            "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
            "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
            "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
            "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out"}
FLUX_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
               "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
               "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
               "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj",
               "txt_mlp.2": "ff_context.net.2", "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out"}
FLUX_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                     "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
FLUX_SINGLE = {"modulation.lin": "norm.linear", "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k",
               "linear2": "proj_out"}
FLUX_SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def flux_to_diffusers(key: str, inner: int, rows: int) -> list[tuple[str, tuple[int, int] | None, bool]]:
    """A BFL Flux key (without `model.diffusion_model.`) as diffusers FluxTransformer2DModel keys: (key, row block,
    halves swapped). `inner` is the hidden size I, `rows` the key's first dimension."""
    module, _, param = key.rpartition(".")
    param = "weight" if param == "scale" else param
    if module in FLUX_TOP:
        return [(f"{FLUX_TOP[module]}.{param}", None, False)]
    if module == "final_layer.adaLN_modulation.1":
        return [(f"norm_out.linear.{param}", None, True)]
    match = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", module)
    if not match:
        return []
    kind, n, inside = match.groups()
    block = f"{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{n}."
    plain, fused = (FLUX_DOUBLE, FLUX_DOUBLE_FUSED) if kind == "double" else (FLUX_SINGLE, {"linear1": FLUX_SINGLE_FUSED})
    if inside in plain:
        return [(f"{block}{plain[inside]}.{param}", None, False)]
    if inside in fused:
        bounds = [0, inner, 2 * inner, 3 * inner, rows][: len(fused[inside]) + 1]
        return [(f"{block}{name}.{param}", (bounds[k], bounds[k + 1]), False) for k, name in enumerate(fused[inside])]
    return []


# ---- SD3 / SD3.5 (MMDiT) ---------------------------------------------------------------------------------------------

SD3_TOP = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2", "context_embedder": "context_embedder",
           "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
           "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "final_layer.linear": "proj_out"}
SD3_BLOCK = {"x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k",
             "context_block.attn.ln_q": "attn.norm_added_q", "context_block.attn.ln_k": "attn.norm_added_k",
             "x_block.attn.proj": "attn.to_out.0", "context_block.attn.proj": "attn.to_add_out",
             "x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k",
             "x_block.attn2.proj": "attn2.to_out.0", "x_block.adaLN_modulation.1": "norm1.linear",
             "context_block.adaLN_modulation.1": "norm1_context.linear", "x_block.mlp.fc1": "ff.net.0.proj",
             "x_block.mlp.fc2": "ff.net.2", "context_block.mlp.fc1": "ff_context.net.0.proj",
             "context_block.mlp.fc2": "ff_context.net.2"}
SD3_FUSED = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
             "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}


def sd3_to_diffusers(key: str, rows: int, last: int) -> list[tuple[str, tuple[int, int] | None, bool]]:
    """An SD3 MMDiT key (without `model.diffusion_model.`) as SD3Transformer2DModel keys: (key, row block, halves
    swapped); `last` is the last joint block (its context modulation is stored shift, scale)."""
    if key == "pos_embed":
        return [("pos_embed.pos_embed", None, False)]
    module, _, param = key.rpartition(".")
    if module in SD3_TOP:
        return [(f"{SD3_TOP[module]}.{param}", None, False)]
    if module == "final_layer.adaLN_modulation.1":
        return [(f"norm_out.linear.{param}", None, True)]
    match = re.fullmatch(r"joint_blocks\.(\d+)\.(.+)", module)
    if not match:
        return []
    n, inside = int(match.group(1)), match.group(2)
    block = f"transformer_blocks.{n}."
    if inside in SD3_FUSED:
        third = rows // 3
        return [(f"{block}{name}.{param}", (k * third, (k + 1) * third), False)
                for k, name in enumerate(SD3_FUSED[inside])]
    if inside in SD3_BLOCK:
        return [(f"{block}{SD3_BLOCK[inside]}.{param}", None, n == last and inside == "context_block.adaLN_modulation.1")]
    return []


# ---- families -------------------------------------------------------------------------------------------------------

def flux_prefix(keys: Iterable[str]) -> str | None:
    """"" or "model.diffusion_model." when the keys are a BFL Flux transformer's, else None."""
    for prefix in ("", UNET_PREFIX):
        if f"{prefix}double_blocks.0.img_attn.qkv.weight" in keys and f"{prefix}img_in.weight" in keys:
            return prefix
    return None


def denoiser_prefix(family: str, keys: Iterable[str]) -> str:
    """The key prefix of the denoiser's tensors: `model.diffusion_model.`, or "" for a bare Flux / SD3 file."""
    if family == "flux":
        return flux_prefix(keys) or ""
    if family == "sd3":
        return UNET_PREFIX if any(k.startswith(UNET_PREFIX + "joint_blocks.") for k in keys) else ""
    return UNET_PREFIX


def detect_family(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The model family of a single-file checkpoint from its keys and shapes; an unknown layout raises naming what
    it found (its top-level key prefixes)."""
    keys = shapes.keys()
    if flux_prefix(keys) is not None:
        return "flux"
    if any(k.startswith(UNET_PREFIX + "joint_blocks.") or k.startswith("joint_blocks.") for k in keys):
        return "sd3"
    unet = any(k.startswith(UNET_PREFIX + "input_blocks.") for k in keys)
    if unet and any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return "sdxl"
    if unet and any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "sdxl-refiner"
    if unet and any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if unet and any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    if unet:  # a UNet alone: by its cross-attention width (768 SD1, 1024 SD2, 2048 SDXL, 1280 the SDXL refiner)
        widths = {s[1] for k, s in shapes.items() if k.endswith(".attn2.to_k.weight") and len(s) == 2}
        for family, width in (("sd1", 768), ("sd2", 1024), ("sdxl", 2048), ("sdxl-refiner", 1280)):
            if widths == {width}:
                return family
        if any(k.startswith(UNET_PREFIX + "label_emb.") for k in keys):
            return "sdxl"
        return "sd1"
    heads = sorted({k.split(".", 1)[0] for k in keys})
    raise BaseMismatchError(
        f"not a single-file checkpoint layout adaptools knows (SD1.x/SD2.x/SDXL LDM, Flux BFL, SD3): its keys start with "
        f"{listed([shown(h) for h in heads])}"
    )


@dataclass(frozen=True)
class Mapped:
    """One stored key's counterpart in diffusers: component (None: the denoiser), key there, row block, swapped."""

    component: str | None
    key: str
    rows: tuple[int, int] | None = None
    swapped: bool = False


def stored_to_diffusers(family: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, list[Mapped]]:
    """Each stored key's diffusers counterparts (text-encoder keys without `text_model.`); keys with none (the VAE,
    text projections, unknown extras) are left out."""
    keys = list(shapes)
    mapped: dict[str, list[Mapped]] = {}
    if family in ("flux", "sd3"):
        prefix = denoiser_prefix(family, keys)
        inner = shapes[f"{prefix}img_in.weight"][0] if family == "flux" else 0
        last = max((int(k.split(".")[1]) for k in (key[len(prefix):] for key in keys if key.startswith(prefix))
                    if k.startswith("joint_blocks.")), default=0)
        for key in keys:
            if key.startswith(prefix):
                rows = shapes[key][0] if shapes[key] else 0
                found = (flux_to_diffusers(key[len(prefix):], inner, rows) if family == "flux"
                         else sd3_to_diffusers(key[len(prefix):], rows, last))
                if found:
                    mapped[key] = [Mapped(None, k, r, swapped) for k, r, swapped in found]
    else:
        shape = unet_shape((k[len(UNET_PREFIX):] for k in keys if k.startswith(UNET_PREFIX)),
                           "add_embedding" if family.startswith("sdxl") else "class_embedding")
        for key in keys:
            found = unet_to_diffusers(key[len(UNET_PREFIX):], shape) if key.startswith(UNET_PREFIX) else None
            if found:
                mapped[key] = [Mapped(None, found)]
    for key in keys:
        for prefix, component in CLIP_PREFIXES.items():
            if key.startswith(prefix + "text_model."):
                mapped[key] = [Mapped(component, key[len(prefix + "text_model."):])]
        for prefix, component in OPEN_CLIP_PREFIXES.items():
            if key.startswith(prefix):
                rows = shapes[key][0] if shapes[key] else 0
                found = open_clip_to_diffusers(key[len(prefix):], rows)
                mapped[key] = [Mapped(component, k, r) for k, r in found]
    return {k: v for k, v in mapped.items() if v}


def swap_halves(rows: int) -> Tensor:
    """The row order that swaps a weight's two halves (BFL shift, scale ↔ diffusers scale, shift): its own inverse."""
    half = rows // 2
    return torch.cat([torch.arange(half, rows), torch.arange(0, half)])


def module_names(component: str | None, module: str) -> list[str]:
    """The adapter module paths of a diffusers module: denoiser paths bare; text-encoder paths with their
    component, both with and without `text_model.` (transformers 5 keeps it only in CLIPTextModelWithProjection)."""
    if component is None:
        return [module]
    return [f"{component}.text_model.{module}", f"{component}.{module}"]


class DiffusionNames(NameMap):
    """The name map of a single-file diffusion checkpoint: adapter module path → Target (stored key, row block)."""

    full_tensors = False

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], family: str | None = None):
        super().__init__(shapes)
        self.family = family or detect_family(shapes)
        self._targets: dict[str, Target] = {}
        self._tensors: dict[str, str] = {}
        whole: dict[str, str] = {}  # stored key → the diffusers module that is all of it
        self._held: dict[str, list[tuple[str, tuple[int, int] | None]]] = {}
        for key, found in stored_to_diffusers(self.family, shapes).items():
            for m in found:
                module, _, param = m.key.rpartition(".")
                order = swap_halves(shapes[key][0]) if m.swapped else None
                if param == "weight" and self.family not in ("flux", "sd3"):
                    self._held.setdefault(key, []).append((module_names(m.component, module)[0], m.rows))
                for name in module_names(m.component, module):
                    if param == "weight":
                        self._targets[name] = Target(key, m.rows, order)
                        if m.rows is None and order is None:
                            whole.setdefault(key, name)
                    if m.rows is None and not m.swapped:
                        self._tensors[f"{name}.{param}"] = key
        prefix = denoiser_prefix(self.family, shapes.keys())
        self._original: dict[str, str] = {}
        self._prefix = prefix
        for key in shapes:  # the original names of the denoiser's modules (kohya's LDM- and BFL-style names)
            if key.startswith(prefix) and key.endswith(".weight"):
                original = key[len(prefix): -len(".weight")]
                self._targets.setdefault(original, Target(key))
                self._original[original] = whole.get(key, original)

    def modules(self) -> list[str]:
        """Every module path an adapter may name (diffusers paths and the original layout's own)."""
        return list(self._targets)

    def target(self, module: str) -> Target | None:
        """Where `module`'s update lands, or None."""
        return self._targets.get(module)

    def key(self, name: str) -> str | None:
        """The stored key of a full tensor in diffusers' spelling (a bias), or None when it is not one stored key
        as a whole (a fused slice)."""
        return self._tensors.get(name)

    def adapter_modules(self, key: str) -> list[tuple[str, tuple[int, int] | None]]:
        """The diffusers modules a stored weight holds (q, k and v of an OpenCLIP in_proj by rows); Flux and SD3 keep
        their original names (kohya's convention for them, fused qkv whole); a key of no component keeps its own."""
        if key in self._held:
            return self._held[key]
        module = key.removesuffix(".weight")
        return [(module[len(self._prefix):] if module.startswith(self._prefix) else module, None)]

    def kohya_names(self) -> dict[str, set[str]]:
        return kohya_namespace_names(self._targets, self._original)


def kohya_namespace_names(modules: Iterable[str], canonical: Mapping[str, str]) -> dict[str, set[str]]:
    """kohya name → module path: `lora_unet_` + a denoiser path (through `canonical`: an original-layout path to
    the diffusers module that is all of its weight), `lora_te_`/`lora_te1_` + a `text_encoder` path and `lora_te2_`
    + a `text_encoder_2` path (with `text_model.`), dots as underscores."""
    names: dict[str, set[str]] = {}
    for module in modules:
        component = module.split(".", 1)[0] if module.startswith(TEXT_ENCODERS) else None
        inner = module if component is None else module[len(component) + 1:]
        if component is not None and not inner.startswith("text_model."):
            continue
        for prefix, space in KOHYA_NAMESPACES.items():
            if space == component:
                names.setdefault(prefix + inner.replace(".", "_"), set()).add(canonical.get(module, module))
    return names
