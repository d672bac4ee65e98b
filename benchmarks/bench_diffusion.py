"""Merging a kohya LoRA into an SDXL-shaped single-file checkpoint (and a diffusers LoRA into a Flux-shaped one):

    python benchmarks/bench_diffusion.py [--scale 0.25] [--flux-scale 0.25] [--rank 32] [--repeats 1] [--skip-diffusers]

(`--scale 0` skips the SDXL case, `--flux-scale 0` the Flux ones.)

The script writes the checkpoints itself (random fp16 weights, original LDM / BFL layout): the SDXL UNet and both
text encoders (CLIP-L, OpenCLIP bigG with its fused in_proj) with every width times `--scale` (1.0 = SDXL's own
2.6 B-parameter UNet, a 6.9 GB file; the default 0.25 keeps a run to a few minutes on 2 CPUs), and a Flux
transformer (19 double, 38 single blocks) with its inner width times `--flux-scale` (1.0 = Flux-dev's 12 B, 24 GB).
The LoRAs: rank `--rank` on every attention and feed-forward linear of the UNet (kohya, diffusers-style names),
and on every q/k/v, add_q/k/v and proj_mlp slice of Flux's fused qkv / linear1 weights (diffusers names), once as
plain LoRA and once as PEFT DoRA (`lora_magnitude_vector`: each slice's rows then scaled to their magnitudes).

Contenders, each in its own subprocess (wall time and peak RSS of the process tree):
  copy        a plain copy of the checkpoint file (the floor: every byte read and written once);
  copy, direct  the same copy written with O_DIRECT in 8 MiB blocks, as adaptools writes outputs of 64 MiB or more
              (`adaptools.checkpoints.file_writes`): the floor of that way of writing, which the disk bounds;
  adaptools   `adaptools merge CKPT LORA -o OUT.safetensors`: its 1st run (which takes the sha256 of the base for
              the recipe as it reads it) and later runs (the base's sha256 then comes from adaptools' digest cache,
              as when one merges several LoRAs into one checkpoint; the cache is the benchmark's own, empty at first);
  diffusers   (SDXL, unless --skip-diffusers) diffusers' own path, what `from_single_file`, `load_lora_weights`,
              `fuse_lora` and `save_pretrained` do for the checkpoint's models: UNet2DConditionModel, CLIPTextModel
              and CLIPTextModelWithProjection built on the meta device, loaded from the file by diffusers' converters
              (`convert_ldm_unet_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`),
              `load_lora_into_unet`, `fuse_lora`, each saved with `save_pretrained` (no VAE: the file holds none;
              the tokenizers and scheduler, a few small files, are left out).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_merge import gemm_per_group, run

from adaptools.digests import RACY_NS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from diffusion_fixtures import clip_to_ldm, flux_to_bfl, open_clip_to_ldm, unet_to_ldm  # noqa: E402

COPY = "import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2])"
COPY_DIRECT = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
view = memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ))
out = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
aligned = size // 4096 * 4096
for at in range(0, aligned, 8 << 20):
    os.pwrite(out, view[at:min(at + (8 << 20), aligned)], at)
os.close(out)
with open(sys.argv[2], "r+b") as f:
    f.seek(aligned)
    f.write(view[aligned:])
"""
DIFFUSERS = """
import json, sys, torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as M
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_open_clip_checkpoint)
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
base, lora, out, configs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
state = load_file(base)
with torch.device("meta"):  # as from_single_file builds them: no weights allocated before the checkpoint's
    unet = UNet2DConditionModel(**configs["unet"])
    clip_l = CLIPTextModel(CLIPTextConfig(**configs["clip_l"]))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**configs["clip_g"]))
unet.load_state_dict(convert_ldm_unet_checkpoint(state, configs["unet"]), assign=True)
own = set(clip_l.state_dict())  # transformers 5 keys CLIPTextModel without text_model. (from_single_file adapts)
clip_l.load_state_dict({k if k in own else k.removeprefix("text_model."): v
                        for k, v in convert_ldm_clip_checkpoint(state).items()}, assign=True)
clip_g.load_state_dict(convert_open_clip_checkpoint(clip_g, state, prefix="conditioner.embedders.1.model."),
                       assign=True)
del state
lora_state, alphas = M.lora_state_dict(lora, unet_config=unet.config)
M.load_lora_into_unet(lora_state, alphas, unet=unet)
unet.fuse_lora()
unet.unload_lora()
for name, model in (("unet", unet), ("text_encoder", clip_l), ("text_encoder_2", clip_g)):
    model.save_pretrained(f"{out}/{name}")
"""


