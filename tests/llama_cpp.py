"""llama.cpp as a test reference: the llama-cpp-python sdist (its vendored llama.cpp: convert_lora_to_gguf.py,
convert_hf_to_gguf.py, gguf-py, and ggml's sources) fetched once with pip into .venv/cache, ggml's C quantizer
(`libggml-base.so`, built once from those sources, called through ctypes), and, on request (a long build),
llama.cpp itself: `libllama.so` with `llama-export-lora` and `llama-quantize`, and the sdist's Python bindings."""
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
SDIST = CACHE.parent / "{}-{}.tar.gz".format(*LLAMA_CPP_PYTHON.replace("-", "_").split("=="))
SKIPPED = ("models/", "docs/", "media/", "tests/", "benches/", ".github/", ".devops/", "scripts/")
"""Parts of vendor/llama.cpp that neither the converters nor a build of ggml, libllama or the tools read."""
OFFLINE_SIGNS = ("NewConnectionError", "ConnectionError", "Network is unreachable", "Temporary failure in name resolution",
                 "ProxyError", "Read timed out", "No matching distribution found")


def _sdist() -> Path:
    """The sdist's tarball, downloaded once with pip into .venv/cache (skips only when the index is unreachable)."""
    if SDIST.exists():
        return SDIST
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE.parent) as scratch:
        pip = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                              LLAMA_CPP_PYTHON, "-d", scratch], capture_output=True, text=True, timeout=600)
        if pip.returncode != 0:
            if any(sign in pip.stdout + pip.stderr for sign in OFFLINE_SIGNS):
                pytest.skip(f"{LLAMA_CPP_PYTHON} cannot be downloaded: the package index is unreachable")
            raise AssertionError(pip.stdout + pip.stderr)
        (Path(scratch) / SDIST.name).rename(SDIST)  # atomic: a parallel session's copy is the same file
    return SDIST


def _extract(folder: str, keep, target: Path) -> Path:
    """The sdist's members under `folder` (a path inside the package) for which keep(path below it) holds,
    extracted once to `target` (atomically: renamed into place)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch, tarfile.open(_sdist()) as sdist:
        below = [(m, m.name.partition("/")[2]) for m in sdist.getmembers()]  # the path below the package's folder
        members = [m for m, path in below if path.startswith(f"{folder}/") and keep(path[len(folder) + 1:])]
        sdist.extractall(scratch, members=members, filter="data")
        try:
            next(Path(scratch).glob(f"*/{folder}")).rename(target)
        except OSError:  # a parallel session extracted first
            pass
    return target


def llama_cpp_tree() -> Path:
    """The sdist's vendor/llama.cpp (less SKIPPED), fetched once (skips only when the package index is unreachable)."""
    return _extract("vendor/llama.cpp", lambda path: not path.startswith(SKIPPED), CACHE / "source")


def _cmake_build(source: Path, built: Path, options: list[str], targets: list[str], jobs: int) -> Path:
    """cmake SOURCE with OPTIONS, then the TARGETS built (niced, JOBS parallel) into BUILT, once: in a scratch folder
    renamed into place (atomic: a parallel session that built first keeps its copy); skips only when no C/C++
    compiler or cmake is found."""
    if built.exists():
        return built
    if not (shutil.which("cmake") and (shutil.which("cc") or shutil.which("gcc")) and shutil.which("c++")):
        pytest.skip("no C/C++ compiler or cmake to build llama.cpp")
    scratch = Path(tempfile.mkdtemp(dir=CACHE, prefix="build-"))
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []
    for step in (["cmake", "-S", str(source), "-B", str(scratch / "build"), "-DCMAKE_BUILD_TYPE=Release", *options],
                 [*nice, "cmake", "--build", str(scratch / "build"), "--target", *targets, "-j", str(jobs)]):
        run = subprocess.run(step, capture_output=True, text=True, timeout=7200)
        if run.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            raise AssertionError(run.stdout[-2000:] + run.stderr[-2000:])
    try:
        scratch.rename(built)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
    return built


def ggml_library() -> ctypes.CDLL:
    """libggml-base.so built once from the sdist's ggml (GGML_NATIVE=OFF: no FMA, the reference's float order;
    skips only when no C compiler or cmake is found)."""
    built = CACHE / "build-ggml-base"
    if not built.exists():
        source = llama_cpp_tree() / "ggml"
        scratch = Path(tempfile.mkdtemp(dir=CACHE, prefix="project-"))
        # ggml as a subproject (as llama.cpp builds it): standalone it wants ggml.pc.in, which the sdist leaves out
        (scratch / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.14)\nproject(ggml_reference C CXX)\n"
                                                f"add_subdirectory(\"{source.as_posix()}\" ggml)\n")
        try:
            _cmake_build(scratch, built, ["-DGGML_NATIVE=OFF", "-DGGML_OPENMP=OFF"], ["ggml-base"], os.cpu_count() or 1)
        finally:
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


LLAMA_TOOLS = ("llama-export-lora", "llama-quantize")
"""The llama.cpp programs the runtime test and the benchmark run (built with libllama)."""


def llama_build(jobs: int = 2) -> Path:
    """llama.cpp's shared libllama.so (with libggml*.so) and LLAMA_TOOLS, built once (11 minutes on two busy
    cores here; niced) from the sdist's sources into .venv/cache; returns the folder that holds them all (RPATH $ORIGIN,
    so the folder works where it lies). GGML_NATIVE=ON: the tools run as a user's own build would."""
    source = llama_cpp_tree()
    options = ["-DBUILD_SHARED_LIBS=ON", "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON", "-DGGML_NATIVE=ON",
               "-DGGML_OPENMP=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
               "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON"]
    return _cmake_build(source, CACHE / "build-llama", options, ["llama", *LLAMA_TOOLS], jobs) / "build" / "bin"


def llama_bindings() -> Path:
    """The folder holding the sdist's Python bindings (`llama_cpp/`, ctypes over libllama), extracted once."""
    _extract("llama_cpp", lambda path: True, CACHE / "python" / "llama_cpp")
    return CACHE / "python"
