"""GGUF test inputs made by llama.cpp's own tools: a tiny Hugging Face Llama (with a tokenizer.json, as
convert_hf_to_gguf.py needs one) converted by convert_hf_to_gguf.py, K-quant files re-encoded by ggml's C
quantizer and written by gguf-py's GGUFWriter, and adapters whose factors lie on a power-of-two grid (ΔW exact)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from factories import make_base, make_peft_adapter, peft_model
from llama_cpp import llama_cpp_tree, reference_quantize
from safetensors.torch import load_file, save_file

GRID = 16
"""Adapter factors are multiples of 1/GRID (|x| <= 1/2): products and sums of rank-4 ΔW are exact in float32."""


def make_tokenizer(folder: Path) -> int:
    """A byte-fallback BPE tokenizer.json (what gguf-py's LlamaHfVocab reads); returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}, "▁": 259}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return len(vocab)


def make_gguf_source(folder: Path, **overrides) -> Path:
    """A tiny Llama (hidden 256: one K-quant super-block per row; GQA 4/2 heads) with its tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(folder)
    params = dict(hidden_size=256, intermediate_size=512, vocab_size=vocab, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64)
    return make_base(folder, "llama", **{**params, **overrides})


def convert_hf(source: Path, out: Path, outtype: str) -> Path:
    """llama.cpp's convert_hf_to_gguf.py SOURCE --outtype OUTTYPE --outfile OUT."""
    script = llama_cpp_tree() / "convert_hf_to_gguf.py"
    run = subprocess.run([sys.executable, str(script), str(source), "--outtype", outtype, "--outfile", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


CONVERT_MANY = """
import sys
tree, jobs = sys.argv[1], sys.argv[2:]
sys.path[:0] = [tree, tree + '/gguf-py']
import convert_hf_to_gguf
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'default'
base.TextModel._set_vocab_sentencepiece = lambda self, add_to_gguf=True: self._set_vocab_gpt2()
for source, out, options in zip(jobs[::3], jobs[1::3], jobs[2::3]):
    sys.argv = ['convert_hf_to_gguf.py', source, *options.split(), '--outfile', out]
    convert_hf_to_gguf.main()
"""
"""convert_hf_to_gguf.py's main() run on each (source, out, options) in one interpreter. The vocabulary goes through
the converter's BPE path under the pre-tokenizer name 'default' (a test tokenizer has no known pre-tokenizer hash
and no sentencepiece model); the tensors go through the converter untouched."""


def convert_many(jobs: list[tuple[Path, Path, str]]) -> None:
    """llama.cpp's convert_hf_to_gguf.py SOURCE OPTIONS --outfile OUT for every (SOURCE, OUT, OPTIONS), in one
    process (OPTIONS as on its command line, e.g. "--outtype f32 --fuse-qkv")."""
    args = [str(part) for job in jobs for part in job]
    run = subprocess.run([sys.executable, "-c", CONVERT_MANY, str(llama_cpp_tree()), *args],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, pad_token_id=None, bos_token_id=1, eos_token_id=2)
"""A tiny decoder of any transformers architecture: GQA 4/2 heads of 16 (q/k permutations visible)."""


def make_arch_source(folder: Path, model_type: str, tokenizer_class: str | None = None, **overrides) -> Path:
    """A tiny random transformers causal LM of `model_type` with the test tokenizer (its tokenizer_config naming
    `tokenizer_class` when given), saved in `folder`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(folder)
    if tokenizer_class is not None:
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": tokenizer_class}))
    config = AutoConfig.for_model(model_type, **{"vocab_size": vocab, **TINY, **overrides})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def peft_merged(base: Path, adapter: Path, out: Path) -> Path:
    """PEFT's merge_and_unload of the adapter on its base, saved with the base's tokenizer files."""
    peft_model(base, adapter).merge_and_unload().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, out / name)
    return out


def requantized(lib, source: Path, out: Path, types: dict[str, object], split_max_tensors: int = 0) -> Path:
    """SOURCE with each F32 tensor whose name contains a key of `types` re-encoded by ggml's C quantizer in that
    type (other tensors kept as stored), written by gguf-py's GGUFWriter (metadata copied; split into parts of `split_max_tensors`
    tensors when given: OUT-0000i-of-0000n.gguf)."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch, split_max_tensors=split_max_tensors)
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "split.")) or field.name == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for tensor in reader.tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:  # kept as stored
            writer.add_tensor(tensor.name, np.asarray(tensor.data).view(np.uint8), raw_dtype=tensor.tensor_type)
            continue
        values = np.asarray(tensor.data, dtype=np.float32)
        qtype = next((t for part, t in types.items() if part in tensor.name), None)
        if qtype is None or values.ndim < 2:
            writer.add_tensor(tensor.name, values)
            continue
        encoded = reference_quantize(lib, values, qtype)
        writer.add_tensor(tensor.name, encoded, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def grid_adapter(base: Path, folder: Path, seed: int = 1, **lora_kwargs) -> Path:
    """A PEFT adapter whose factors are multiples of 1/GRID (scale alpha/r a power of two): ΔW is exact."""
    make_peft_adapter(base, folder, seed=seed, **lora_kwargs)
    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    gen = torch.Generator().manual_seed(seed)
    save_file({k: (torch.randint(-GRID // 2, GRID // 2 + 1, v.shape, generator=gen) / GRID).to(v.dtype)
               if "lora_" in k and "magnitude" not in k else v for k, v in state.items()}, path)
    return folder


def llama_gguf(base: Path, out: Path) -> Path:
    """The tiny Llama base as a GGUF file written by gguf-py's GGUFWriter (llama.cpp names, q/k rows permuted, the
    linear weights Q8_0, a vocabulary array to mutate)."""
    import gguf

    from adaptools.checkpoints.names_gguf import rope_order

    config = json.loads((base / "config.json").read_text())
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_token_list([f"t{i}" for i in range(config["vocab_size"])])
    for key, tensor in load_file(base / "model.safetensors").items():
        name = names.get_name(key, try_suffixes=(".weight",))
        values = tensor.float().numpy()
        kind = name.split(".")[-2]
        if kind in heads:
            values = values[rope_order(len(values), heads[kind]).numpy()]
        if values.ndim == 2 and values.shape[1] % 32 == 0 and "embd" not in name and name != "output.weight":
            writer.add_tensor(name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
