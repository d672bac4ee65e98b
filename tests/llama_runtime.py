"""Logits from llama.cpp itself: MODEL (with ADAPTER applied at run time when given) run on TOKENS, one token per
decode call (the KV cache in F32, no flash attention: nothing rounds below the weights' own type), written to OUT as a
float32 array (tokens × vocabulary). Run as a script, in its own process, by tests/test_gguf_runtime.py:

    LLAMA_CPP_LIB_PATH=LIBDIR python tests/llama_runtime.py BINDINGS MODEL OUT TOKENS [ADAPTER]

BINDINGS: the folder holding the llama-cpp-python sdist's `llama_cpp` package (its ctypes declarations of llama.h),
LIBDIR: the folder holding libllama.so (tests/llama_cpp.py's llama_bindings() and llama_build()); TOKENS: comma-
separated token ids. Only the bindings' low-level module is imported (the package's __init__ also loads its
high-level API, whose cache needs diskcache)."""
from __future__ import annotations

import ctypes
import sys
import types

import numpy as np

GGML_TYPE_F32 = 0
LLAMA_FLASH_ATTN_TYPE_DISABLED = 0


def logits(bindings: str, model_path: str, tokens: list[int], adapter: str | None = None) -> np.ndarray:
    """llama.cpp's logits at each position of TOKENS (adapter at scale 1: llama.cpp applies alpha/rank itself)."""
    package = types.ModuleType("llama_cpp")  # the package without its __init__ (see the module's docstring)
    package.__path__ = [f"{bindings}/llama_cpp"]
    sys.modules["llama_cpp"] = package
    import llama_cpp.llama_cpp as llama

    llama.llama_backend_init()
    model = llama.llama_model_load_from_file(model_path.encode(), llama.llama_model_default_params())
    assert model, f"llama.cpp cannot load {model_path}"
    params = llama.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_threads, params.n_threads_batch = 64, 64, 1, 1
    params.type_k = params.type_v = GGML_TYPE_F32
    params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED
    context = llama.llama_init_from_model(model, params)
    assert context, "llama.cpp cannot make a context"
    if adapter is not None:
        lora = llama.llama_adapter_lora_init(model, adapter.encode())
        assert lora, f"llama.cpp cannot load the adapter {adapter}"
        loras = (llama.llama_adapter_lora_p_ctypes * 1)(lora)
        assert llama.llama_set_adapters_lora(context, loras, 1, (ctypes.c_float * 1)(1.0)) == 0
    vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
    rows = []
    for token in tokens:
        one = (llama.llama_token * 1)(token)
        assert llama.llama_decode(context, llama.llama_batch_get_one(one, 1)) == 0
        rows.append(np.ctypeslib.as_array(llama.llama_get_logits_ith(context, -1), shape=(vocab,)).copy())
    return np.stack(rows)


if __name__ == "__main__":
    bindings, model_path, out, tokens = sys.argv[1:5]
    np.save(out, logits(bindings, model_path, [int(t) for t in tokens.split(",")], *sys.argv[5:6]))
