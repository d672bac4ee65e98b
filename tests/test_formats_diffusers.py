"""diffusers LoRA files against diffusers' own loader: `lora_state_dict` + `load_lora_into_unet/transformer` (what a
pipeline's `load_lora_weights` runs) and `fuse_lora` into a tiny random UNet and a tiny Flux transformer, compared
with adaptools' merge of the same file; every key style is written by code with random tensors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptools
from adaptools.formats.diffusers import parse_key

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin, StableDiffusionLoraLoaderMixin  # noqa: E402

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
UNET_TARGETS = {  # module path → rank (mixed ranks, a 3x3 conv)
    f"{ATTN}.attn1.to_q": 2, f"{ATTN}.attn1.to_k": 3, f"{ATTN}.attn1.to_v": 2, f"{ATTN}.attn1.to_out.0": 2,
    f"{ATTN}.attn2.to_q": 2, f"{ATTN}.attn2.to_k": 2,
}
CONV = "down_blocks.0.resnets.0.conv1"
FLUX_TARGETS = {"transformer_blocks.0.attn.to_q": 2, "transformer_blocks.0.attn.to_k": 3,
                "transformer_blocks.0.attn.to_out.0": 2, "single_transformer_blocks.0.attn.to_v": 2,
                "single_transformer_blocks.0.proj_out": 4}


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    path = tmp_path_factory.mktemp("unet")
    unet.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                  axes_dims_rope=(2, 2, 4))
    path = tmp_path_factory.mktemp("flux")
    flux.save_pretrained(path)
    return path


def base_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def factors(base: dict[str, torch.Tensor], targets: dict[str, int], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (down, up) per module, shaped for its base weight (conv: down (r, in, kh, kw), up (out, r, 1, 1))."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module, r in targets.items():
        w = base[f"{module}.weight"]
        down = torch.randn(r, *w.shape[1:], generator=gen) * 0.3
        up = torch.randn(w.shape[0], r, *([1] * (w.ndim - 2)), generator=gen) * 0.3
        out[module] = (down, up)
    return out


def style_keys(module: str, style: str) -> tuple[str, str]:
    """(down key, up key) of `module` in a key style (without the component prefix)."""
    if style == "processor":
        attention, _, projection = module.rpartition(".attn")
        attn, proj = f"{attention}.attn{projection.split('.')[0]}", projection.split(".", 1)[1]
        proj = "to_out" if proj == "to_out.0" else proj
        return f"{attn}.processor.{proj}_lora.down.weight", f"{attn}.processor.{proj}_lora.up.weight"
    if style == "lora.down":
        return f"{module}.lora.down.weight", f"{module}.lora.up.weight"
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def write_lora(path: Path, fac: dict, style: str, prefix: str, alphas: dict[str, float] | None = None,
               metadata: dict | None = None) -> Path:
    state = {}
    for module, (down, up) in fac.items():
        down_key, up_key = style_keys(module, style)
        state[prefix + down_key], state[prefix + up_key] = down.contiguous(), up.contiguous()
        if alphas and module in alphas:
            state[f"{prefix}{module}.alpha"] = torch.tensor(alphas[module])
    meta = {"format": "pt"}
    if metadata is not None:
        meta["lora_adapter_metadata"] = json.dumps(metadata)
    save_file(state, str(path), metadata=meta)
    return path


def diffusers_fused_unet(unet_dir: Path, lora: Path) -> dict[str, torch.Tensor]:
    """What a StableDiffusion pipeline's load_lora_weights + fuse_lora does to its UNet."""
    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(str(lora), return_lora_metadata=True)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet=unet, metadata=metadata)
    unet.fuse_lora()
    return fused_state(unet)


def diffusers_fused_flux(flux_dir: Path, lora: Path) -> dict[str, torch.Tensor]:
    """What a Flux pipeline's load_lora_weights + fuse_lora does to its transformer."""
    flux = FluxTransformer2DModel.from_pretrained(flux_dir)
    state, alphas, metadata = FluxLoraLoaderMixin.lora_state_dict(str(lora), return_alphas=True, return_lora_metadata=True)
    FluxLoraLoaderMixin.load_lora_into_transformer(state, network_alphas=alphas, transformer=flux, metadata=metadata)
    flux.fuse_lora()
    return fused_state(flux)


def fused_state(model) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def adaptools_merged(base_dir: Path, lora: Path, out: Path) -> dict[str, torch.Tensor]:
    adaptools.merge(base_dir, [lora], out=out)
    return base_weights(out)


def assert_same_weights(ours: dict, theirs: dict, base: dict, targets) -> None:
    assert set(ours) == set(theirs) == set(base)
    for key in base:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)
    for module in targets:  # the adapter did change these
        assert not torch.equal(ours[f"{module}.weight"], base[f"{module}.weight"]), module


UNET_CASES = {
    "peft_keys": dict(style="peft", prefix="unet."),
    "peft_keys_metadata": dict(style="peft", prefix="unet.", metadata=True),
    "lora_down_up": dict(style="lora.down", prefix="unet."),
    "attention_processor": dict(style="processor", prefix="unet."),
}


