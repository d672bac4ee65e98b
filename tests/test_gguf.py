"""Merging into GGUF files, against llama.cpp's own tools: bases made by convert_hf_to_gguf.py from a tiny
Hugging Face Llama (f32, f16, bf16, q8_0) and K-quant bases re-encoded by ggml's C quantizer. With adapters on a
power-of-two grid ΔW is exact, so every merged tensor must equal decode(base) + ΔW re-encoded by the reference,
byte for byte; every other byte of the file (key/values, their order, tensor order, alignment, untouched tensors)
must be the base's."""
from __future__ import annotations

import dataclasses
import shutil

import gguf
import numpy as np
import pytest
import torch
from conftest import run_cli
from factories import make_peft_adapter, peft_delta_weights, peft_model
from gguf import GGMLQuantizationType as T
from gguf_factories import convert_hf, grid_adapter, make_gguf_source, requantized
from llama_cpp import ggml_library, reference_quantize

import adaptools
from adaptools.checkpoints import GGUFFile, open_container
from adaptools.checkpoints.names_gguf import rope_order
from adaptools.errors import BaseMismatchError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
K_MIX = {"attn_v": T.Q6_K, "ffn_down": T.Q6_K, "attn_": T.Q4_K, "ffn_": T.Q4_K, "output.": T.Q5_K,
         "token_embd": T.Q8_0}
"""A Q4_K_M-like mix (llama-quantize gives attn_v and ffn_down more bits)."""


@pytest.fixture(scope="module")
def ggml():
    return ggml_library()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_gguf_source(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="module")
def bases(source, ggml, tmp_path_factory):
    """{kind: GGUF file}: the converter's f32/f16/bf16/q8_0 outputs and a K-quant mix."""
    root = tmp_path_factory.mktemp("gguf")
    made = {t: convert_hf(source, root / f"base-{t}.gguf", t) for t in ("f32", "f16", "bf16", "q8_0")}
    made["k-mix"] = requantized(ggml, made["f32"], root / "base-k.gguf", K_MIX)
    made["legacy-mix"] = requantized(ggml, made["f32"], root / "base-legacy.gguf",
                                     {"attn_q": T.Q4_0, "attn_k": T.Q4_1, "attn_v": T.Q5_0, "attn_output": T.Q5_1,
                                      "ffn_": T.Q3_K, "output.": T.Q2_K})
    return made


@pytest.fixture(scope="module")
def lora(source, tmp_path_factory):
    return grid_adapter(source, tmp_path_factory.mktemp("lora") / "grid", r=4, lora_alpha=8, target_modules=TARGETS)


def tensors(path) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def expected_bytes(ggml, base_tensor, delta: torch.Tensor | None) -> np.ndarray:
    """decode(base) + ΔW encoded by the reference (ggml's C quantizer; F32/F16/BF16 by gguf-py, ggml's equal)."""
    qtype = base_tensor.tensor_type
    values = gguf.quants.dequantize(base_tensor.data, qtype).astype(np.float32).reshape(
        tuple(reversed([int(d) for d in base_tensor.shape])))
    if delta is not None:
        values = values + delta.numpy()
    if qtype in (T.F32, T.F16, T.BF16):
        return gguf.quants.quantize(values, qtype).view(np.uint8).reshape(-1)
    return reference_quantize(ggml, values, qtype).reshape(-1)


