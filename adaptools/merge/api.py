"""The public `merge` call: LoRA/DoRA adapters into a base checkpoint folder (DESIGN §8), validated and planned
before anything is written, then one streaming pass over the base."""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..atomic import check_output
from ..adapter import check_weights
from ..device import resolve_device, torch_threads
from ..errors import InvalidArgumentError
from ..checkpoints import Container
from ..checkpoints.shards import parse_size
from ..sources import open_base
from .execute import write_outputs
from .plan import AdapterLike, base_mismatch, fit_adapters, load_adapters, output_names, plan_output
from .report import MergeReport, survival_warnings


def merge(base: str | os.PathLike | Container, adapters: AdapterLike | Iterable[AdapterLike],
          weights: Sequence[float] | None = None, *, out: str | os.PathLike, dtype: str | torch.dtype | None = None,
          double_quant: bool | None = None, fp8_scheme: str | None = None, fp8_format: str | None = None,
          gguf_type: str | None = None, device: str | torch.device = "auto", overwrite: bool = False, each: bool = False,
          max_shard_size: str | int | None = None, allow_pickle: bool = False, batch_bytes: int | None = None,
          progress: bool = False, hash_inputs: bool = False) -> MergeReport:
    """Merge adapters into a base checkpoint folder, streaming shard by shard: W' = W + Σ_i w_i·s_i·B_i@A_i.

    Args:
        base: a Hugging Face folder (model.safetensors, or shards + index) of fp16/bf16/fp32 weights, a
            bitsandbytes NF4 checkpoint or an FP8 one (fine-grained / compressed-tensors): quantized weights are
            dequantized, merged in float32 and requantized in the base's own scheme; a single-file diffusion
            checkpoint or a diffusers pipeline folder; or a GGUF file (each merged tensor decoded and re-encoded in
            its own ggml type). For single files and GGUF, `out` is a file.
        adapters: PEFT folders, kohya files or Adapter objects (LoRA, rsLoRA, DoRA; linear, Conv1D, embedding, conv).
        weights: one factor per adapter (default 1): w·s·B@A for LoRA, V = W + w·s·B@A for DoRA (magnitudes
            kept); a full tensor T (modules_to_save) becomes W + w·(T − W).
        out: the output folder; with `each`, a folder holding one `<adapter name>/` per adapter.
        dtype: "fp16", "bf16" or "fp32" for every floating tensor (an NF4/FP8 base is then written dequantized);
            "nf4" or "fp8" quantizes the merged linear weights (adaptools.quantize's defaults; an NF4/FP8 base
            stays as it is with each weight's own settings); default: keep each tensor's dtype (and a quantized
            base's quantization).
        double_quant: for NF4 outputs of an unquantized base, quantize the block scales too (default True);
            with an NF4 base it must agree with the base's own setting.
        fp8_scheme, fp8_format: for FP8 outputs of another base, "block" (128x128, default), "channel" or
            "tensor" scales, written as "compressed-tensors" (default) or "fine-grained" (block only).
        gguf_type: for a GGUF base, the ggml type (q8_0, q6_k, f16, ...) merged tensors stored in types adaptools
            cannot encode (IQ*, ...) are written in; every other tensor keeps its type.
        device: where the merge math runs ("auto": CUDA when available); the math is float32.
        overwrite: replace an existing output.
        each: one merged model per adapter from a single read of the base, instead of one with all adapters.
        max_shard_size: re-shard the output ("5GB", "200MB"); default: the base's own shard files.
        allow_pickle: allow .bin adapters (torch.load with weights_only=True).
        batch_bytes: float32 bytes of base weights merged per step (default 32 MiB on CPU, 256 MiB on CUDA).
        progress: show a tqdm bar (bytes of the base) on stderr.
        hash_inputs: take the sha256 of every base shard and side file during the merge (one worker hashes each
            shard while the others merge) and publish it (adaptools.digests), so that a recipe written afterwards
            does not read the base again.

    Raises UnknownModuleError / ShapeMismatchError before writing anything when the adapters do not fit the base,
    NonFiniteError (nothing left behind) when a merged tensor holds NaN/Inf or overflows the output dtype.
    A base other than the adapter's `base_model_name_or_path` gives a warning, and so does a quantized base whose
    requantization erases most of some modules' updates (MergeReport.survival).
    """
    target = check_output(out, overwrite)
    return merge_outputs(base, [(adapters, weights)], target, each=each, dtype=dtype, device=device,
                         overwrite=overwrite, max_shard_size=max_shard_size, allow_pickle=allow_pickle,
                         batch_bytes=batch_bytes, progress=progress, hash_inputs=hash_inputs,
                         double_quant=double_quant, fp8_scheme=fp8_scheme, fp8_format=fp8_format,
                         gguf_type=gguf_type)


