"""llama.cpp itself runs what adaptools writes (opt-in: ADAPTOOLS_LLAMA_RUNTIME=1; builds libllama and the tools
once, about 16 minutes on two cores): a merged GGUF file gives the logits of its base with the adapter (written by
`adaptools convert --to gguf`) applied at run time by llama.cpp, and those of `llama-export-lora`'s merge.

Tolerances. F32 and F16 merges hold W + ΔW rounded once in the base's type, as llama-export-lora's do: their logits
agree to float32 rounding (1e-4 of the logits' scale). A Q8_0 merge rounds W + ΔW to Q8_0 once more, where the run-time
adapter adds ΔW in float32: its logits may move by what one Q8_0 rounding of the merged weights moves them, measured
on the same model as the F32 merge against that merge re-encoded in Q8_0 by ggml's C quantizer; twice that is allowed
(two independent roundings of that size), and the adapter must move the logits far more than that."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from gguf import GGMLQuantizationType as T
from gguf_factories import requantized
from llama_cpp import llama_bindings, llama_build
from test_gguf import bases, ggml, lora, source  # noqa: F401 (fixtures)

import adaptools

pytestmark = pytest.mark.skipif(os.environ.get("ADAPTOOLS_LLAMA_RUNTIME") != "1",
                                reason="llama.cpp runtime check: opt-in (ADAPTOOLS_LLAMA_RUNTIME=1; builds libllama)")
TOKENS = [1, 70, 150, 33, 200, 7, 99, 250, 3, 128]
FLOAT_RTOL = 1e-4
"""F32/F16 merges against the run-time adapter and llama-export-lora: float32 rounding, relative to max |logit|."""


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
    """max |a - b| relative to max |a|."""
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.fixture(scope="module")
def adapter(lora, bases, tmp_path_factory, runner):
    """The LoRA as llama.cpp's adapter file, written by `adaptools convert --to gguf`."""
    out = tmp_path_factory.mktemp("adapter") / "adapter.gguf"
    result = run_cli(runner, "convert", lora, "--to", "gguf", "--base", bases["f32"], "-o", out)
    assert result.exit_code == 0, result.output
    return out


def merged(base: Path, lora: Path, out: Path) -> Path:
    adaptools.merge(base, lora, out=out)
    return out


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_float_merge_gives_the_logits_of_the_adapter_at_run_time(kind, llama, bases, lora, adapter, tmp_path):
    at_run_time = run_llama(llama, bases[kind], adapter)
    ours = run_llama(llama, merged(bases[kind], lora, tmp_path / "merged.gguf"))
    assert scaled_gap(at_run_time, ours) <= FLOAT_RTOL
    assert scaled_gap(at_run_time, run_llama(llama, bases[kind])) > 100 * FLOAT_RTOL  # the adapter matters


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_merge_gives_the_logits_of_llama_export_lora(kind, llama, bases, lora, adapter, tmp_path):
    theirs = tmp_path / "export-lora.gguf"
    run = subprocess.run([str(llama / "llama-export-lora"), "-m", str(bases[kind]), "--lora", str(adapter),
                          "-o", str(theirs), "-t", "1"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    ours = merged(bases[kind], lora, tmp_path / "merged.gguf")
    assert scaled_gap(run_llama(llama, theirs), run_llama(llama, ours)) <= FLOAT_RTOL


def test_q8_0_merge_is_the_adapter_at_run_time_within_one_requantization(llama, bases, lora, adapter, ggml, tmp_path):
    at_run_time = run_llama(llama, bases["q8_0"], adapter)
    ours = run_llama(llama, merged(bases["q8_0"], lora, tmp_path / "merged-q8_0.gguf"))
    f32 = merged(bases["f32"], lora, tmp_path / "merged-f32.gguf")
    f32_logits = run_llama(llama, f32)
    rounded = requantized(ggml, f32, tmp_path / "merged-f32-q8_0.gguf", {"blk.": T.Q8_0})
    one_rounding = scaled_gap(f32_logits, run_llama(llama, rounded))
    assert 0 < scaled_gap(at_run_time, ours) <= 2 * one_rounding
    assert scaled_gap(at_run_time, run_llama(llama, bases["q8_0"])) > 10 * one_rounding


def test_k_quant_merge_loads_and_runs(llama, bases, lora, adapter, tmp_path):
    """A Q4_K/Q5_K/Q6_K/Q8_0 mix: llama.cpp reads every merged type; the logits lie nearer the run-time adapter's
    than the base's."""
    at_run_time = run_llama(llama, bases["k-mix"], adapter)
    ours = run_llama(llama, merged(bases["k-mix"], lora, tmp_path / "merged-k.gguf"))
    assert np.isfinite(ours).all()
    assert scaled_gap(at_run_time, ours) < 0.5 * scaled_gap(at_run_time, run_llama(llama, bases["k-mix"]))
