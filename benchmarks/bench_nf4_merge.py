"""NF4 merges on the TinyLlama-shaped fp16 base of bench_merge.py (same base and r=16 adapter builders):

    python benchmarks/bench_nf4_merge.py [--layers 22] [--rank 16] [--device auto|cpu|cuda] [--cpus N] [--repeats 1]
                                         [--skip-peft]

Contenders, each a CLI run in its own subprocess (wall time and peak RSS measured by bench_merge.run):
  merge fp16        the plain streaming merge (the reference point of bench_merge.py);
  quantize          `adaptools quantize BASE` (its output is the NF4 base of the last run);
  merge → nf4       quantize-after-merge, `adaptools merge BASE ADAPTER --dtype nf4`;
  nf4 → nf4         merge into the NF4 base (dequantize, merge in float32, requantize), with the mean fraction
                    of ΔW that survives requantization;
  peft + bnb        (unless --skip-peft) what quantize-after-merge replaces: transformers + PEFT merge_and_unload,
                    save_pretrained, reload with BitsAndBytesConfig(load_in_4bit, nf4, double quant), save_pretrained.
Each adaptools run's own time (printed by the CLI, without Python start-up) and its CPU seconds are shown beside it
(the CPU time barely moves with other work on a shared machine; the issue's targets are on wall time);
with --repeats N the fastest of N runs is kept (timings on a shared 2-CPU machine vary by up to 2-3x).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from bench_merge import run, write_adapter, write_base

PEFT_BNB = """
import sys, tempfile, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
base, adapter, out = sys.argv[1:4]
with tempfile.TemporaryDirectory(dir=out.rsplit("/", 1)[0]) as merged:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(merged)
    del model
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(merged, quantization_config=config, device_map=sys.argv[4]).save_pretrained(out)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22 = TinyLlama-1.1B; fewer: quick run)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="auto", help="where adaptools merges and quantizes: auto, cpu or cuda")
    parser.add_argument("--cpus", type=int, default=0, help="pin every contender to this many CPUs (0: all)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each adaptools contender (fastest kept)")
    parser.add_argument("--skip-peft", action="store_true", help="skip the transformers + PEFT + bitsandbytes reference")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_nf4_merge_") as tmp:
        tmp = Path(tmp)
        shards = write_base(tmp / "base", args.layers)
        write_adapter(tmp / "adapter", tmp / "base", args.layers, args.rank)
        largest = max(f.stat().st_size for f in shards)
        print(f"base: {args.layers} layers, {sum(f.stat().st_size for f in shards) / 1e9:.2f} GB fp16 in "
              f"{len(shards)} shards (largest {largest / 1e6:.0f} MB); adapter r={args.rank} all-linear")
        print(f"torch {torch.__version__}, {args.cpus or len(os.sched_getaffinity(0))} CPUs, device {args.device}")
        cli = [sys.executable, "-m", "adaptools_cli"]
        base, adapter, nf4 = str(tmp / "base"), str(tmp / "adapter"), str(tmp / "nf4" / "base")
        runs = {
            "merge fp16": [*cli, "merge", base, adapter],
            "quantize": [*cli, "quantize", base],
            "merge → nf4": [*cli, "merge", base, adapter, "--dtype", "nf4"],
            "nf4 → nf4": [*cli, "merge", nf4, adapter],
        }
        results = {}
        for name, argv in runs.items():
            out = nf4 if name == "quantize" else str(tmp / "out")
            wall, rss, stdout, cpu = min(
                run([*argv, "--device", args.device, "--overwrite", "-o", out], args.cpus) for _ in range(args.repeats)
            )
            inside = float(re.search(r" in ([0-9.]+) s on", stdout).group(1))
            written = re.search(r"wrote ([0-9.]+ \w+)", stdout).group(1)
            survival = re.search(r"mean ([0-9.]+)% over (\d+) modules, min ([0-9.]+)%", stdout)
            extra = f"; ΔW surviving: mean {survival[1]}%, min {survival[3]}% ({survival[2]} modules)" if survival else ""
            print(f"{name:>12}: {wall:7.2f} s wall ({inside:6.2f} s inside, {cpu:6.2f} s CPU), peak RSS "
                  f"{rss / 1e6:6.0f} MB, wrote {written}{extra}")
            results[name] = (wall, inside, rss, cpu)
            if out != nf4:
                shutil.rmtree(out)
        fp16 = results["merge fp16"]
        for name, target in (("quantize", 2), ("merge → nf4", 2), ("nf4 → nf4", 3)):
            wall, inside, rss, cpu = results[name]
            print(f"{name} vs merge fp16: wall {wall / fp16[0]:.2f}x (target <= {target}x), inside {inside / fp16[1]:.2f}x, "
                  f"CPU {cpu / fp16[3]:.2f}x; peak RSS {rss / fp16[2]:.2f}x, {rss / largest:.2f}x the largest shard")
        if not args.skip_peft:
            device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
            wall, rss, _, _ = run([sys.executable, "-c", PEFT_BNB, base, adapter, str(tmp / "out"), device], args.cpus)
            print(f"{'peft + bnb':>12}: {wall:7.2f} s, peak RSS {rss / 1e6:6.0f} MB (quantized on {device})")
            ours = results["merge → nf4"]
            print(f"peft + bnb / adaptools merge --dtype nf4: wall time {wall / ours[0]:.1f}x, "
                  f"peak RSS {rss / ours[2]:.1f}x")


if __name__ == "__main__":
    main()
