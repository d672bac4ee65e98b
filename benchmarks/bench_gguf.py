"""GGUF merges and K-quant encoding against llama.cpp's own C code, on TinyLlama-shaped GGUF files made here:

    python benchmarks/bench_gguf.py [--layers 4] [--rank 64] [--repeats 1] [--encode-rows 2048] [--llama-cpp]

1. K-quant encoder throughput: adaptools' batched port of ggml's quantize_row_q{4,5,6}_K_ref (numpy, one thread)
   against ggml's C reference (`ggml_quantize_chunk`, single-threaded, from libggml-base.so built by
   tests/llama_cpp.py from the llama-cpp-python 0.3.36 sdist), on the same float32 rows; the bytes must agree.
2. Merge: a TinyLlama-shaped base (hidden 2048, intermediate 5632, 32 heads / 4 KV heads, vocab 32000; --layers
   decoder layers, 22 = TinyLlama-1.1B, default 4 so the run finishes in a few minutes here) in Q8_0 and in a
   Q4_K_M-like mix (attn_v, ffn_down, output Q6_K; the other linear weights and token_embd Q4_K; norms F32;
   K-quants encoded by the C reference), a rank-64 LoRA on every linear layer: `adaptools.merge` (its own time, in
   a fresh process) and the CLI against a plain copy of the file, with peak RSS.
3. With --llama-cpp, llama.cpp's own route on the same base and LoRA in the same run: the LoRA written as llama.cpp's
   adapter (`adaptools convert --to gguf`, untimed: convert_lora_to_gguf.py's step), `llama-export-lora` (base +
   adapter -> a file whose merged tensors are F16) then `llama-quantize` back to the base's type (Q8_0 or Q4_K_M),
   both with as many threads as the machine has CPUs, built once by tests/llama_cpp.py's llama_build() (libllama
   and the two tools from the same sdist, GGML_NATIVE=ON: 11 minutes on two busy cores here, niced).

Targets (issue 23): merge <= 2x the copy for Q8_0, <= 3x for Q4_K_M; K-quant encoding >= 0.5x the C reference's
single-thread speed; peak RSS <= 1 GB.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from bench_merge import API, LAUNCH, llama_shapes, run, write_adapter  # noqa: F401 (LAUNCH: run's launcher)
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from llama_cpp import ggml_library, llama_build, reference_quantize  # noqa: E402

import adaptools  # noqa: E402
from adaptools.checkpoints import gguf_quants  # noqa: E402

HEADS, KV_HEADS = 32, 4
K_M_MIX = {"attn_v": T.Q6_K, "ffn_down": T.Q6_K, "output.": T.Q6_K, "attn_": T.Q4_K, "ffn_": T.Q4_K,
           "token_embd": T.Q4_K}
COPY = """
import shutil, sys
shutil.copyfile(sys.argv[1], sys.argv[2])
"""


def encode_throughput(lib, rows: int) -> None:
    """MB of float32 per second, ours and the C reference's, on TinyLlama's two weight shapes."""
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32) for cols in (2048, 5632)]
    megabytes = sum(d.nbytes for d in data) / 1e6
    print(f"K-quant encoding of {megabytes:.0f} MB float32 ({rows} rows of 2048 and of 5632), one thread:")
    for qtype in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q2_K, T.Q3_K):
        start = time.perf_counter()
        want = [reference_quantize(lib, d, qtype) for d in data]
        c_seconds = time.perf_counter() - start
        start = time.perf_counter()
        got = [gguf_quants.encode(d, qtype) for d in data]
        ours = time.perf_counter() - start
        equal = all(np.array_equal(g, w) for g, w in zip(got, want))
        print(f"  {qtype.name}: adaptools {megabytes / ours:6.1f} MB/s, C reference {megabytes / c_seconds:6.1f} MB/s:"
              f" {c_seconds / ours:.2f}x the C speed (target >= 0.5x); bytes equal: {equal}")


def write_gguf(path: Path, layers: int, types: dict[str, T], lib) -> None:
    """A random TinyLlama-shaped GGUF: llama.cpp names, weights in `types` (first matching name part; Q8_0 when
    none matches), K-quants by the C reference, written by gguf-py's GGUFWriter."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(layers)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_embedding_length(2048)
    writer.add_feed_forward_length(5632)  # with the next three: what llama-quantize's llama_model reads
    writer.add_context_length(2048)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(32000)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if not types else gguf.LlamaFileType.MOSTLY_Q4_K_M)
    generator = torch.Generator().manual_seed(0)
    for key, shape in llama_shapes(layers).items():
        name = names.get_name(key, try_suffixes=(".weight",))
        values = (torch.randn(shape, generator=generator) / shape[-1] ** 0.5).numpy()
        if len(shape) == 1:
            writer.add_tensor(name, values)
            continue
        qtype = next((t for part, t in types.items() if part in name), T.Q8_0)
        encoded = reference_quantize(lib, values, qtype) if qtype in gguf_quants.K_QUANTS else \
            gguf.quants.quantize(values, qtype)
        writer.add_tensor(name, encoded, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (22 = TinyLlama-1.1B; default: quick)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each contender (fastest kept)")
    parser.add_argument("--encode-rows", type=int, default=1024, help="rows per shape in the encoder comparison")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="also time llama-export-lora + llama-quantize (built once: about 11 minutes)")
    args = parser.parse_args()
    tools = llama_build() if args.llama_cpp else None
    threads = str(os.cpu_count() or 1)
    lib = ggml_library()
    encode_throughput(lib, args.encode_rows)
    with tempfile.TemporaryDirectory(prefix="bench_gguf_") as tmp:
        tmp = Path(tmp)
        write_adapter(tmp / "adapter", tmp / "hf-base", args.layers, args.rank)
        for label, types in (("Q8_0", {}), ("Q4_K_M", K_M_MIX)):
            base = tmp / f"base-{label}.gguf"
            write_gguf(base, args.layers, types, lib)
            print(f"{label} base: {args.layers} layers, {base.stat().st_size / 1e6:.0f} MB; LoRA r={args.rank} on "
                  "every linear layer")

            def timed(name: str, argv: list[str], out: Path | None) -> tuple[float, int, str, float | None, float]:
                """(wall s, peak RSS, stdout, its own time when it prints one, CPU s) of the fastest run."""
                runs = []
                for _ in range(args.repeats):
                    runs.append(run(argv))
                    if out is not None:
                        out.unlink()
                best = min(runs)
                inside = [float(m.group(1)) for r in runs for m in [re.search(r"seconds=([0-9.]+)", r[2])] if m]
                own = min(inside) if inside else None
                print(f"  {name:>16}: {best[0]:7.2f} s ({best[3]:.2f} s CPU), peak RSS {best[1] / 1e6:6.0f} MB"
                      + (f"; its own work {own:.2f} s" if own is not None else ""))
                return (*best[:3], own, best[3])

            out = tmp / "out.gguf"
            run([sys.executable, "-c", COPY, str(base), str(out)])  # page cache warm-up
            out.unlink()
            copy = timed("copy", [sys.executable, "-c", COPY, str(base), str(out)], out)
            api = timed("adaptools.merge", [sys.executable, "-c", API, str(base), str(tmp / "adapter"), str(out),
                                            "cpu"], out)
            cli = timed("adaptools merge", [sys.executable, "-m", "adaptools_cli", "merge", str(base),
                                            str(tmp / "adapter"), "-o", str(out)], out)
            target = 2 if label == "Q8_0" else 3
            surviving = re.search(r"requantization: mean ([0-9.]+%)", cli[2])
            print(f"  merge vs plain copy: {api[3] / copy[0]:.2f}x (target <= {target}x); CLI wall {cli[0]:.2f} s; "
                  f"peak RSS {max(api[1], cli[1]) / 1e9:.2f} GB (target <= 1 GB); ΔW surviving requantization "
                  f"{surviving.group(1) if surviving else '?'}")
            if tools is not None:
                adapter, f16 = tmp / "adapter.gguf", tmp / "export-lora-f16.gguf"
                adaptools.write_gguf_adapter(adaptools.load(tmp / "adapter"), base, adapter)
                export = timed("llama-export-lora", [str(tools / "llama-export-lora"), "-m", str(base), "--lora",
                                                     str(adapter), "-o", str(f16), "-t", threads], None)
                quantize = timed("llama-quantize", [str(tools / "llama-quantize"), str(f16), str(out), label, threads],
                                 out)
                wall, cpu = export[0] + quantize[0], export[4] + quantize[4]
                print(f"  llama.cpp (export-lora + quantize, {threads} threads): {wall:.2f} s ({cpu:.2f} s CPU), "
                      f"peak RSS {max(export[1], quantize[1]) / 1e9:.2f} GB; adaptools.merge takes {api[0] / wall:.2f}x "
                      f"its wall ({api[3] / wall:.2f}x with its own work only; the CLI {cli[0] / wall:.2f}x) and "
                      f"{api[4] / cpu:.2f}x its CPU")
                f16.unlink()
                adapter.unlink()
            base.unlink()


if __name__ == "__main__":
    main()
