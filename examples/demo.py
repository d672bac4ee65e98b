"""The adaptools tour on a small embedded example.

Builds, with torch and safetensors only, a tiny Llama-shaped base checkpoint (fp16, two shards) and two
PEFT LoRA adapters of different ranks and alphas, then runs the CLI on them step by step, as a user would.
Everything is written under ./demo_out (or the folder given as the first argument), replaced on each run.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import adaptools
from adaptools import Adapter, LoraModule

HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV_HEADS = 64, 128, 4, 256, 4, 2
HEAD_DIM = HIDDEN // HEADS


def llama_config() -> dict:
    """config.json of a tiny Llama (grouped-query attention), as transformers writes it."""
    return {
        "_name_or_path": "demo/tiny-llama",
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }


def linear_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer of one decoder layer."""
    kv = KV_HEADS * HEAD_DIM
    return {
        "self_attn.q_proj": (HIDDEN, HIDDEN),
        "self_attn.k_proj": (kv, HIDDEN),
        "self_attn.v_proj": (kv, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTER, HIDDEN),
        "mlp.up_proj": (INTER, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTER),
    }


def write_base(folder: Path) -> None:
    """A random fp16 base in two shards with an index, plus config.json."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02}
    for i in range(LAYERS):
        for name, shape in linear_shapes().items():
            tensors[f"model.layers.{i}.{name}.weight"] = torch.randn(*shape, generator=gen) * 0.02
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(HIDDEN)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    tensors["model.norm.weight"] = torch.ones(HIDDEN)
    tensors["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02
    folder.mkdir(parents=True)
    keys = list(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    weight_map, total = {}, 0
    for shard, shard_keys in halves.items():
        part = {k: tensors[k].half().contiguous() for k in shard_keys}
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in shard_keys})
        total += sum(t.numel() * 2 for t in part.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(llama_config(), indent=2))


def random_adapter(rank: int, alpha: float, targets: tuple[str, ...], seed: int) -> Adapter:
    """A LoRA on `targets` of every layer with random factors (what training would leave)."""
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for i in range(LAYERS):
        for name, (out_f, in_f) in linear_shapes().items():
            if name.split(".")[-1] in targets:
                modules[f"model.layers.{i}.{name}"] = LoraModule(
                    A=torch.randn(rank, in_f, generator=gen) / in_f**0.5,
                    B=torch.randn(out_f, rank, generator=gen) * 0.05,
                    scale=alpha / rank,
                )
    return Adapter(modules=modules, base_model="demo/tiny-llama")


def run(title: str, *args: str) -> None:
    """Print and run one `adaptools` command line."""
    print(f"\n=== {title}\n$ adaptools {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "adaptools_cli", *args], check=True)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo_out")
    shutil.rmtree(out, ignore_errors=True)
    write_base(out / "base")
    random_adapter(8, 16, ("q_proj", "v_proj", "up_proj"), seed=1).save(out / "style")
    random_adapter(4, 4, ("q_proj", "k_proj", "down_proj"), seed=2).save(out / "domain")
    print(f"adaptools {adaptools.__version__}: wrote a tiny fp16 Llama base and two LoRA adapters under {out}/")

    base, style, domain = str(out / "base"), str(out / "style"), str(out / "domain")
    run("What is in an adapter", "info", style)
    run("Convert to a kohya file", "convert", domain, "--to", "kohya", "-o", str(out / "domain.safetensors"))
    run("... and back to PEFT, names mapped with the base", "convert", str(out / "domain.safetensors"), "--to", "peft", "--base", base, "-o", str(out / "domain_roundtrip"))
    run("Exact weighted sum (rank 8 + 4 where both adapt a module)", "combine", style, domain, "--weights", "0.7,0.3", "-o", str(out / "blend"))
    run("Re-rank the blend to 99% of its energy, error known per module", "rerank", str(out / "blend"), "--energy", "0.99", "--report", str(out / "rerank_report.json"), "-o", str(out / "blend_small"))
    run("Pad to a rank vLLM serves (--max-lora-rank); every consumer reads the same scale", "convert", str(out / "blend_small"), "--to", "peft", "--serve", "vllm", "-o", str(out / "blend_vllm"))
    run("As an mlx-lm adapter folder (one rank, scale 1)", "convert", str(out / "blend"), "--to", "mlx", "-o", str(out / "blend_mlx"))
    run("TIES merge on each module's ΔW, refactored to rank 8", "combine", style, domain, "--method", "ties", "--density", "0.3", "--rank", "8", "-o", str(out / "ties"))
    run("Rank spectrum of the two adapters: do they fight over the same directions?", "spectrum", style, domain, "--plot", str(out / "spectrum.png"), "--json", str(out / "spectrum.json"))
    run("Merge the blend into the base, bf16, streamed shard by shard", "merge", base, str(out / "blend"), "--dtype", "bf16", "-o", str(out / "merged_bf16"))
    run("Merge it in the base's own fp16", "merge", base, str(out / "blend"), "-o", str(out / "merged"))
    run("Extract the blend back from the merged model (ΔW = merged − base, rank 8 + 4)", "extract", base, str(out / "merged"), "--rank", "12", "--report", str(out / "extract_report.json"), "-o", str(out / "blend_extracted"))
    run("One merged model per adapter from one read of the base", "merge", base, "--each", style, domain, "-o", str(out / "per_adapter"))
    run("Quantize-after-merge: the blend merged, then NF4 (bitsandbytes layout, loads as Linear4bit)", "merge", base, str(out / "blend"), "--dtype", "nf4", "-o", str(out / "merged_nf4"))
    run("Quantize the base to NF4", "quantize", base, "--to", "nf4", "-o", str(out / "base_nf4"))
    run("Merge into the NF4 base: how much of each update survives requantization?", "merge", str(out / "base_nf4"), str(out / "blend"), "-o", str(out / "merged_into_nf4"))
    run("LoRA to DoRA (magnitudes from the base; same outputs)", "dora", "to-dora", style, "--base", base, "-o", str(out / "style_dora"))
    run("... and DoRA back to a rank-8 LoRA, fit error reported", "dora", "to-lora", str(out / "style_dora"), "--base", base, "--rank", "8", "-o", str(out / "style_lora_again"))
    run("Redo a recorded result from its recipe", "replay", str(out / "blend" / "adaptools_recipe.json"), "-o", str(out / "blend_replayed"))
    print("\nDone. Everything the tour wrote is under", out)


if __name__ == "__main__":
    main()