@pytest.mark.parametrize("case", list(UNET_CASES))
def test_unet_lora_merges_as_diffusers_fuses_it(case, unet_dir, tmp_path):
    spec = UNET_CASES[case]
    base = base_weights(unet_dir)
    targets = dict(UNET_TARGETS) if spec["style"] == "processor" else {**UNET_TARGETS, CONV: 2}
    fac = factors(base, targets, seed=1)
    metadata = None
    if spec.get("metadata"):  # a LoraConfig per component, as diffusers' save_lora_weights records it
        metadata = {"unet.r": 2, "unet.lora_alpha": 4, "unet.rank_pattern": {f"{ATTN}.attn1.to_k": 3},
                    "unet.alpha_pattern": {f"{ATTN}.attn1.to_k": 1.5}, "unet.target_modules": list(targets),
                    "unet.use_dora": False, "unet.lora_bias": False}
    lora = write_lora(tmp_path / "lora.safetensors", fac, spec["style"], spec["prefix"], metadata=metadata)
    assert adaptools.detect_format(lora) == "diffusers"
    ours = adaptools_merged(unet_dir, lora, tmp_path / "merged")
    assert_same_weights(ours, diffusers_fused_unet(unet_dir, lora), base, targets)
    if metadata:
        read = adaptools.load(lora)
        assert read[f"{ATTN}.attn1.to_q"].scale == 2.0 and read[f"{ATTN}.attn1.to_k"].scale == 0.5


def test_flux_lora_with_alpha_keys_merges_as_diffusers_fuses_it(flux_dir, tmp_path):
    base = base_weights(flux_dir)
    fac = factors(base, FLUX_TARGETS, seed=2)
    alphas = {m: float(2 * r) for m, r in FLUX_TARGETS.items()} | {"transformer_blocks.0.attn.to_k": 1.0}
    lora = write_lora(tmp_path / "flux.safetensors", fac, "peft", "transformer.", alphas=alphas)
    adapter = adaptools.load(lora)
    assert adapter["transformer_blocks.0.attn.to_k"].scale == pytest.approx(1 / 3)
    ours = adaptools_merged(flux_dir, lora, tmp_path / "merged")
    assert_same_weights(ours, diffusers_fused_flux(flux_dir, lora), base, FLUX_TARGETS)


def test_every_key_style_and_prefix_reads_the_same_update(unet_dir, tmp_path):
    base = base_weights(unet_dir)
    fac = factors(base, UNET_TARGETS, seed=3)
    reference = adaptools.load(write_lora(tmp_path / "ref.safetensors", fac, "peft", "unet."))
    for style in ("peft", "lora.down", "processor"):
        for prefix in ("unet.", ""):
            other = adaptools.load(write_lora(tmp_path / f"{style}{prefix}.safetensors", fac, style, prefix))
            assert list(other.modules) == list(reference.modules)
            for name in reference:
                torch.testing.assert_close(other.delta(name), reference.delta(name))


def test_text_encoder_keys_keep_their_component(tmp_path):
    gen = torch.Generator().manual_seed(4)
    state = {
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": torch.randn(2, 8, generator=gen),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": torch.randn(8, 2, generator=gen),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer.down.weight": torch.randn(2, 8, generator=gen),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer.up.weight": torch.randn(8, 2, generator=gen),
        "unet.mid_block.attentions.0.proj_in.lora.down.weight": torch.randn(2, 8, 1, 1, generator=gen),
        "unet.mid_block.attentions.0.proj_in.lora.up.weight": torch.randn(8, 2, 1, 1, generator=gen),
    }
    save_file(state, str(tmp_path / "sd.safetensors"))
    adapter = adaptools.load(tmp_path / "sd.safetensors")
    assert sorted(adapter.modules) == ["mid_block.attentions.0.proj_in",
                                       "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                                       "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj"]
    assert adapter["mid_block.attentions.0.proj_in"].kind == "conv"
    assert parse_key("unet.a.attn1.processor.to_out_lora.up.weight") == ("unet", "a.attn1.to_out.0", "B")
    assert parse_key("unet.a.attn1.to_out.lora_magnitude_vector") == ("unet", "a.attn1.to_out.0", "magnitude")


def test_a_folder_saved_by_save_lora_weights_is_read(unet_dir, tmp_path):
    fac = factors(base_weights(unet_dir), UNET_TARGETS, seed=6)
    folder = tmp_path / "saved"
    folder.mkdir()
    write_lora(folder / "pytorch_lora_weights.safetensors", fac, "peft", "unet.")
    assert adaptools.detect_format(folder) == "diffusers"
    assert sorted(adaptools.load(folder).modules) == sorted(UNET_TARGETS)


def test_convert_to_diffusers_is_fused_by_diffusers_like_our_merge(unet_dir, tmp_path):
    base = base_weights(unet_dir)
    targets = {**UNET_TARGETS, CONV: 2}
    fac = factors(base, targets, seed=5)
    source = write_lora(tmp_path / "src.safetensors", fac, "lora.down", "unet.",
                        metadata={"unet.r": 2, "unet.lora_alpha": 6, "unet.rank_pattern": {f"{ATTN}.attn1.to_k": 3},
                                  "unet.target_modules": list(targets)})
    adapter = adaptools.load(source)
    peft_dir = tmp_path / "peft"
    adapter.save(peft_dir)
    adaptools.load(peft_dir).save(tmp_path / "back.safetensors", format="diffusers")
    back = adaptools.load(tmp_path / "back.safetensors")
    assert set(back.ranks.values()) == {3}  # one rank, scale 1: every diffusers version reads the scale meant
    for name in adapter:
        torch.testing.assert_close(back.delta(name), adapter.delta(name), rtol=1e-5, atol=1e-6)
    ours = adaptools_merged(unet_dir, source, tmp_path / "merged")
    assert_same_weights(ours, diffusers_fused_unet(unet_dir, tmp_path / "back.safetensors"), base, targets)
