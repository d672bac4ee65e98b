"""Combine two Llama-2-7B-shaped LoRAs (0.6·a − 0.3·b) and re-rank to 16, against PEFT's add_weighted_adapter("svd").

    python benchmarks/bench_combine.py [--layers 32] [--device auto|cpu|cuda] [--rank 16] [--no-peft]

Two random adapters with Llama-2-7B shapes (per layer q,k,v,o 4096x4096, gate,up 11008x4096,
down 4096x11008; r=16, fp32; scales 2 and 1) are combined by `adaptools.combine(..., policy="rank=16")`
(exact concatenation, then a factored SVD per batch of same-shape modules). Peak memory is the
process's resident set, sampled while the call runs (psutil when installed, else ru_maxrss).

PEFT is timed on one layer of each shape: a small torch module per shape holding one nn.Linear, with
real PEFT LoRA layers whose lora_A/lora_B are set to the same tensors as layer 0 of our inputs;
`add_weighted_adapter(combination_type="svd", svd_rank=16)` is timed on it and the per-shape times are
scaled up to the whole model (4·L + 2·L + L layers). Its ΔW is compared with the exact combination.
"""
from __future__ import annotations

import argparse
import resource
import sys
import threading
from contextlib import contextmanager

import torch

import adaptools
from adaptools import Adapter, LoraModule
from adaptools.device import resolve_device
from timing import timed

HIDDEN, INTERMEDIATE = 4096, 11008
SHAPES = {  # module -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN), "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
WEIGHTS = (0.6, -0.3)
SCALES = (2.0, 1.0)  # lora_alpha 32 and 16 at r = 16


def make_adapter(layers: int, r: int, scale: float, seed: int) -> Adapter:
    """Random factors (A ~ N(0, 1/in), B ~ N(0, 1/r)), written in place so no transient copies inflate the peak."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i in range(layers):
        for name, (out, inp) in SHAPES.items():
            A = torch.empty(r, inp).normal_(0, inp ** -0.5, generator=g)
            B = torch.empty(out, r).normal_(0, r ** -0.5, generator=g)
            modules[f"model.layers.{i}.{name}"] = LoraModule(A=A, B=B, scale=scale)
    return Adapter(modules, base_model="meta-llama/Llama-2-7b-hf")


def rss_mib() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


@contextmanager
def peak_rss():
    """Yields a dict that gets 'before' and 'peak' resident set sizes (MiB) of this process around the block."""
    result = {"before": rss_mib(), "method": "psutil sampling every 5 ms"}
    if result["before"] is None:  # no psutil: the lifetime maximum, which the block must exceed to be seen
        result["before"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["method"] = "ru_maxrss (lifetime peak)"
        yield result
        result["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return
    stop = threading.Event()
    peak = [result["before"]]

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], rss_mib())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak"] = max(peak[0], rss_mib())


def peft_one_layer(a: LoraModule, b: LoraModule, rank: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Time PEFT's add_weighted_adapter("svd") on a module holding one Linear of this shape with our factors."""
    from peft import LoraConfig, get_peft_model

    class OneLayer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(a.in_features, a.out_features, bias=False)

    r = a.rank
    config = LoraConfig(r=r, lora_alpha=SCALES[0] * r, target_modules=["proj"])
    model = get_peft_model(OneLayer(), config, adapter_name="first")  # names must not be substrings of "lora_"
    model.add_adapter("second", LoraConfig(r=r, lora_alpha=SCALES[1] * r, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        for name, m in (("first", a), ("second", b)):
            layer.lora_A[name].weight.copy_(m.A)
            layer.lora_B[name].weight.copy_(m.B)
    model.to(device)
    seconds, _ = timed(lambda: model.add_weighted_adapter(["first", "second"], list(WEIGHTS), "svd",
                                                           combination_type="svd", svd_rank=rank), device)
    with torch.no_grad():
        delta = layer.get_delta_weight("svd").float().cpu()
    return seconds, delta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--rank", type=int, default=16, help="rank of the inputs and of the result")
    parser.add_argument("--no-peft", action="store_true", help="skip the (slow) PEFT reference")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()} "
          "(the machine is shared with other work: timings are noisy)")

    a = make_adapter(args.layers, args.rank, SCALES[0], seed=1)
    b = make_adapter(args.layers, args.rank, SCALES[1], seed=2)
    input_mib = sum(t.numel() * t.element_size() for ad in (a, b) for _, m in ad.items() for t in (m.A, m.B)) / 2**20
    print(f"inputs: 2 adapters x {len(a)} modules ({args.layers} layers x 7), r={args.rank}, fp32, "
          f"{input_mib:.0f} MiB together")

    adaptools.combine([a.with_modules(dict(list(a.items())[:1])), b.with_modules(dict(list(b.items())[:1]))],
                      list(WEIGHTS), policy=f"rank={args.rank}", device=device)  # warm-up (library initialisation)
    with peak_rss() as mem:
        seconds, (result, report) = timed(lambda: adaptools.combine([a, b], list(WEIGHTS), policy=f"rank={args.rank}",
                                                                    device=device), device)
    extra = mem["peak"] - mem["before"]
    errors = [m.rel_error for m in report.modules.values()]
    print(f"adaptools combine + rerank to {args.rank}: {seconds:.2f} s for {len(report.modules)} modules "
          f"(rank {2 * args.rank} -> {args.rank}; relative error mean {sum(errors) / len(errors):.4f}, "
          f"worst {max(errors):.4f}, the Eckart-Young optimum by construction)")
    print(f"peak memory ({mem['method']}): {mem['peak']:.0f} MiB resident, {extra:.0f} MiB above the "
          f"{mem['before']:.0f} MiB before the call (inputs held) = {extra / input_mib:.2f}x the inputs' "
          f"{input_mib:.0f} MiB (the output alone is {input_mib / 2:.0f} MiB)")
    if args.no_peft:
        return

    print("PEFT add_weighted_adapter(combination_type='svd', svd_rank=%d), defaults otherwise (full_matrices=True): "
          "timed on one layer of each shape (a small torch module per shape with one nn.Linear and real PEFT LoRA "
          "layers set to the same tensors as our layer 0), scaled up to the whole model" % args.rank)
    per_shape: dict[tuple[int, int], float] = {}
    rows = []
    for name in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):
        path = f"model.layers.0.{name}"
        t_peft, delta_peft = peft_one_layer(a[path], b[path], args.rank, device)
        exact = WEIGHTS[0] * a.delta(path) + WEIGHTS[1] * b.delta(path)
        norm = exact.double().norm()
        err_peft = float((delta_peft.double() - exact.double()).norm() / norm)
        err_ours = float((result.delta(path).double() - exact.double()).norm() / norm)
        per_shape[SHAPES[name]] = t_peft
        rows.append((name, SHAPES[name], t_peft, err_peft, err_ours, report.modules[path].rel_error))
        del exact, delta_peft
    for name, shape, t_peft, err_peft, err_ours, optimum in rows:
        print(f"  {name:18s} {shape[0]}x{shape[1]}: PEFT {t_peft:7.2f} s, rel. error vs exact: PEFT {err_peft:.4f}, "
              f"ours {err_ours:.4f} (optimum {optimum:.4f})")
    total_peft = args.layers * sum(per_shape[shape] for shape in SHAPES.values())
    print(f"PEFT extrapolated to {len(a)} modules: {total_peft:.0f} s ({total_peft / 60:.1f} min)")
    print(f"ratio PEFT / adaptools: {total_peft / seconds:.0f}x")


if __name__ == "__main__":
    sys.exit(main())
