"""Merging into GGUF files of every architecture that convert_hf_to_gguf.py only renames (names_gguf.RENAMED),
against the converter itself: a tiny random model of each architecture is converted, and so is the model PEFT merged
with a LoRA on every linear layer and the embeddings. With the adapter on a power-of-two grid ΔW is exact, so
merging into the converted base must give the converted merged model byte for byte: names, q/k row permutations,
fused projections and tied embeddings all as the converter has them."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf_factories import convert_many, grid_adapter, make_arch_source, peft_merged

import adaptools
from adaptools.checkpoints import open_container
from adaptools.checkpoints.names_gguf import HF_ARCHITECTURES, RENAMED
from adaptools.errors import BaseMismatchError

MODELS = {
    "mistral": {}, "smollm3": {}, "granite": {}, "olmo": {}, "olmo2": {}, "qwen2": {"vocab_size": 264},
    "qwen3": {}, "stablelm": {}, "exaone4": {}, "cohere": {}, "gemma": {}, "gemma2": {}, "gemma3_text": {},
    "phi3": {"tokenizer_class": "GPT2Tokenizer"}, "phi": {"num_key_value_heads": 4, "partial_rotary_factor": 0.5},
    "starcoder2": {},
}
"""transformers model_type → overrides of the tiny config (qwen2's tokenizer adds a token; phi3's converter reads a
sentencepiece model unless the tokenizer is GPT-2's; phi has no GQA)."""


FUSED = ("mistral", "olmo", "qwen3")
"""Also converted with --fuse-qkv (llama's and olmo's q/k rows permuted inside the fused tensor)."""


def linear_names(model) -> list[str]:
    """The last names of every nn.Linear and nn.Embedding of `model` (lm_head left out when tied to the embeddings)."""
    tied = model.config.tie_word_embeddings
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and not (tied and name == "lm_head")})


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{model_type: (base GGUF, adapter, reference GGUF)}: every conversion in one run of the converter."""
    from factories import load_base

    root = tmp_path_factory.mktemp("arch")
    made, pairs = {}, []
    for model_type, overrides in MODELS.items():
        source = make_arch_source(root / model_type, model_type, **overrides)
        adapter = grid_adapter(source, root / f"{model_type}-lora", r=4, lora_alpha=8,
                               target_modules=linear_names(load_base(source)), save_embedding_layers=False)
        merged = peft_merged(source, adapter, root / f"{model_type}-merged")
        made[model_type] = (root / f"{model_type}.gguf", adapter, root / f"{model_type}-reference.gguf")
        pairs += [(source, made[model_type][0], "--outtype f32"), (merged, made[model_type][2], "--outtype f32")]
        if model_type in FUSED:  # and as --fuse-qkv writes them: q, k and v in one tensor
            made[f"{model_type}-fused"] = (root / f"{model_type}-fused.gguf", adapter,
                                           root / f"{model_type}-fused-reference.gguf")
            pairs += [(source, made[f"{model_type}-fused"][0], "--outtype f32 --fuse-qkv"),
                      (merged, made[f"{model_type}-fused"][2], "--outtype f32 --fuse-qkv")]
    convert_many(pairs)
    return made


def test_every_renamed_architecture_is_tested():
    assert set(RENAMED) == {HF_ARCHITECTURES[t] for t in MODELS} | {"llama"}
    assert set(HF_ARCHITECTURES) == set(MODELS) | {"llama"}


@pytest.mark.parametrize("model_type", [*MODELS, *(f"{t}-fused" for t in FUSED)])
def test_merge_equals_converting_the_peft_merged_model(model_type, converted, tmp_path):
    base, adapter, reference = converted[model_type]
    arch = gguf.GGUFReader(base).fields["general.architecture"].contents()
    assert arch == HF_ARCHITECTURES[model_type.removesuffix("-fused")]
    out = tmp_path / "merged.gguf"
    adaptools.merge(base, adapter, out=out)
    before = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(base).tensors}
    want = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(reference).tensors}
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    assert list(got) == list(want)
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    changed = {n for n in want if not np.array_equal(want[n], before[n])}
    names = open_container(base).names
    modules = adaptools.load(adapter).modules
    assert changed == {names.target(m).key for m in modules}
    fused = {names.target(m).key for m in modules if names.target(m).rows is not None}
    assert len(changed) == len(modules) - 2 * len(fused) and ("attn_qkv" in str(fused)) == model_type.endswith("-fused")


def test_gemma_norms_are_refused_as_full_tensors(converted):
    """Gemma files store each norm as 1 + w: a full norm tensor can be neither merged in nor extracted."""
    names = open_container(converted["gemma2"][0]).names
    with pytest.raises(BaseMismatchError, match="1 \\+ w"):
        names.key("model.layers.0.post_feedforward_layernorm.weight")
    with pytest.raises(BaseMismatchError, match="1 \\+ w"):
        names.source("blk.0.attn_norm.weight")
    assert names.key("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"


@pytest.mark.parametrize("arch, why", [("qwen2moe", "experts are stacked"), ("falcon", "re-interleaved"),
                                       ("gpt2", "transposed"), ("bert", "not known to be a renaming"),
                                       ("no-such-arch", "not known")])
def test_other_architectures_are_refused_by_name(arch, why):
    from adaptools.checkpoints.names_gguf import GGUFNames

    with pytest.raises(BaseMismatchError, match=f"'{arch}'.*more than renaming.*{why}"):
        GGUFNames([], arch, 2, 4, 2, {})


@pytest.mark.parametrize("model_type", [*MODELS, *(f"{t}-fused" for t in FUSED)])
def test_extract_and_llama_cpp_adapters_name_the_models_modules(model_type, converted, tmp_path):
    """The converted merged model minus the converted base gives PEFT's ΔW under the model's own module paths (this
    architecture's spellings, q/k rows back in order); `convert --to gguf` names the same tensors from the GGUF file
    as from the transformers folder."""
    from factories import peft_delta_weights, peft_model

    from adaptools.formats.gguf_lora import write_gguf_adapter

    base, adapter, reference = converted[model_type]
    source = base.with_name(model_type.removesuffix("-fused"))
    extracted, _ = adaptools.extract(base, reference, rank=12 if model_type.endswith("-fused") else 4)  # q, k, v: 3×4
    want = peft_delta_weights(peft_model(source, adapter))
    assert sorted(extracted.modules) == sorted(want)
    for module, delta in want.items():
        torch.testing.assert_close(extracted.delta(module), delta, rtol=1e-4, atol=1e-5)
    loaded = adaptools.load(adapter)
    if model_type.endswith("-fused"):
        with pytest.raises(BaseMismatchError, match="--fuse-qkv"):
            write_gguf_adapter(loaded, base, tmp_path / "fused.gguf")
        return
    files = [write_gguf_adapter(loaded, b, tmp_path / f"{i}.gguf") for i, b in enumerate((base, source))]
    tensors = [{t.name: np.asarray(t.data) for t in gguf.GGUFReader(f).tensors} for f in files]
    assert list(tensors[0]) == list(tensors[1]) and len(tensors[0]) == 2 * len(loaded.modules)
    assert all(np.array_equal(tensors[0][n], tensors[1][n]) for n in tensors[0])
