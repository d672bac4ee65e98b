"""LoRA extraction (adaptools.extract) against mergekit-extract-lora (mergekit 0.1.5) on the same (base, tuned) pair.

    python benchmarks/bench_extract.py [--layers 22] [--rank 64] [--device auto|cpu|cuda] [--cpus N] [--skip-mergekit]

The script writes a random fp16 base with TinyLlama-1.1B's shapes (`bench_merge.llama_shapes`, 4 shards) and a
tuned copy (3 shards: another layout) in which every 2-D weight and every norm moved: ΔW = c·G·diag(d)·P with G
Gaussian, d_j = (j+1)^-0.5 (a slowly decaying spectrum, the hard case for a randomized range finder), P a random
column permutation and c such that ‖ΔW‖ = 5% of ‖W‖; the tuned weights are rounded to fp16 like a real fine-tune.
Both tools extract rank `--rank` with the embeddings and the LM head kept whole (mergekit's default,
adaptools' `full_tensors=True`), each in its own subprocess (wall time and peak RSS measured by `bench_merge.run`).
mergekit runs from its own virtual environment, benchmarks/.venv-mergekit (git-ignored), made on first use with
torch==2.13.0 (the CPU wheel) installed first, then mergekit==0.1.5.

Per module the script then computes ΔW from the two checkpoints and the true errors ‖ΔW − B·A‖_F of both outputs
(the factors as stored, fp16): mergekit's dense SVD is the Eckart–Young optimum (up to its fp16 rounding), so the
ratio is adaptools' error over the optimal one. With --skip-mergekit the optimum of the first layer's modules
comes from torch.linalg.svdvals.
Targets on the 2-core CPU: >= 20x faster than mergekit, peak RSS <= 1.5 GB, error <= 1.01x optimal.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_merge import HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, VOCAB, llama_shapes, run
from safetensors import safe_open
from safetensors.torch import save_file

from adaptools.linalg import lapack_threads

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-mergekit"
MERGEKIT = VENV / "bin" / "mergekit-extract-lora"
DECAY = 0.5
RELATIVE_CHANGE = 0.05


def mergekit_venv() -> Path:
    """benchmarks/.venv-mergekit with torch 2.13.0 (CPU wheel, installed first) and mergekit 0.1.5."""
    if not MERGEKIT.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "mergekit==0.1.5"], check=True)
    return MERGEKIT


def delta_for(shape: tuple[int, ...], W: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A change of W: slowly decaying spectrum for matrices (module docstring), small noise for norms."""
    if len(shape) == 1:
        return torch.randn(shape, generator=generator) * 0.01
    d = (torch.arange(shape[1], dtype=torch.float32) + 1) ** -DECAY
    d = d[torch.randperm(shape[1], generator=generator)]
    delta = torch.randn(shape, generator=generator).mul_(d)
    return delta.mul_(RELATIVE_CHANGE * W.float().norm() / delta.norm())


def write_pair(root: Path, layers: int) -> tuple[Path, Path]:
    """The fp16 base (4 shards) and tuned copy (3 shards), each with an index and a LlamaForCausalLM config.json."""
    from transformers import LlamaConfig

    shapes = llama_shapes(layers)
    total = sum(2 * math.prod(s) for s in shapes.values())
    generator = torch.Generator().manual_seed(0)
    folders = {"base": (root / "base", 4), "tuned": (root / "tuned", 3)}
    state: dict[str, dict] = {name: {"shard": {}, "size": 0, "files": [], "map": {}} for name in folders}

    def flush(name: str) -> None:
        folder, count = folders[name]
        s = state[name]
        file = f"model-{len(s['files']) + 1:05d}-of-{count:05d}.safetensors"
        save_file(s["shard"], str(folder / file), metadata={"format": "pt"})
        s["map"].update({k: file for k in s["shard"]})
        s["files"].append(file)
        s["shard"] = {}

    for folder, _ in folders.values():
        folder.mkdir(parents=True)
    for key, shape in shapes.items():
        std = 1.0 if len(shape) == 1 else 1 / math.sqrt(shape[-1])
        W = (torch.randn(shape, generator=generator) * std).half()
        tensors = {"base": W, "tuned": (W.float() + delta_for(shape, W, generator)).half()}
        for name, (_, count) in folders.items():
            s = state[name]
            if s["size"] >= total * (len(s["files"]) + 1) / count and len(s["files"]) < count - 1:
                flush(name)
            s["shard"][key] = tensors[name]
            s["size"] += 2 * math.prod(shape)
    for name, (folder, count) in folders.items():
        flush(name)
        index = {"metadata": {"total_size": total}, "weight_map": state[name]["map"]}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                    num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048,
                    tie_word_embeddings=False, dtype="float16",
                    architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    return folders["base"][0], folders["tuned"][0]