def gguf_deltas(source, adapter) -> dict[str, torch.Tensor]:
    """PEFT's ΔW per GGUF tensor name, q/k rows in llama.cpp's order."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    config = peft_model(source, adapter).config
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    out = {}
    for module, delta in peft_delta_weights(peft_model(source, adapter)).items():
        name = names.get_name(module) + ".weight"
        kind = name.split(".")[-2]
        out[name] = delta[rope_order(delta.shape[0], heads[kind])] if kind in heads else delta
    return out


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0", "k-mix", "legacy-mix"])
def test_merge_is_decoded_base_plus_delta_reencoded_byte_for_byte(kind, bases, lora, source, ggml, tmp_path):
    out = tmp_path / "merged.gguf"
    report = adaptools.merge(bases[kind], lora, out=out)
    assert report.outputs == {"merged.gguf": out}
    deltas = gguf_deltas(source, lora)
    base, merged = tensors(bases[kind]), tensors(out)
    assert list(merged) == list(base)
    for name, tensor in base.items():
        got = np.asarray(merged[name].data).view(np.uint8).reshape(-1)
        assert merged[name].tensor_type == tensor.tensor_type
        if name in deltas:
            assert np.array_equal(got, expected_bytes(ggml, tensor, deltas[name])), name
        else:
            assert np.array_equal(got, np.asarray(tensor.data).view(np.uint8).reshape(-1)), name
    if kind in ("q8_0", "k-mix", "legacy-mix"):  # the survival of each ΔW after re-encoding, per module
        assert set(report.survival["merged.gguf"]) == {n.removesuffix(".weight") for n in deltas}


def test_everything_but_the_merged_tensors_is_the_base_byte_for_byte(bases, lora, tmp_path):
    """Same file size, same header bytes, same alignment padding: only merged tensors' bytes differ."""
    out = tmp_path / "merged.gguf"
    adaptools.merge(bases["k-mix"], lora, out=out)
    base, merged = bases["k-mix"].read_bytes(), out.read_bytes()
    assert len(base) == len(merged)
    header = GGUFFile(bases["k-mix"]).header
    assert base[:header.data_start] == merged[:header.data_start]
    changed = np.flatnonzero(np.frombuffer(base, np.uint8) != np.frombuffer(merged, np.uint8))
    merged_spans = [(t.start, t.end) for name, t in header.tensors.items() if name.startswith("blk.") and "norm" not in name]
    inside = np.zeros(len(base), dtype=bool)
    for start, end in merged_spans:
        inside[start:end] = True
    assert len(changed) and inside[changed].all()


def test_f32_merge_equals_converting_the_merged_hf_model(bases, lora, source, tmp_path):
    """Names and the q/k row order are llama.cpp's: merging the HF model then converting it gives the same file
    data as merging into the converted file (LoRA on the grid: exact)."""
    adaptools.merge(source, lora, out=tmp_path / "hf-merged")
    reference = convert_hf(tmp_path / "hf-merged", tmp_path / "reference.gguf", "f32")
    adaptools.merge(bases["f32"], lora, out=tmp_path / "merged.gguf")
    want, got = tensors(reference), tensors(tmp_path / "merged.gguf")
    assert list(want) == list(got)
    for name in want:
        assert np.array_equal(np.asarray(want[name].data), np.asarray(got[name].data)), name


def test_dora_merges_as_peft_does(bases, source, tmp_path):
    dora = make_peft_adapter(source, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True,
                             target_modules=["q_proj", "k_proj", "down_proj"])
    adaptools.merge(source, dora, out=tmp_path / "hf-merged")
    reference = tensors(convert_hf(tmp_path / "hf-merged", tmp_path / "reference.gguf", "f32"))
    adaptools.merge(bases["f32"], dora, out=tmp_path / "merged.gguf")
    for name, tensor in tensors(tmp_path / "merged.gguf").items():
        np.testing.assert_allclose(np.asarray(tensor.data), np.asarray(reference[name].data), rtol=1e-5, atol=1e-6)