def merge_many(base: str | os.PathLike | Container,
               outputs: Sequence[tuple[AdapterLike | Iterable[AdapterLike], Sequence[float] | None, str | os.PathLike]],
               *, dtype: str | torch.dtype | None = None, double_quant: bool | None = None,
               fp8_scheme: str | None = None, fp8_format: str | None = None, gguf_type: str | None = None,
               device: str | torch.device = "auto", overwrite: bool = False, max_shard_size: str | int | None = None,
               allow_pickle: bool = False, batch_bytes: int | None = None, progress: bool = False,
               hash_inputs: bool = False) -> MergeReport:
    """Several merges into one base from one read of it: output i is W + Σ_j w_ij·ΔW_ij, written to its own path
    exactly as `merge(base, adapters_i, weights_i, out=out_i)` writes it (`outputs`: (adapters, weights, out)
    triples; report names: the output paths). The other arguments are merge's."""
    targets = [check_output(out, overwrite).absolute() for _, _, out in outputs]
    if len(set(targets)) < len(targets):
        raise InvalidArgumentError("the same path is given for two outputs")
    return merge_outputs(base, [(a, w) for a, w, _ in outputs], targets, each=False, dtype=dtype,
                         device=device, overwrite=overwrite, max_shard_size=max_shard_size,
                         allow_pickle=allow_pickle, batch_bytes=batch_bytes, progress=progress,
                         hash_inputs=hash_inputs, double_quant=double_quant, fp8_scheme=fp8_scheme,
                         fp8_format=fp8_format, gguf_type=gguf_type)


def merge_outputs(base: str | os.PathLike | Container,
                  jobs: Sequence[tuple[AdapterLike | Iterable[AdapterLike], Sequence[float] | None]],
                  target: Path | Sequence[Path], *, each: bool, dtype: str | torch.dtype | None,
                  device: str | torch.device, overwrite: bool, max_shard_size: str | int | None, allow_pickle: bool,
                  batch_bytes: int | None, progress: bool, hash_inputs: bool,
                  **codec_options: object) -> MergeReport:
    """The merges `jobs` ((adapters, weights) each) from one read of the base: into `target` (one job; with
    `each`, one subfolder per adapter) or into target[i] for job i; `codec_options` (double_quant, fp8_scheme,
    fp8_format, gguf_type; those given, not None) go to the codecs."""
    start = time.perf_counter()
    device = resolve_device(device)
    shard_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    ckpt = open_base(base, "model")
    config = ckpt.config
    decoder, encoder = ckpt.codecs(dtype, device=device, **{k: v for k, v in codec_options.items() if v is not None})
    specs = decoder.specs(ckpt)
    plans = []
    names = [target.name] if isinstance(target, Path) else [str(t) for t in target]
    # adapters are many small tensors: torch's parallel ops cost more than they save on them (2-10x on 2 busy cores)
    with torch_threads(1 if device.type == "cpu" else None):
        for name, (adapters, weights) in zip(names, jobs):
            loaded = load_adapters(adapters, ckpt, allow_pickle)
            factors = check_weights(loaded, weights)
            fitted = fit_adapters(loaded, specs, config.get("model_type"), ckpt.names)
            for message in filter(None, (base_mismatch(a, ckpt, config) for a in loaded)):
                warnings.warn(message, stacklevel=3)
            if each:
                plans += [plan_output(n, [a], [w], device, specs)
                          for n, a, w in zip(output_names(loaded), fitted, factors)]
            else:
                plans.append(plan_output(name, fitted, factors, device, specs))
            del loaded, fitted  # the plans hold the factors they need (float32, scale folded in)
    report = write_outputs(ckpt, specs, plans, decoder, encoder, target, each=each, device=device,
                           overwrite=overwrite, shard_bytes=shard_bytes, batch_bytes=batch_bytes, progress=progress,
                           hash_inputs=hash_inputs)
    report.seconds = time.perf_counter() - start
    for message in survival_warnings(report):
        warnings.warn(message, stacklevel=3)
    return report
