"""DoRA → LoRA on TinyLlama-1.1B shapes: exact dense SVD against randomized SVD on the implicit ΔW.

    python benchmarks/bench_dora.py [--layers 22] [--r 16] [--rank 16] [--power-iters 1 2 4] [--device auto]

Writes a random fp16 base of TinyLlama's decoder linears (hidden 2048, intermediate 5632, 4 KV heads of 64,
so k/v project to 256; one safetensors shard per layer plus an index) and builds a random LoRA (r, alpha 2r)
on all seven linears. `to_dora` gives its exact magnitudes (timed), which are then perturbed by 2% per row
to make a DoRA adapter whose ΔW = W' − W is full rank. `to_lora` is timed with svd="exact" and with
svd="randomized" for each power-iteration count; errors are the reported ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F, checked
against a dense computation on the first layer. The baseline "drop magnitudes" is the error of keeping
s·B·A, what PEFT's `convert_to_lora` does with a DoRA adapter.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

import adaptools
from adaptools import Adapter, LoraModule
from adaptools.device import resolve_device
from timing import timed
from adaptools.merge import dora_merge_rows

SHAPES = {  # module: (out, in)
    "self_attn.q_proj": (2048, 2048),
    "self_attn.k_proj": (256, 2048),
    "self_attn.v_proj": (256, 2048),
    "self_attn.o_proj": (2048, 2048),
    "mlp.gate_proj": (5632, 2048),
    "mlp.up_proj": (5632, 2048),
    "mlp.down_proj": (2048, 5632),
}


def write_base(folder: Path, layers: int, gen: torch.Generator) -> None:
    """Random fp16 weights (std 0.02), one shard per layer, with a safetensors index."""
    folder.mkdir(parents=True)
    weight_map = {}
    for i in range(layers):
        shard = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        tensors = {f"model.layers.{i}.{m}.weight": (torch.randn(shape, generator=gen) * 0.02).half()
                   for m, shape in SHAPES.items()}
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def random_lora(layers: int, r: int, gen: torch.Generator) -> Adapter:
    """A LoRA with ‖s·B·A‖ about 5% of ‖W‖ per module (fp32 factors, scale alpha/r = 2)."""
    modules = {}
    for i in range(layers):
        for m, (out, inp) in SHAPES.items():
            A = torch.randn(r, inp, generator=gen) / inp**0.5
            B = torch.randn(out, r, generator=gen) * 0.02 * 0.05 * (inp / r) ** 0.5 / 2
            modules[f"model.layers.{i}.{m}"] = LoraModule(A=A, B=B, scale=2.0)
    return Adapter(modules=modules, base_model="random-tinyllama-shapes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--r", type=int, default=16, help="rank of the DoRA adapter")
    parser.add_argument("--rank", type=int, default=16, help="rank of the LoRA fitted to it")
    parser.add_argument("--power-iters", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", type=Path, help="where to write the base (default: a temporary folder)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    gen = torch.Generator().manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"{args.layers} layers of TinyLlama-1.1B linears, DoRA r={args.r}, LoRA rank {args.rank}")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        base = Path(tmp) / "base"
        t_write, _ = timed(lambda: write_base(base, args.layers, gen))
        lora = random_lora(args.layers, args.r, gen)
        print(f"wrote fp16 base ({args.layers * sum(o * i for o, i in SHAPES.values()) / 1e6:.0f} M params) "
              f"in {t_write:.1f} s")

        t_dora, exact_dora = timed(lambda: adaptools.to_dora(lora, base, device=device), device)
        print(f"to_dora (row norms by A·Wᵀ, {len(lora)} modules): {t_dora:.2f} s")
        dora = exact_dora.with_modules({
            n: replace(m, magnitude=m.magnitude * (1 + 0.02 * torch.randn(m.out_features, generator=gen)))
            for n, m in exact_dora.items()
        })

        rows = []
        t_exact, (_, exact) = timed(lambda: adaptools.to_lora(dora, base, rank=args.rank, svd="exact", device=device), device)
        rows.append(("exact", t_exact, exact))
        for q in args.power_iters:
            t, (_, rand) = timed(lambda: adaptools.to_lora(dora, base, rank=args.rank, svd="randomized",
                                                            power_iters=q, device=device), device)
            rows.append((f"randomized, {q} power iters", t, rand))

        # dense check on layer 0: reported error vs ‖ΔW − ΔW_k‖ formed densely (float64: torch's float32 norm
        # of a 4M-element matrix is off by ~1e-4 on the CPU); baseline s·B·A
        checkpoint = adaptools.BaseCheckpoint(base)
        check, drop_num, drop_den = 0.0, 0.0, 0.0
        fitted, _ = adaptools.to_lora(dora, base, rank=args.rank, svd="randomized", device=device)
        for m in SHAPES:
            name = f"model.layers.0.{m}"
            W, mod = checkpoint.get(f"{name}.weight").double(), dora[name].to(dtype=torch.float64)
            delta = dora_merge_rows(W, mod.B * mod.scale, mod.A, mod.magnitude) - W
            true = float((delta - fitted.delta(name, torch.float64)).norm() / delta.norm())
            check = max(check, abs(true - rand.modules[name].rel_error) / true)
            drop_num += float((delta - mod.delta(torch.float64)).norm() ** 2)
            drop_den += float(delta.norm() ** 2)

        print()
        print(f"{'method':<28} {'time s':>8} {'vs exact':>9} {'rel. error':>11} {'worst':>8}")
        for label, t, report in rows:
            print(f"{label:<28} {t:8.2f} {t_exact / t:8.1f}x {report.rel_error:11.5f} {report.worst_rel_error:8.5f}")
        print(f"{'drop magnitudes (s·B·A), layer 0':<38} {(drop_num / drop_den) ** 0.5:11.5f}")
        ratio = max(rand.modules[n].rel_error / f.rel_error for n, f in exact.modules.items())
        print(f"worst randomized/exact error ratio per module ({args.power_iters[-1]} power iters): {ratio:.4f}")
        print(f"reported vs dense error on layer 0: max relative difference {check:.1e}")
        print("per module type (exact rel. error / randomized):")
        for m in SHAPES:
            names = [f"model.layers.{i}.{m}" for i in range(args.layers)]
            e = sum(exact.modules[n].rel_error for n in names) / len(names)
            r = sum(rand.modules[n].rel_error for n in names) / len(names)
            print(f"  {m:<18} {SHAPES[m][0]:>5}x{SHAPES[m][1]:<5} {e:.5f} / {r:.5f}")


if __name__ == "__main__":
    main()