API = """
import sys, time
import adaptools
start = time.perf_counter()
adapter, report = adaptools.extract(sys.argv[1], sys.argv[2], rank=int(sys.argv[4]), device=sys.argv[5],
                                    full_tensors=True)
adaptools.save_adapter(adapter, sys.argv[3])
print(f"seconds={time.perf_counter() - start:.3f} methods={report.to_dict()['methods']}")
"""


class Tensors:
    """Tensors of a checkpoint folder (any shards) or of an adapter file, opened by key."""

    def __init__(self, folder: Path):
        self.handles = {}
        for file in sorted(folder.glob("*.safetensors")):
            handle = safe_open(str(file), "pt")
            self.handles.update({k: handle for k in handle.keys()})

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.handles[key].get_tensor(key)


def errors(base: Path, tuned: Path, outputs: dict[str, Path], layers: int, rank: int) -> dict[str, dict[str, float]]:
    """{module: {tool: ‖ΔW − B·A‖_F}} over the decoder's linear weights; without a mergekit output, "optimal" from
    torch.linalg.svdvals (a dense SVD per module: first layer only)."""
    W0, W1 = Tensors(base), Tensors(tuned)
    outs = {name: Tensors(path) for name, path in outputs.items()}
    result = {}
    for key, shape in llama_shapes(layers).items():
        if len(shape) != 2 or "layers" not in key or ("mergekit" not in outs and "layers.0." not in key):
            continue
        module = key.removesuffix(".weight")
        delta = W1[key].float() - W0[key].float()
        row = {}
        for name, t in outs.items():
            prefix = f"base_model.model.{module}"
            B, A = t[f"{prefix}.lora_B.weight"].float(), t[f"{prefix}.lora_A.weight"].float()
            row[name] = float(torch.linalg.vector_norm(delta - B @ A, dtype=torch.float64))
        if "mergekit" not in outs:
            with lapack_threads(delta):
                s = torch.linalg.svdvals(delta).double()
            row["optimal"] = float(s[rank:].square().sum().sqrt())
        result[module] = row
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22 = TinyLlama-1.1B; fewer: quick run)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--device", default="auto", help="where adaptools runs: auto, cpu or cuda")
    parser.add_argument("--cpus", type=int, default=0, help="pin every contender to this many CPUs (0: all)")
    parser.add_argument("--skip-mergekit", action="store_true",
                        help="no mergekit run (errors of the first layer against svdvals' optimum)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        base, tuned = write_pair(tmp, args.layers)
        size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        print(f"pair: {args.layers} layers, {size / 1e9:.2f} GB fp16 each (base 4 shards, tuned 3), ΔW spectrum "
              f"~ (j+1)^-{DECAY}, ‖ΔW‖ = {RELATIVE_CHANGE:.0%} of ‖W‖ (written in {time.perf_counter() - t:.0f} s)")
        print(f"torch {torch.__version__}, {args.cpus or len(os.sched_getaffinity(0))} CPUs, load average "
              f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; rank {args.rank}")
        for folder in (base, tuned):  # page cache warm-up: both tools read from memory
            for f in folder.glob("*.safetensors"):
                f.read_bytes()
        wall, rss, out = run([sys.executable, "-c", API, str(base), str(tuned), str(tmp / "ours"), str(args.rank),
                              args.device], args.cpus)
        print(f"adaptools.extract: {wall:7.2f} s wall (process), peak RSS {rss / 1e9:.2f} GB; {out.strip()}")
        outputs = {"adaptools": tmp / "ours"}
        if not args.skip_mergekit:
            mergekit = mergekit_venv()
            mk_wall, mk_rss, _ = run([str(mergekit), "--model", str(tuned), "--base-model", str(base), "--out-path",
                                      str(tmp / "mergekit"), "--max-rank", str(args.rank)], args.cpus)
            print(f"mergekit-extract-lora: {mk_wall:7.2f} s wall, peak RSS {mk_rss / 1e9:.2f} GB")
            print(f"speed-up {mk_wall / wall:.1f}x (target >= 20x); peak RSS {rss / 1e9:.2f} GB (target <= 1.5 GB), "
                  f"mergekit's {mk_rss / rss:.1f}x ours")
            outputs["mergekit"] = tmp / "mergekit"
        table = errors(base, tuned, outputs, args.layers, args.rank)
        reference = "mergekit" if "mergekit" in outputs else "optimal"
        ratios = {m: row["adaptools"] / row[reference] for m, row in table.items()}
        worst = max(ratios, key=ratios.get)
        by_shape: dict[str, list[float]] = {}
        for module, ratio in ratios.items():
            by_shape.setdefault(module.rsplit(".", 1)[-1], []).append(ratio)
        print(f"error / {reference} error per module ({len(ratios)} modules): worst {ratios[worst]:.5f} ({worst}), "
              f"mean {sum(ratios.values()) / len(ratios):.5f} (target <= 1.01)")
        for name, values in by_shape.items():
            print(f"  {name:>10}: worst ratio {max(values):.5f} over {len(values)} modules")


if __name__ == "__main__":
    main()
