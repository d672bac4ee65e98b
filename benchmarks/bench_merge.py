"""Streaming merge (adaptools merge) against transformers + PEFT merge_and_unload + save_pretrained, and against a
plain copy of the shard files (the I/O floor), on a random fp16 base with TinyLlama-1.1B shapes in 4 shards.

    python benchmarks/bench_merge.py [--layers 22] [--rank 16] [--device auto|cpu|cuda] [--cpus N] [--skip-peft]

Each contender runs in its own subprocess; its wall time and peak RSS are measured (see `run`). The base is
written with safetensors directly (no model is instantiated); the adapter is an r=16 all-linear PEFT LoRA with
random factors. The base files are read once before timing, so every contender reads them from the page cache.
Everything lives under a temporary folder that is deleted at the end. `--cpus 2` pins every contender to two
CPUs (the project's machines have two).

adaptools runs twice: `adaptools.merge` in a fresh process (its own time, without Python and torch start-up,
is what is compared with the copy), and the `adaptools merge` CLI, whose wall time adds Python + torch
start-up (timed on its own) and the recipe (sha256 of every input file) and model card.
First it prints the merge's batched GEMM time per shape group on the device (one step's baddbmm, as many
same-shape weights as a step holds).
Targets: merge time <= 1.5x the plain copy; peak RSS <= 1.25x (largest shard + adapter) and >= 3x below PEFT's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from timing import timed as timed_call

from adaptools.device import resolve_device
from adaptools.merge import BATCH_BYTES, lora_merge

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARDS = 4


def llama_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """Checkpoint keys and shapes of a Llama with TinyLlama-1.1B's sizes and `layers` decoder layers."""
    kv = HIDDEN // HEADS * KV_HEADS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (HIDDEN,),
            f"{p}.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            f"{p}.self_attn.k_proj.weight": (kv, HIDDEN),
            f"{p}.self_attn.v_proj.weight": (kv, HIDDEN),
            f"{p}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            f"{p}.post_attention_layernorm.weight": (HIDDEN,),
            f"{p}.mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            f"{p}.mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            f"{p}.mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        })
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def write_base(folder: Path, layers: int) -> list[Path]:
    """A random fp16 base in SHARDS shards of about equal size, with index and a transformers config.json."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    shapes = llama_shapes(layers)
    total = sum(2 * math.prod(s) for s in shapes.values())
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, files = 0, []

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}-of-{SHARDS:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        files.append(folder / name)
        shard.clear()

    for key, shape in shapes.items():
        if size >= total * (len(files) + 1) / SHARDS and len(files) < SHARDS - 1:
            flush()
        std = 1.0 if len(shape) == 1 else 1 / math.sqrt(shape[-1])
        shard[key] = (torch.randn(shape, generator=generator) * std).half()
        size += 2 * math.prod(shape)
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048,
                tie_word_embeddings=False, dtype="float16").save_pretrained(folder)
    return files


def write_adapter(folder: Path, base: Path, layers: int, rank: int, seed: int = 1) -> Path:
    """An all-linear PEFT LoRA (rank `rank`, alpha 2·rank) with random factors, saved with PEFT's config class."""
    from peft import LoraConfig

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in llama_shapes(layers).items():
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            out, inp = shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, inp, generator=generator) / inp**0.5
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, rank, generator=generator) * 0.01
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), task_type="CAUSAL_LM",
               base_model_name_or_path=str(base)).save_pretrained(folder)
    return folder / "adapter_model.safetensors"