def test_types_without_an_encoder_are_refused_by_name_or_written_as_gguf_type(bases, lora, ggml, tmp_path):
    """MXFP4 (gguf-py encodes it, adaptools does not): an error naming the tensors before any output; with
    --gguf-type q8_0 those tensors become Q8_0, general.file_type is updated, every other tensor keeps its type."""
    source = tmp_path / "mx.gguf"
    reader = gguf.GGUFReader(bases["f32"])
    writer = gguf.GGUFWriter(source, "llama")
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            kind = field.types[0]
            writer.add_key_value(field.name, field.contents(), kind,
                                 sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        values = np.asarray(t.data, dtype=np.float32)
        if "attn_q" in t.name:
            writer.add_tensor(t.name, gguf.quants.quantize(values, T.MXFP4), raw_dtype=T.MXFP4)
        else:
            writer.add_tensor(t.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BaseMismatchError, match=r"blk\.0\.attn_q\.weight \(MXFP4\).*--gguf-type"):
        adaptools.merge(source, lora, out=tmp_path / "refused.gguf")
    assert not (tmp_path / "refused.gguf").exists()
    adaptools.merge(source, lora, out=tmp_path / "out.gguf", gguf_type="q8_0")
    merged = gguf.GGUFReader(tmp_path / "out.gguf")
    types = {t.name: t.tensor_type for t in merged.tensors}
    assert {n for n, q in types.items() if q == T.Q8_0} == {"blk.0.attn_q.weight", "blk.1.attn_q.weight"}
    assert all(q in (T.F32, T.Q8_0) for q in types.values())
    assert merged.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32


def test_cli_merge_info_and_recipe(bases, lora, tmp_path, runner):
    out = tmp_path / "merged.gguf"
    result = run_cli(runner, "merge", bases["k-mix"], lora, "-o", out)
    assert result.exit_code == 0, result.output
    assert "requantization" in result.stdout and str(out) in result.stdout
    recipe = gguf.GGUFReader(out).fields["adaptools.recipe"].contents()
    assert '"merge"' in recipe
    info = run_cli(runner, "info", out)
    assert info.exit_code == 0, info.output
    assert "llama" in info.stdout and "Q4_K" in info.stdout and "Q6_K" in info.stdout


def test_cli_refuses_dtype_and_unknown_gguf_types(bases, lora, tmp_path, runner):
    for args, message in ((("--dtype", "fp16"), "keeps each tensor's ggml type"),
                          (("--gguf-type", "iq2_xs"), "not a type adaptools encodes"),
                          (("--max-shard-size", "1MB"), "max-shard-size does not apply")):
        result = run_cli(runner, "merge", bases["q8_0"], lora, "-o", tmp_path / "x.gguf", *args)
        assert result.exit_code == 2, result.output
        assert result.stderr.splitlines()[-1].startswith("error: ") and message in result.stderr
        assert not (tmp_path / "x.gguf").exists()


def test_names_are_llama_cpps_and_other_architectures_are_refused(bases):
    container = open_container(bases["f32"])
    assert isinstance(container, GGUFFile) and container.label == "gguf llama"
    assert "model.layers.1.self_attn.k_proj" in container.names.modules()
    target = container.names.target("model.layers.0.self_attn.k_proj")
    assert target.key == "blk.0.attn_k.weight" and torch.equal(target.row_order, rope_order(128, 2))
    assert container.names.target("model.layers.0.mlp.up_proj").row_order is None
    from adaptools.checkpoints.names_gguf import GGUFNames

    with pytest.raises(BaseMismatchError, match="'falcon'.*more than renaming"):
        GGUFNames(container.keys(), "falcon", 2, 4, 2, {})


# --- llama.cpp adapters (convert --to gguf) ----------------------------------------------------------------------

def llama_cpp_deltas(path) -> dict[str, torch.Tensor]:
    """ΔW per tensor as llama.cpp applies an adapter file: alpha / rank (alpha 0: 1) times lora_b @ lora_a."""
    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    found = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    deltas = {}
    for name, a in found.items():
        if name.endswith(".lora_a"):
            b = found[name.removesuffix(".lora_a") + ".lora_b"]
            deltas[name.removesuffix(".lora_a")] = (alpha / b.shape[-1] if alpha else 1.0) * b @ a
    return deltas


def test_gguf_adapter_is_the_converters_for_plain_lora(lora, source, bases, tmp_path, runner):
    from llama_cpp import llama_cpp_tree
    import subprocess
    import sys

    reference = tmp_path / "reference.gguf"
    run = subprocess.run([sys.executable, str(llama_cpp_tree() / "convert_lora_to_gguf.py"), "--base", str(source),
                          "--outtype", "f32", "--outfile", str(reference), str(lora)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    want = gguf.GGUFReader(reference)
    for base in (source, bases["q8_0"]):  # an HF folder or a GGUF file names the tensors alike
        out = tmp_path / f"ours-{base.name}.gguf"
        result = run_cli(runner, "convert", lora, "--to", "gguf", "--base", base, "-o", out)
        assert result.exit_code == 0, result.output
        got = gguf.GGUFReader(out)
        for key in ("general.architecture", "general.type", gguf.Keys.Adapter.TYPE, gguf.Keys.Adapter.LORA_ALPHA):
            assert got.fields[key].contents() == want.fields[key].contents(), key
        theirs = {t.name: t for t in want.tensors}
        assert sorted(t.name for t in got.tensors) == sorted(theirs)
        for t in got.tensors:
            assert t.tensor_type == T.F32 and list(t.shape) == list(theirs[t.name].shape)
            assert np.array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data)), t.name


@pytest.mark.parametrize("config", [dict(use_rslora=True), dict(alpha_pattern={"v_proj": 32}, rank_pattern={"o_proj": 2})],
                         ids=["rslora", "patterns"])
def test_gguf_adapter_means_what_peft_means(config, source, tmp_path):
    adapter = make_peft_adapter(source, tmp_path / "a", r=4, lora_alpha=8, target_modules=TARGETS, **config)
    out = tmp_path / "a.gguf"
    from adaptools.formats.gguf_lora import write_gguf_adapter

    write_gguf_adapter(adaptools.load(adapter), source, out)
    got = llama_cpp_deltas(out)
    want = gguf_deltas(source, adapter)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_extract_from_two_gguf_files_gives_the_peft_adapter(bases, lora, source, tmp_path):
    """An instruct GGUF minus its base: modules named by transformers paths, q/k rows back in transformers' order."""
    tuned = tmp_path / "tuned.gguf"
    adaptools.merge(bases["f32"], lora, out=tuned)
    adapter, report = adaptools.extract(bases["f32"], tuned, rank=4)
    want = peft_delta_weights(peft_model(source, lora))
    assert sorted(adapter.modules) == sorted(want) and sorted(report.modules) == sorted(want)
    for module, delta in want.items():
        torch.testing.assert_close(adapter.delta(module), delta, rtol=1e-4, atol=1e-5)


def test_cli_each_writes_one_gguf_per_adapter_and_extract_reads_gguf(bases, lora, source, tmp_path, runner):
    second = tmp_path / "second"
    shutil.copytree(lora, second)
    result = run_cli(runner, "merge", bases["q8_0"], lora, second, "--each", "-o", tmp_path / "each")
    assert result.exit_code == 0, result.output
    alone = tmp_path / "alone.gguf"
    adaptools.merge(bases["q8_0"], lora, out=alone)
    for name in (lora.name, "second"):
        assert tensors(tmp_path / "each" / f"{name}.gguf").keys() == tensors(alone).keys()
        assert [np.array_equal(np.asarray(a.data), np.asarray(b.data)) for a, b in
                zip(tensors(tmp_path / "each" / f"{name}.gguf").values(), tensors(alone).values())] == \
            [True] * len(tensors(alone))
    result = run_cli(runner, "extract", bases["q8_0"], alone, "--rank", "4", "-o", tmp_path / "back")
    assert result.exit_code == 0, result.output
    assert sorted(adaptools.load(tmp_path / "back").modules) == sorted(peft_delta_weights(peft_model(source, lora)))


def test_split_base_gives_split_output_part_for_part(bases, lora, ggml, tmp_path):
    """A base split in three parts (gguf-py's writer, as gguf-split names them) merges into a folder of three
    parts, each with its part's key/values and tensors; the tensors equal the single-file merge's."""
    split = requantized(ggml, bases["k-mix"], tmp_path / "base.gguf", {}, split_max_tensors=8)
    parts = sorted(tmp_path.glob("base-0000?-of-00003.gguf"))
    assert len(parts) == 3
    single = tmp_path / "single.gguf"
    adaptools.merge(bases["k-mix"], lora, out=single)
    adaptools.merge(parts[1], lora, out=tmp_path / "merged")  # any part names the whole split file
    outputs = sorted((tmp_path / "merged").glob("*.gguf"))
    assert [p.name for p in outputs] == [f"merged-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    want = tensors(single)
    for part, out in zip(parts, outputs):
        base_reader, out_reader = gguf.GGUFReader(part), gguf.GGUFReader(out)
        assert [(f.name, f.contents()) for f in base_reader.fields.values() if not f.name.startswith("GGUF.")] == \
            [(f.name, f.contents()) for f in out_reader.fields.values() if not f.name.startswith("GGUF.")]
        assert [t.name for t in base_reader.tensors] == [t.name for t in out_reader.tensors]
        for t in out_reader.tensors:
            assert np.array_equal(np.asarray(t.data), np.asarray(want[t.name].data)), t.name
    assert split.name == "base.gguf"


def test_a_delta_lost_in_requantization_is_reported(bases, lora, tmp_path):
    with pytest.warns(UserWarning, match=r"requantization keeps less than .* of ΔW in 14 of 14 modules.*llama-quantize"):
        report = adaptools.merge(bases["k-mix"], lora, [1e-5], out=tmp_path / "faint.gguf")
    assert max(report.survival["faint.gguf"].values()) < 0.5


def test_base_name_warning_only_on_a_real_mismatch(bases, lora, source, tmp_path):
    """The converter names the file after the model (general.name 'Tiny Llama' for tiny-llama): the adapter trained
    on that folder merges without a warning, one trained on another model warns; a file whose metadata names no
    model is not compared."""
    import warnings

    from gguf_factories import llama_gguf

    matching = adaptools.load(lora)
    assert gguf.GGUFReader(bases["q8_0"]).fields["general.name"].contents() == "Tiny Llama"
    other = dataclasses.replace(matching, base_model="meta-llama/Llama-3.2-1B-Instruct")
    unnamed = llama_gguf(source, tmp_path / "unnamed.gguf")
    for base, adapter, warned in ((bases["q8_0"], matching, False), (bases["q8_0"], other, True),
                                  (unnamed, other, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adaptools.merge(base, adapter, out=tmp_path / f"out-{len(list(tmp_path.iterdir()))}.gguf")
        messages = [str(w.message) for w in caught if "trained on" in str(w.message)]
        assert messages == ([f"adapter {matching.name!r} was trained on 'meta-llama/Llama-3.2-1B-Instruct', but "
                             "the base is 'Tiny Llama'"] if warned else []), (base.name, messages)


def test_tied_files_refuse_an_lm_head_update_by_name(bases):
    from adaptools.checkpoints.names_gguf import GGUFNames

    container = open_container(bases["f32"])
    tied = [k for k in container.keys() if k != "output.weight"]
    names = GGUFNames(tied, "llama", 2, 4, 2, {k: container.shape(k) for k in tied})
    assert names.target("model.embed_tokens").key == "token_embd.weight"
    with pytest.raises(BaseMismatchError, match="ties its output to token_embd"):
        names.target("lm_head")
    assert container.names.target("lm_head").key == "output.weight"


def test_convert_to_gguf_needs_the_base_and_refuses_what_llama_cpp_cannot_hold(lora, source, tmp_path, runner):
    result = run_cli(runner, "convert", lora, "--to", "gguf", "-o", tmp_path / "a.gguf")
    assert result.exit_code == 2 and "pass the base" in result.stderr
    dora = make_peft_adapter(source, tmp_path / "dora", r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj"])
    result = run_cli(runner, "convert", dora, "--to", "gguf", "--base", source, "-o", tmp_path / "b.gguf")
    assert result.exit_code == 2 and "DoRA" in result.stderr and "dora to-lora" in result.stderr
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()


def test_extract_to_gguf_from_two_gguf_files(bases, lora, tmp_path, runner):
    tuned = tmp_path / "tuned.gguf"
    adaptools.merge(bases["f32"], lora, out=tuned)
    result = run_cli(runner, "extract", bases["f32"], tuned, "--rank", "4", "--to", "gguf", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 0, result.output
    reference = tmp_path / "converted.gguf"
    assert run_cli(runner, "convert", lora, "--to", "gguf", "--base", bases["f32"], "-o", reference).exit_code == 0
    got, want = llama_cpp_deltas(tmp_path / "x.gguf"), llama_cpp_deltas(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