def sdxl_configs(scale: float) -> tuple[dict, dict, dict]:
    """(UNet, CLIP-L, OpenCLIP bigG) configs of SDXL with every width times `scale` (heads of 64 channels)."""
    c = math.ceil(320 * scale / 64) * 64
    clip_l, clip_g = math.ceil(768 * scale / 64) * 64, math.ceil(1280 * scale / 64) * 64
    unet = dict(block_out_channels=(c, 2 * c, 4 * c), layers_per_block=2, sample_size=128, in_channels=4,
                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(c // 64, 2 * c // 64, 4 * c // 64),
                cross_attention_dim=clip_l + clip_g, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=6 * 256 + clip_g)
    text = dict(vocab_size=49408, max_position_embeddings=77)
    return (unet, dict(text, hidden_size=clip_l, intermediate_size=4 * clip_l, num_hidden_layers=12,
                       num_attention_heads=clip_l // 64),
            dict(text, hidden_size=clip_g, intermediate_size=4 * clip_g, num_hidden_layers=32, projection_dim=clip_g,
                 num_attention_heads=clip_g // 64))


def meta_state(cls, *args, **kwargs) -> dict[str, torch.Tensor]:
    """A model's state dict on the meta device (shapes only, nothing allocated)."""
    with torch.device("meta"):
        return dict(cls(*args, **kwargs).state_dict())


def sdxl_shapes(scale: float) -> tuple[dict[str, torch.Tensor], dict]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet, clip_l, clip_g = sdxl_configs(scale)
    state = unet_to_ldm(meta_state(UNet2DConditionModel, **unet), unet)
    state.update(clip_to_ldm(meta_state(CLIPTextModel, CLIPTextConfig(**clip_l)), "conditioner.embedders.0.transformer."))
    state.update(open_clip_to_ldm(meta_state(CLIPTextModelWithProjection, CLIPTextConfig(**clip_g)),
                                  "conditioner.embedders.1.model."))
    return state, unet


def flux_shapes(scale: float) -> dict[str, torch.Tensor]:
    from diffusers import FluxTransformer2DModel

    heads = max(2, round(24 * scale))
    return flux_to_bfl(meta_state(FluxTransformer2DModel, patch_size=1, in_channels=64, num_layers=19,
                                  num_single_layers=38, attention_head_dim=128, num_attention_heads=heads,
                                  joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                                  axes_dims_rope=(16, 56, 56)))


def write_random(path: Path, shapes: dict[str, torch.Tensor]) -> int:
    """A safetensors file of fp16 tensors of these shapes, values N(0, 0.02²) cut from one random block (streamed:
    never more than that block in memory). Returns the parameters written."""
    block = (torch.randn(2**24) * 0.02).half().numpy().tobytes()
    header, offset = {}, 0
    for key, meta in shapes.items():
        nbytes = meta.numel() * 2
        header[key] = {"dtype": "F16", "shape": list(meta.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps({"__metadata__": {"modelspec.title": "bench"}, **header}).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        left, at = offset, 0
        while left:
            n = min(left, len(block) - at)
            f.write(block[at:at + n])
            left, at = left - n, (at + n) % len(block)
    return sum(m.numel() for m in shapes.values())


def write_lora(path: Path, modules: dict[str, tuple[int, int]], rank: int, kohya: bool, dora: bool = False) -> int:
    """A rank-`rank` LoRA on `modules` (name → (out, in)): kohya (`lora_unet_` names) or diffusers keys (with `dora`,
    PEFT DoRA magnitudes near the base rows' norms, 0.02·√in)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    state = {}
    for name, (out, inp) in modules.items():
        down = (torch.randn(rank, inp, generator=g) / inp**0.5).half()
        up = (torch.randn(out, rank, generator=g) * 0.01).half()
        if kohya:
            kname = "lora_unet_" + name.replace(".", "_")
            state.update({f"{kname}.lora_down.weight": down, f"{kname}.lora_up.weight": up,
                          f"{kname}.alpha": torch.tensor(float(rank))})
        else:
            state.update({f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up})
            if dora:
                magnitude = 0.02 * inp**0.5 * (1 + 0.1 * torch.rand(out, generator=g))
                state[f"transformer.{name}.lora_magnitude_vector"] = magnitude.half()
    save_file(state, str(path))
    return len(modules)


def unet_lora_modules(unet_config: dict) -> dict[str, tuple[int, int]]:
    """Every attention (to_q/k/v/out.0) and feed-forward linear of the UNet's transformer blocks."""
    from diffusers import UNet2DConditionModel

    modules = {}
    for key, value in meta_state(UNet2DConditionModel, **unet_config).items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and value.ndim == 2 and ".transformer_blocks." in key and \
                module.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0", "proj", "2"):
            modules[module] = tuple(value.shape)
    return modules


def flux_lora_modules(scale: float) -> dict[str, tuple[int, int]]:
    """Every slice of the fused qkv / linear1 weights, by diffusers name."""
    heads = max(2, round(24 * scale))
    inner = 128 * heads
    modules = {}
    for n in range(19):
        for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            modules[f"transformer_blocks.{n}.attn.{p}"] = (inner, inner)
    for n in range(38):
        for p in ("attn.to_q", "attn.to_k", "attn.to_v"):
            modules[f"single_transformer_blocks.{n}.{p}"] = (inner, inner)
        modules[f"single_transformer_blocks.{n}.proj_mlp"] = (4 * inner, inner)
    return modules


def contest(name: str, base: Path, lora: Path, tmp: Path, diffusers_config: dict | None, cpus: int,
            shapes: list[tuple[int, int]], rank: int, repeats: int) -> None:
    size = base.stat().st_size

    def best(argv: list[str], out: Path, repeats: int) -> tuple[float, int, str, float]:
        """The fastest of `repeats` runs (wall, peak RSS, stdout, CPU), its output removed after each."""
        runs = []
        for _ in range(repeats):
            runs.append(run(argv, cpus))
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        return min(runs)

    run([sys.executable, "-c", COPY, str(base), str(tmp / "warm")], cpus)  # page cache warm-up
    (tmp / "warm").unlink()
    rows = [("copy", best([sys.executable, "-c", COPY, str(base), str(tmp / "copy.safetensors")],
                          tmp / "copy.safetensors", repeats)),
            ("copy, direct", best([sys.executable, "-c", COPY_DIRECT, str(base), str(tmp / "copy.safetensors")],
                                  tmp / "copy.safetensors", repeats))]
    out = tmp / f"{name}.merged.safetensors"
    merge = [sys.executable, "-m", "adaptools_cli", "merge", str(base), str(lora), "-o", str(out)]
    os.environ["ADAPTOOLS_CACHE_DIR"] = str(tmp / "cache" / name)  # this case's own digest cache, empty
    time.sleep(max(0.0, (base.stat().st_ctime_ns + RACY_NS - time.time_ns()) / 1e9))  # a file just written is not
    # cached (a change in the same clock tick could hide): as old as a checkpoint one downloaded earlier
    rows.append(("adaptools, 1st", best(merge, out, 1)))
    rows.append(("adaptools", best(merge, out, repeats)))
    if diffusers_config is not None:
        rows.append(("diffusers", best([sys.executable, "-c", DIFFUSERS, str(base), str(lora), str(tmp / "diffusers"),
                                        json.dumps(diffusers_config)], tmp / "diffusers", repeats)))
    copy_wall, first, ours = rows[0][1][0], rows[2][1][0], rows[3][1][0]
    inside = [float(re.search(r"in ([0-9.]+) s on", row[2]).group(1)) for _, row in rows[2:4]]
    print(rows[3][1][2].strip().splitlines()[-1])
    gemm = gemm_per_group(shapes, rank, torch.device("cpu"))
    print(f"{name}: {size / 1e9:.2f} GB file (fastest of {repeats} runs each); the merge inside the CLI took "
          f"{inside[0]:.1f} s = {inside[0] / copy_wall:.2f}x the copy on its first run (taking the recipe's sha256 of "
          f"the base as it reads), {inside[1]:.1f} s = {inside[1] / copy_wall:.2f}x on later runs (the base's sha256 "
          f"cached); its GEMMs alone take {gemm:.2f} s = {gemm / copy_wall:.2f}x the copy")
    for contender, (wall, rss, _, cpu) in rows:
        versus = "" if contender != "diffusers" else \
            f"; adaptools {wall / first:.2f}x faster on its 1st run, {wall / ours:.2f}x on later runs"
        print(f"  {contender:14s} {wall:7.1f} s wall  {cpu:7.1f} s CPU  peak RSS {rss / 2**30:5.2f} GiB  "
              f"({wall / copy_wall:.2f}x copy{versus})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.25, help="SDXL widths times this (1.0 = SDXL itself); 0: skip")
    parser.add_argument("--flux-scale", type=float, default=0.25, help="Flux width times this (1.0 = Flux-dev); 0: skip")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--skip-diffusers", action="store_true", help="skip the diffusers reference")
    parser.add_argument("--cpus", type=int, default=0, help="pin every contender to this many CPUs (0: all)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each contender (the fastest kept)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_diffusion_", dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        print(f"torch {torch.__version__}, {args.cpus or len(os.sched_getaffinity(0))} CPUs")
        if args.scale:
            t = time.perf_counter()
            shapes, unet = sdxl_shapes(args.scale)
            params = write_random(tmp / "sdxl.safetensors", shapes)
            sdxl_modules = unet_lora_modules(unet)
            count = write_lora(tmp / "sdxl_lora.safetensors", sdxl_modules, args.rank, kohya=True)
            print(f"SDXL-shaped (scale {args.scale}): {params / 1e9:.2f} B parameters, LoRA r={args.rank} on {count} "
                  f"UNet linears (written in {time.perf_counter() - t:.0f} s)")
            contest("sdxl", tmp / "sdxl.safetensors", tmp / "sdxl_lora.safetensors", tmp,
                    None if args.skip_diffusers else dict(zip(("unet", "clip_l", "clip_g"), sdxl_configs(args.scale))),
                    args.cpus, list(sdxl_modules.values()), args.rank, args.repeats)
            (tmp / "sdxl.safetensors").unlink()
        if args.flux_scale:
            shapes = flux_shapes(args.flux_scale)
            params = write_random(tmp / "flux.safetensors", shapes)
            flux_modules = flux_lora_modules(args.flux_scale)
            print(f"Flux-shaped (scale {args.flux_scale}): {params / 1e9:.2f} B parameters")
            for dora in (False, True):
                kind = "DoRA" if dora else "LoRA"
                lora = tmp / f"flux_{kind.lower()}.safetensors"
                count = write_lora(lora, flux_modules, args.rank, kohya=False, dora=dora)
                print(f"{kind} r={args.rank} on {count} fused-weight slices")
                contest(f"flux-{kind.lower()}", tmp / "flux.safetensors", lora, tmp, None, args.cpus,
                        list(flux_modules.values()), args.rank, args.repeats)


if __name__ == "__main__":
    main()