def gemm_per_group(shapes: list[tuple[int, int]], rank: int, device: torch.device) -> float:
    """Print and return the time of the merge's batched GEMMs alone on `device`: W + B·A (float32) for every weight
    of `shapes`, grouped by shape, as many same-shape weights per baddbmm as one step holds (BATCH_BYTES of the
    device); best of 3 after a warm-up per group. A merge cannot take less than this (plus writing its output)."""
    total = 0.0
    print(f"batched GEMM per shape group on {device} (r={rank}, float32, {torch.get_num_threads()} threads):")
    for shape in sorted(set(shapes)):
        count = shapes.count(shape)
        per = max(1, min(count, BATCH_BYTES.get(device.type, BATCH_BYTES["cuda"]) // (4 * math.prod(shape))))
        W = torch.randn(per, *shape, device=device)
        B, A = torch.randn(per, shape[0], rank, device=device), torch.randn(per, rank, shape[1], device=device)
        lora_merge(W, B, A, inplace=True)
        seconds = min(timed_call(lambda: lora_merge(W, B, A, inplace=True), device)[0] for _ in range(3))
        steps = math.ceil(count / per)
        total += seconds * steps
        flops = 2 * per * math.prod(shape) * rank
        print(f"  {shape[0]:>5} x {shape[1]:<5} {per:>2} per step x {steps:>3} steps: {seconds * 1e3:7.2f} ms per "
              f"step ({flops / seconds / 1e9:6.1f} GFLOP/s)")
    print(f"  all {len(shapes)} weights: {total:.2f} s of GEMM")
    return total


def lora_shapes(layers: int) -> list[tuple[int, int]]:
    """The (out, in) shapes of the LoRA-targeted weights of the TinyLlama-shaped base, one per weight."""
    return [s for k, s in llama_shapes(layers).items() if k.removesuffix(".weight").rsplit(".", 1)[-1] in TARGETS]


COPY = """
import shutil, sys
from pathlib import Path
src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir()
for f in sorted(src.iterdir()):
    shutil.copyfile(f, out / f.name)
"""

PEFT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""

API = """
import sys, time
import adaptools
start = time.perf_counter()
adaptools.merge(sys.argv[1], sys.argv[2], out=sys.argv[3], device=sys.argv[4])
print(f"seconds={time.perf_counter() - start:.3f}")
"""

LAUNCH = """
import os, resource, subprocess, sys, time
if int(sys.argv[1]):
    os.sched_setaffinity(0, range(int(sys.argv[1])))
start = time.perf_counter()
child = subprocess.run(sys.argv[2:], stdout=subprocess.PIPE, text=True)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(time.perf_counter() - start, usage.ru_maxrss * 1024, child.returncode, usage.ru_utime + usage.ru_stime)
print(child.stdout, end="")
"""


def run(argv: list[str], cpus: int = 0) -> tuple[float, int, str, float]:
    """(wall seconds, peak RSS bytes, stdout, CPU seconds) of one command, started from a small launcher process.
    The CPU seconds (user + system, every thread) hardly change with other work on a shared machine.

    The peak RSS of a child counts the memory of the process it was forked from, so the command is forked
    from a fresh interpreter rather than from this one (which holds torch and the generated base). Dirty pages
    of earlier steps are flushed first (untimed), so each contender starts from the same state.
    """
    os.sync()
    proc = subprocess.run([sys.executable, "-c", LAUNCH, str(cpus), *argv], capture_output=True, text=True)
    head, _, stdout = proc.stdout.partition("\n")
    wall, rss, code, cpu = head.split()
    if int(code) != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed (exit {code}):\n{proc.stderr[-3000:]}")
    return float(wall), int(rss), stdout, float(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22 = TinyLlama-1.1B; fewer: quick run)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="auto", help="where adaptools merges: auto, cpu or cuda")
    parser.add_argument("--skip-peft", action="store_true", help="skip the transformers + PEFT reference")
    parser.add_argument("--repeats", type=int, default=1, help="runs of the copy and of adaptools (best is kept)")
    parser.add_argument("--cpus", type=int, default=0, help="pin every contender to this many CPUs (0: all)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        shards = write_base(tmp / "base", args.layers)
        adapter_file = write_adapter(tmp / "adapter", tmp / "base", args.layers, args.rank)
        largest = max(f.stat().st_size for f in shards)
        adapter_bytes = adapter_file.stat().st_size
        base_bytes = sum(f.stat().st_size for f in shards)
        print(f"base: {args.layers} layers, {base_bytes / 1e9:.2f} GB fp16 in {len(shards)} shards (largest "
              f"{largest / 1e6:.0f} MB); adapter r={args.rank}, {adapter_bytes / 1e6:.1f} MB "
              f"(written in {time.perf_counter() - t:.0f} s)")
        cpus = args.cpus or len(os.sched_getaffinity(0))
        print(f"torch {torch.__version__}, {cpus} CPUs, adaptools device {args.device}")
        if args.cpus:
            os.sched_setaffinity(0, range(args.cpus))
            torch.set_num_threads(args.cpus)
        gemm_per_group(lora_shapes(args.layers), args.rank, resolve_device(args.device))

        def timed(name: str, argv: list[str], out: Path | None) -> tuple[float, int, str, float | None]:
            """Best wall time (and its peak RSS and stdout) over the repeats, and the best time the command
            printed as `seconds=<s>` (its own work, without start-up), when it prints one."""
            runs = []
            for _ in range(args.repeats if name != "peft" else 1):
                runs.append(run(argv, args.cpus))
                if out is not None:
                    shutil.rmtree(out)
            best = min(runs)
            inside = [float(m.group(1)) for r in runs for m in [re.search(r"seconds=([0-9.]+)", r[2])] if m]
            own = min(inside) if inside else None
            print(f"{name:>14}: {best[0]:7.2f} s ({best[3]:.2f} s CPU), peak RSS {best[1] / 1e6:7.0f} MB"
                  + (f"; its own work {own:.2f} s" if own is not None else ""))
            return (*best[:3], own)

        run([sys.executable, "-c", COPY, str(tmp / "base"), str(tmp / "warm")], args.cpus)  # page cache warm-up
        shutil.rmtree(tmp / "warm")
        copy = timed("copy", [sys.executable, "-c", COPY, str(tmp / "base"), str(tmp / "out")], tmp / "out")
        api = timed("adaptools.merge", [sys.executable, "-c", API, str(tmp / "base"), str(tmp / "adapter"),
                                        str(tmp / "out"), args.device], tmp / "out")
        startup = timed("CLI start-up", [sys.executable, "-m", "adaptools_cli", "--version"], None)
        cli = timed("adaptools merge", [sys.executable, "-m", "adaptools_cli", "merge", str(tmp / "base"),
                                        str(tmp / "adapter"), "--device", args.device, "-o", str(tmp / "out")],
                    tmp / "out")
        cli_merge = float(re.search(r" in ([0-9.]+) s on", cli[2]).group(1))
        print(f"merge vs plain copy: {api[3] / copy[0]:.2f}x (target <= 1.5x): adaptools.merge's own time, "
              f"in a fresh process, against the copy's wall time (its Python start-up included)")
        print(f"CLI wall time vs plain copy: {cli[0] / copy[0]:.2f}x: Python + torch start-up {startup[0]:.2f} s, "
              f"merge {cli_merge:.2f} s (the base's sha256 taken from its read), recipe and card "
              f"{cli[0] - startup[0] - cli_merge:.2f} s")
        print(f"peak RSS vs largest shard + adapter: {cli[1] / (largest + adapter_bytes):.2f}x (target <= 1.25x)")
        if not args.skip_peft:
            peft = timed("peft", [sys.executable, "-c", PEFT, str(tmp / "base"), str(tmp / "adapter"),
                                  str(tmp / "out")], tmp / "out")
            print(f"peak RSS, transformers + PEFT / adaptools: {peft[1] / cli[1]:.1f}x (target >= 3x); "
                  f"wall time {peft[0] / cli[0]:.1f}x")


if __name__ == "__main__":
    main()
