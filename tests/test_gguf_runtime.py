"""llama.cpp itself runs what adaptools writes (opt-in: ADAPTOOLS_LLAMA_RUNTIME=1; builds libllama and the tools
once, 11 minutes on two cores here): a merged GGUF file gives the logits of its base with the adapter (written by
`adaptools convert --to gguf`) applied at run time by llama.cpp, and those of `llama-export-lora`'s merge.

Gaps are ‖a − b‖ / ‖a‖ over all logits. An F32 merge against the run-time adapter, and F32 and F16 merges against
llama-export-lora's (W + ΔW rounded once in the base's type by both): float32 rounding (1e-4). An F16 or Q8_0 merge
rounds W + ΔW to its type once more (and llama.cpp rounds the activations to that type for all of it), where the
run-time adapter adds ΔW in float32: the logits may move by what one such rounding of the merged weights moves them,
measured on the same model as the F32 merge against that merge re-encoded by ggml's C quantizer. Two independent
roundings of that size (weights and activations) add to √2 of it in norm; 2× is allowed, and the adapter must move
the logits 10× more than that."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import run_cli
from gguf import GGMLQuantizationType as T
from gguf_factories import grid_adapter, requantized
from llama_cpp import llama_bindings, llama_build
from factories import make_peft_adapter
from test_gguf import TARGETS, bases, ggml, source  # noqa: F401 (fixtures)

import adaptools

pytestmark = pytest.mark.skipif(os.environ.get("ADAPTOOLS_LLAMA_RUNTIME") != "1",
                                reason="llama.cpp runtime check: opt-in (ADAPTOOLS_LLAMA_RUNTIME=1; builds libllama)")
TOKENS = [1, 70, 150, 33, 200, 7, 99, 250, 3, 128]
FLOAT_RTOL = 1e-4
"""F32/F16 merges against the run-time adapter and llama-export-lora: float32 rounding."""


@pytest.fixture(scope="module")
def llama():
    """The folder holding libllama.so and the tools (built once into .venv/cache)."""
    return llama_build()


def run_llama(llama: Path, model: Path, adapter: Path | None = None) -> np.ndarray:
    """llama.cpp's logits on TOKENS (tests/llama_runtime.py, in its own process: an abort in llama.cpp fails the test
    instead of killing the run)."""
    out = model.with_suffix(".adapter.npy" if adapter else ".npy")
    script = Path(__file__).with_name("llama_runtime.py")
    args = [sys.executable, str(script), str(llama_bindings()), str(model), str(out), ",".join(map(str, TOKENS))]
    run = subprocess.run(args + ([str(adapter)] if adapter else []), capture_output=True, text=True, timeout=600,
                         env={**os.environ, "LLAMA_CPP_LIB_PATH": str(llama)})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return np.load(out)


def scaled_gap(a: np.ndarray, b: np.ndarray) -> float:
    """‖a − b‖ / ‖a‖ (Frobenius norms over every position and token)."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.fixture(scope="module")
def lora(source, tmp_path_factory):
    """A LoRA on every linear layer whose ΔW is about the size of W (scale 1/8 on the power-of-two grid), as a
    fine-tune's is (test_gguf.py's scale-2 LoRA dwarfs W: any rounding of W + ΔW then swamps the logits)."""
    return grid_adapter(source, tmp_path_factory.mktemp("lora") / "grid", r=4, lora_alpha=0.5, target_modules=TARGETS)


@pytest.fixture(scope="module")
def adapter(lora, bases, tmp_path_factory):
    """The LoRA as llama.cpp's adapter file, written by `adaptools convert --to gguf`."""
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("adapter") / "adapter.gguf"
    result = run_cli(CliRunner(), "convert", lora, "--to", "gguf", "--base", bases["f32"], "-o", out)
    assert result.exit_code == 0, result.output
    return out


def merged(base: Path, lora: Path, out: Path) -> Path:
    adaptools.merge(base, lora, out=out)
    return out


