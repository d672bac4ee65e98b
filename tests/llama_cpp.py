"""llama.cpp as a test reference: the llama-cpp-python sdist (its vendored llama.cpp: convert_lora_to_gguf.py,
convert_hf_to_gguf.py, gguf-py, and ggml's sources) fetched once with pip into .venv/cache, and ggml's C quantizer
(`libggml-base.so`, built once from those sources, called through ctypes)."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
"""The sdist that vendors llama.cpp (its converters, their conversion/ package, gguf-py and ggml)."""
CACHE = ROOT / ".venv" / "cache" / LLAMA_CPP_PYTHON.replace("==", "-")
WANTED = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/", "ggml/")
OFFLINE_SIGNS = ("NewConnectionError", "ConnectionError", "Network is unreachable", "Temporary failure in name resolution",
                 "ProxyError", "Read timed out", "No matching distribution found")


def llama_cpp_tree() -> Path:
    """The sdist's vendor/llama.cpp (only WANTED), fetched once (skips only when the package index is unreachable)."""
    if all((CACHE / name.rstrip("/")).exists() for name in WANTED):
        return CACHE
    with tempfile.TemporaryDirectory(dir=CACHE.parent if CACHE.parent.exists() else None) as scratch:
        download = Path(scratch)
        pip = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                              LLAMA_CPP_PYTHON, "-d", str(download)], capture_output=True, text=True, timeout=600)
        if pip.returncode != 0:
            if any(sign in pip.stdout + pip.stderr for sign in OFFLINE_SIGNS):
                pytest.skip(f"{LLAMA_CPP_PYTHON} cannot be downloaded: the package index is unreachable")
            raise AssertionError(pip.stdout + pip.stderr)
        staging = download / "vendor"
        with tarfile.open(next(download.glob("*.tar.gz"))) as sdist:
            members = [m for m in sdist.getmembers()
                       if "/vendor/llama.cpp/" in m.name and m.name.split("/vendor/llama.cpp/", 1)[1].startswith(WANTED)]
            sdist.extractall(staging, members=members, filter="data")
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(CACHE, ignore_errors=True)
        next(staging.glob("*/vendor/llama.cpp")).rename(CACHE)
    return CACHE


def ggml_library() -> ctypes.CDLL:
    """libggml-base.so built once from the sdist's ggml (GGML_NATIVE=OFF: no FMA, the reference's float order;
    skips only when no C compiler or cmake is found)."""
    built = CACHE / "build-ggml-base"
    found = sorted(built.glob("**/libggml-base.so"))
    if not found:
        if not (shutil.which("cmake") and (shutil.which("cc") or shutil.which("gcc")) and shutil.which("c++")):
            pytest.skip("no C/C++ compiler or cmake to build llama.cpp's reference quantizer")
        source = llama_cpp_tree() / "ggml"
        scratch = Path(tempfile.mkdtemp(dir=CACHE, prefix="build-"))
        # ggml as a subproject (as llama.cpp builds it): standalone it wants ggml.pc.in, which the sdist leaves out
        (scratch / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.14)\nproject(ggml_reference C CXX)\n"
                                                f"add_subdirectory(\"{source.as_posix()}\" ggml)\n")
        options = ["-DGGML_NATIVE=OFF", "-DGGML_OPENMP=OFF", "-DCMAKE_BUILD_TYPE=Release"]
        for step in (["cmake", "-S", str(scratch), "-B", str(scratch / "build"), *options],
                     ["cmake", "--build", str(scratch / "build"), "--target", "ggml-base", "-j", str(os.cpu_count() or 1)]):
            run = subprocess.run(step, capture_output=True, text=True, timeout=1200)
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        try:
            scratch.rename(built)  # atomic: a parallel session that built first keeps its copy
        except OSError:
            shutil.rmtree(scratch, ignore_errors=True)
        found = sorted(built.glob("**/libggml-base.so"))
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def reference_quantize(lib: ctypes.CDLL, values: np.ndarray, qtype) -> np.ndarray:
    """ggml_quantize_chunk(type, values, out, 0, rows, columns, NULL): llama.cpp's encoding without an imatrix."""
    import gguf

    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, values.shape[-1])
    rows, columns = values.shape
    elements, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, columns // elements * size), dtype=np.uint8)
    lib.ggml_quantize_chunk(int(qtype), values.ctypes.data, out.ctypes.data, 0, rows, columns, None)
    return out
