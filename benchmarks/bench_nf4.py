"""NF4 quantize / dequantize throughput of adaptools against bitsandbytes on the same tensors.

    python benchmarks/bench_nf4.py [--device auto|cpu|cuda] [--shapes 4096x4096,11008x4096] [--repeats 5]

Both quantize with blocksize 64, with and without double quant (`BitsAndBytesConfig(bnb_4bit_use_double_quant=...)`);
throughput is in M elements/s of the bf16 weight. Each figure is the median of `--repeats` calls after a warm-up
call; the machine's load average is printed first (on a shared machine figures under load are lower bounds).
The script also says whether the two results are bit-identical (bitsandbytes' CUDA kernels are
not the CPU ones that adaptools reproduces, so on CUDA a few codes may differ).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch

from adaptools.device import resolve_device
from adaptools.checkpoints.nf4_quant import dequantize_nf4, nf4_state_dict, quantize_nf4


def _median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _differing(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> str:
    """'bit-exact', or how many elements of which checkpoint tensors differ."""
    diffs = [f"{k.rsplit('.', 1)[-1] if k != 'w' else 'packed'}: {(ours[k].cpu() != theirs[k].cpu()).sum().item()}"
             for k in theirs if not torch.equal(ours[k].cpu(), theirs[k].cpu())]
    return "bit-exact" if not diffs else "differs (" + ", ".join(diffs) + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--shapes", default="4096x4096,11008x4096", help="comma-separated OUTxIN")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {device} ({name}), torch {torch.__version__}, bitsandbytes {bnb.__version__}")
    load = Path("/proc/loadavg")
    print(f"load average (1, 5, 15 min): {' '.join(load.read_text().split()[:3]) if load.exists() else 'unknown'}")
    print("| shape | step | double quant | adaptools M el/s | bitsandbytes M el/s | adaptools / bnb | result |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        out_features, in_features = map(int, shape.split("x"))
        w = (torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.02)
        w = w.to(device=device, dtype=torch.bfloat16)
        millions = w.numel() / 1e6
        for double_quant in (False, True):
            ours = quantize_nf4(w, 64, double_quant)
            theirs = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
            expected = {"w": theirs[0]} | {f"w.{k}": v for k, v in theirs[1].as_dict(packed=True).items()}
            verdict = _differing(nf4_state_dict("w", *ours), expected)
            t_ours = _median_time(lambda: quantize_nf4(w, 64, double_quant), device, args.repeats)
            t_bnb = _median_time(
                lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4"), device,
                args.repeats,
            )
            print(f"| {shape} | quantize | {double_quant} | {millions / t_ours:.0f} | {millions / t_bnb:.0f} | "
                  f"{t_bnb / t_ours:.2f} | {verdict} |")

            same = torch.equal(dequantize_nf4(*ours), F.dequantize_4bit(*theirs, quant_type="nf4"))
            t_ours = _median_time(lambda: dequantize_nf4(*ours), device, args.repeats)
            t_bnb = _median_time(lambda: F.dequantize_4bit(*theirs, quant_type="nf4"), device, args.repeats)
            print(f"| {shape} | dequantize | {double_quant} | {millions / t_ours:.0f} | {millions / t_bnb:.0f} | "
                  f"{t_bnb / t_ours:.2f} | {'bit-exact' if same else 'differs'} |")


if __name__ == "__main__":
    main()