def test_f32_merge_gives_the_logits_of_the_adapter_at_run_time(llama, bases, lora, adapter, tmp_path):
    at_run_time = run_llama(llama, bases["f32"], adapter)
    ours = run_llama(llama, merged(bases["f32"], lora, tmp_path / "merged.gguf"))
    assert scaled_gap(at_run_time, ours) <= FLOAT_RTOL
    assert scaled_gap(at_run_time, run_llama(llama, bases["f32"])) > 100 * FLOAT_RTOL  # the adapter matters


def test_rslora_and_pattern_adapters_mean_at_run_time_what_peft_means(llama, bases, source, tmp_path, runner):
    """Where convert_lora_to_gguf.py is 0.5x and 7x off, llama.cpp running our adapter file gives the logits of
    PEFT's merge."""
    lora = make_peft_adapter(source, tmp_path / "lora", r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True,
                             alpha_pattern={"v_proj": 32}, rank_pattern={"o_proj": 2})
    result = run_cli(runner, "convert", lora, "--to", "gguf", "--base", bases["f32"], "-o", tmp_path / "a.gguf")
    assert result.exit_code == 0, result.output
    at_run_time = run_llama(llama, bases["f32"], tmp_path / "a.gguf")
    assert scaled_gap(at_run_time, run_llama(llama, merged(bases["f32"], lora, tmp_path / "m.gguf"))) <= FLOAT_RTOL
    assert scaled_gap(at_run_time, run_llama(llama, bases["f32"])) > 100 * FLOAT_RTOL


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_merge_gives_the_logits_of_llama_export_lora(kind, llama, bases, lora, adapter, tmp_path):
    theirs = tmp_path / "export-lora.gguf"
    run = subprocess.run([str(llama / "llama-export-lora"), "-m", str(bases[kind]), "--lora", str(adapter),
                          "-o", str(theirs), "-t", "1"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    ours = merged(bases[kind], lora, tmp_path / "merged.gguf")
    assert scaled_gap(run_llama(llama, theirs), run_llama(llama, ours)) <= FLOAT_RTOL
    want = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(theirs).tensors}
    for tensor in gguf.GGUFReader(ours).tensors:  # ΔW on the power-of-two grid is exact: the same bytes
        assert np.array_equal(np.asarray(tensor.data), want[tensor.name]), tensor.name


@pytest.mark.parametrize("kind, qtype", [("f16", T.F16), ("q8_0", T.Q8_0)])
def test_rounded_merge_is_the_adapter_at_run_time_within_one_rounding(kind, qtype, llama, bases, lora, adapter, ggml,
                                                                       tmp_path):
    at_run_time = run_llama(llama, bases[kind], adapter)
    ours = run_llama(llama, merged(bases[kind], lora, tmp_path / f"merged-{kind}.gguf"))
    f32 = merged(bases["f32"], lora, tmp_path / "merged-f32.gguf")
    rounded = requantized(ggml, f32, tmp_path / f"merged-f32-{kind}.gguf", {"blk.": qtype})
    allowed = 2 * scaled_gap(run_llama(llama, f32), run_llama(llama, rounded))
    assert 0 < scaled_gap(at_run_time, ours) <= allowed
    assert scaled_gap(at_run_time, run_llama(llama, bases[kind])) > 10 * allowed


def test_k_quant_merge_loads_and_runs(llama, bases, lora, adapter, tmp_path):
    """A Q4_K/Q5_K/Q6_K/Q8_0 mix: llama.cpp reads every merged type; the logits lie nearer the run-time adapter's
    than the base's."""
    at_run_time = run_llama(llama, bases["k-mix"], adapter)
    ours = run_llama(llama, merged(bases["k-mix"], lora, tmp_path / "merged-k.gguf"))
    assert np.isfinite(ours).all()
    assert scaled_gap(at_run_time, ours) < 0.5 * scaled_gap(at_run_time, run_llama(llama, bases["k-mix"]))
