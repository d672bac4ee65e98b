"""FP8 codec throughput against compressed-tensors, and merges into a TinyLlama-shaped block-FP8 base against the
fp16 merge of the same model, in one run.

    python benchmarks/bench_fp8.py [--layers 4] [--rank 16] [--repeats 3] [--cpus N] [--skip-merge]

Codec: TinyLlama-1.1B's linear weight shapes in bf16, per strategy (block 128x128, channel, tensor), single-threaded
(as each merge worker runs). Encode: adaptools' `quantize_fp8` (scales included) against compressed-tensors 0.20.1's
`FloatQuantizationCompressor.compress` given the scales (its scales from `calculate_qparams` timed apart, as
"+qparams"); both give the same bytes (checked). Decode: `dequantize_fp8` (float32 out) against compressed-tensors'
`decompress` (bf16 out, in the scale's dtype). M elements/s, best of `--repeats`.
Merge: the fp16 base of bench_merge.py (`--layers` decoder layers; 22 = TinyLlama-1.1B, 4 by default so that a run
finishes in a few minutes on 2 busy CPUs) and an r=16 all-linear LoRA; `adaptools quantize --to fp8` makes the
block-FP8 base (compressed-tensors format), then `merge fp16` (the reference), `fp8 → fp8` (merge into the FP8 base,
requantized in its scheme) and `merge → fp8` (quantize after merging) each run as a CLI subprocess (wall time, peak
RSS, CPU seconds; the fastest of `--merge-repeats` runs: on a shared machine wall times vary by 2x).
Targets on a 2-core CPU: codec >= 2x compressed-tensors both ways; fp8 → fp8 <= 1.5x the fp16 merge; peak
RSS <= 1 GB.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_merge import run, write_adapter, write_base

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("COMPRESSED_TENSORS_LOG_DISABLED", "1")
from fp8_factories import ct_scale, ct_scheme  # noqa: E402  (compressed-tensors' own scales, as the tests use)

from adaptools.checkpoints.fp8_format import COMPRESSED_TENSORS, FP8Scheme, dequantize_fp8, quantize_fp8  # noqa: E402

SHAPES = ((2048, 2048), (256, 2048), (5632, 2048), (2048, 5632))
"""q/o_proj, k/v_proj, gate/up_proj, down_proj of TinyLlama-1.1B."""


def best(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def codec(repeats: int) -> None:
    from compressed_tensors.compressors import FloatQuantizationCompressor as CT

    torch.set_num_threads(1)
    weights = [(torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.02).to(torch.bfloat16)
               for i, shape in enumerate(SHAPES)]
    total = sum(w.numel() for w in weights) / 1e6
    print(f"codec: {len(weights)} bf16 weights {', '.join('x'.join(map(str, s)) for s in SHAPES)} "
          f"({total:.1f} M elements), 1 thread")
    for strategy in ("block", "channel", "tensor"):
        scheme = FP8Scheme(COMPRESSED_TENSORS, strategy, (128, 128) if strategy == "block" else None, torch.bfloat16)
        ct = ct_scheme(strategy)
        ours = [quantize_fp8(w, scheme) for w in weights]
        scales = [ct_scale(w, strategy, torch.bfloat16) for w in weights]
        theirs = [CT.compress({"weight": w, "weight_scale": s}, ct) for w, s in zip(weights, scales)]
        same = all(torch.equal(q.view(torch.uint8), t["weight"].view(torch.uint8)) and torch.equal(s, t["weight_scale"])
                   for (q, s), t in zip(ours, theirs))
        enc = best(lambda: [quantize_fp8(w, scheme) for w in weights], repeats)
        ct_enc = best(lambda: [CT.compress({"weight": w, "weight_scale": s}, ct) for w, s in zip(weights, scales)],
                      repeats)
        ct_qparams = best(lambda: [ct_scale(w, strategy, torch.bfloat16) for w in weights], repeats)
        dec = best(lambda: [dequantize_fp8(q, s, scheme) for q, s in ours], repeats)
        ct_dec = best(lambda: [CT.decompress(t, ct) for t in theirs], repeats)
        print(f"  {strategy:>7}: encode {total / enc:6.0f} M/s vs compressed-tensors {total / ct_enc:5.0f} "
              f"({ct_enc / enc:4.1f}x; +qparams {total / (ct_enc + ct_qparams):5.0f}, "
              f"{(ct_enc + ct_qparams) / enc:4.1f}x), decode {total / dec:6.0f} M/s vs {total / ct_dec:5.0f} "
              f"({ct_dec / dec:4.1f}x); same bytes: {same}")


def merges(layers: int, rank: int, cpus: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_fp8_") as tmp:
        tmp = Path(tmp)
        shards = write_base(tmp / "base", layers)
        write_adapter(tmp / "adapter", tmp / "base", layers, rank)
        print(f"merge: {layers} layers, {sum(f.stat().st_size for f in shards) / 1e9:.2f} GB fp16 in {len(shards)} "
              f"shards; adapter r={rank} all-linear; {cpus or len(os.sched_getaffinity(0))} CPUs")
        cli = [sys.executable, "-m", "adaptools_cli"]
        base, adapter, fp8 = str(tmp / "base"), str(tmp / "adapter"), str(tmp / "fp8" / "base")
        runs = {
            "quantize → fp8": [*cli, "quantize", base, "--to", "fp8"],
            "merge fp16": [*cli, "merge", base, adapter],
            "fp8 → fp8": [*cli, "merge", fp8, adapter],
            "merge → fp8": [*cli, "merge", base, adapter, "--dtype", "fp8"],
        }
        results = {}
        for name, argv in runs.items():
            out = fp8 if name == "quantize → fp8" else str(tmp / "out")
            wall, rss, stdout, cpu = min(run([*argv, "--device", "cpu", "--overwrite", "-o", out], cpus)
                                         for _ in range(repeats))
            inside = float(re.search(r" in ([0-9.]+) s on", stdout).group(1))
            survival = re.search(r"mean ([0-9.]+)% over (\d+) modules, min ([0-9.]+)%", stdout)
            extra = f"; ΔW surviving: mean {survival[1]}%, min {survival[3]}%" if survival else ""
            print(f"  {name:>14}: {wall:6.2f} s wall ({inside:6.2f} s inside, {cpu:6.2f} s CPU), peak RSS "
                  f"{rss / 1e6:5.0f} MB{extra}")
            results[name] = (wall, inside, rss, cpu)
            if out != fp8:
                shutil.rmtree(out)
        fp16 = results["merge fp16"]
        for name in ("fp8 → fp8", "merge → fp8"):
            wall, inside, rss, cpu = results[name]
            print(f"  {name} vs merge fp16: wall {wall / fp16[0]:.2f}x (target <= 1.5x), "
                  f"inside {inside / fp16[1]:.2f}x, "
                  f"CPU {cpu / fp16[3]:.2f}x; peak RSS {rss / 1e6:.0f} MB (target <= 1000)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the merge base (22 = TinyLlama-1.1B)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="codec calls timed (the best is kept)")
    parser.add_argument("--merge-repeats", type=int, default=2, help="runs of each merge contender (fastest kept)")
    parser.add_argument("--cpus", type=int, default=0, help="pin every merge contender to this many CPUs (0: all)")
    parser.add_argument("--skip-merge", action="store_true", help="codec throughput only")
    args = parser.parse_args()
    print(f"torch {torch.__version__}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    codec(args.repeats)
    if not args.skip_merge:
        merges(args.layers, args.rank, args.cpus, args.merge_repeats)


if __name__ == "__main__":
    main()
