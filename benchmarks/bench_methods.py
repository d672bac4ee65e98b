"""TIES / DARE-TIES / sum / KnOTS: adaptools against PEFT's `add_weighted_adapter` on the same two adapters.

    python benchmarks/bench_methods.py [--device auto|cpu|cuda] [--dim 2048 --layers 3 --rank 16 --density 0.3]

Two rank-r LoRA adapters with random factors on a stack of `--layers` dim x dim Linear layers are made
with PEFT and saved; adaptools loads the saved folders, PEFT merges inside the PeftModel. Times are
wall-clock of the merge call alone (one run each; PEFT's `*_svd` variants run a full dense SVD per layer).
Weights are 1 for both adapters, where PEFT's and mergekit's TIES conventions coincide.

Errors are ‖ΔW − ΔW_def‖_F / ‖ΔW_def‖_F over all layers, with ΔW_def the method's dense definition
computed here from PEFT's own `merge_utils` primitives (and a dense float64 SVD for KnOTS). "floor" is the
Eckart–Young error of the best rank-k approximation of ΔW_def (k = the result's rank): no rank-k
result can do better. DARE masks: ours come from `module_generator(seed, name)`; PEFT's `*_svd` masks
are recorded from its torch.bernoulli calls; PEFT's factor-level `dare_ties` masks live on A and B, so
its row is measured against the definition with an independent mask (as is the "mask noise" row: ours
against the definition with another seed's mask, the spread that mask choice alone causes).
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

import adaptools
from adaptools.combine import combine
from adaptools.device import resolve_device
from adaptools.methods import merge_with_method, module_generator, random_keep
from timing import timed


class Stack(nn.Module):
    """`layers` bias-free dim x dim Linear layers: PEFT's targets `layers.0`, `layers.1`, ..."""

    def __init__(self, layers: int, dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(layers))


def make_adapters(args: argparse.Namespace, folder: Path, device: torch.device):
    """A PeftModel holding adapters "first" and "second" (random factors), both also saved under `folder`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    targets = [f"layers.{i}" for i in range(args.layers)]
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(Stack(args.layers, args.dim), config, adapter_name="first")
    model.add_adapter("second", config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) / args.dim**0.25)
    model.save_pretrained(folder)  # one subfolder per adapter
    return model.to(device), [adaptools.load(folder / name) for name in ("first", "second")], targets


def peft_deltas(model, adapter: str, targets: list[str]) -> list[torch.Tensor]:
    layers = model.base_model.model.layers
    with torch.no_grad():
        return [layers[int(t.split(".")[1])].get_delta_weight(adapter).float() for t in targets]


@contextlib.contextmanager
def recorded_bernoulli() -> Iterator[list[torch.Tensor]]:
    """Record every torch.bernoulli result (PEFT's DARE masks) while inside."""
    original, masks = torch.bernoulli, []

    def record(*a, **k):
        out = original(*a, **k)
        masks.append(out.bool())
        return out

    torch.bernoulli = record
    try:
        yield masks
    finally:
        torch.bernoulli = original


def warm_up(device: torch.device) -> None:
    """Initialise the kernels both tools use (LAPACK/cuSOLVER, sorting, RNG) outside the timings."""
    g = torch.Generator().manual_seed(0)
    tiny = adaptools.Adapter({"x": adaptools.LoraModule(torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g))})
    for method in ("ties", "dare_ties", "knots_ties"):
        merge_with_method([tiny, tiny], None, method, density=0.5, device=device)
    torch.linalg.svd(torch.randn(64, 64, device=device))


def elect(pruned: torch.Tensor) -> torch.Tensor:
    """PEFT's own majority-sign mask ("total") of stacked (T, m, n) tensors."""
    from peft.utils.merge_utils import calculate_majority_sign_mask

    return calculate_majority_sign_mask(pruned, method="total")


def rel_error(results: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    num = sum(float((r.double() - d.double()).norm()) ** 2 for r, d in zip(results, refs))
    return (num / sum(float(d.double().norm()) ** 2 for d in refs)) ** 0.5


def floor(refs: list[torch.Tensor], k: int) -> float:
    """Eckart–Young: the relative error of the best rank-k approximation of each reference."""
    tails = [float(torch.linalg.svdvals(d.float()).double()[k:].square().sum()) for d in refs]
    return (sum(tails) / sum(float(d.double().norm()) ** 2 for d in refs)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from peft.utils.merge_utils import disjoint_merge, ties

    device = resolve_device(args.device)
    d, k = args.density, 2 * args.rank
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}; {args.layers} layers {args.dim}x{args.dim}, "
          f"2 adapters of rank {args.rank}, density {d}, result rank {k}")
    with tempfile.TemporaryDirectory() as tmp:
        model, adapters, targets = make_adapters(args, Path(tmp), device)
    taus = [torch.stack(pair) for pair in zip(peft_deltas(model, "first", targets), peft_deltas(model, "second", targets))]
    ones = torch.ones(2, device=device)
    warm_up(device)
    rows: list[tuple[str, str, float, float, float | None]] = []

    def ours(method: str, **kw) -> tuple[float, list[torch.Tensor]]:
        if method == "sum":
            t, result = timed(lambda: combine(adapters, [1.0, 1.0]), device)
        else:
            t, (result, _) = timed(lambda: merge_with_method(adapters, [1.0, 1.0], method, device=device, **kw), device)
        return t, [(m.scale * m.B.float() @ m.A.float()).to(device) for m in (result[n] for n in targets)]

    def peft(combination: str, name: str, **kw) -> float:
        kw = {"density": d, **kw} if combination != "svd" else kw
        t, _ = timed(lambda: model.add_weighted_adapter(["first", "second"], [1.0, 1.0], name, combination, **kw), device)
        return t

    # sum: ours exact by concatenation; PEFT's svd at the same rank Σ r (its default is max r)
    ref = [tau.sum(0) for tau in taus]
    t, res = ours("sum")
    rows.append(("sum", "adaptools combine (exact)", t, rel_error(res, ref), None))
    t = peft("svd", "svd", svd_rank=k)
    rows.append(("sum", f"PEFT svd (svd_rank={k})", t, rel_error(peft_deltas(model, "svd", targets), ref), floor(ref, k)))

    # TIES (weights 1: PEFT's and mergekit's conventions coincide)
    ref = [ties(list(tau), ones, d) for tau in taus]
    fl = floor(ref, k)
    t, res = ours("ties", density=d)
    rows.append(("ties", "adaptools ties", t, rel_error(res, ref), fl))
    t = peft("ties_svd", "ties_svd", svd_rank=k)
    rows.append(("ties", f"PEFT ties_svd (svd_rank={k})", t, rel_error(peft_deltas(model, "ties_svd", targets), ref), fl))
    t = peft("ties", "ties")
    rows.append(("ties", "PEFT ties (on A and B)", t, rel_error(peft_deltas(model, "ties", targets), ref), floor(ref, args.rank)))

    # DARE-TIES: ours (mergekit: disjoint sum) with our masks; PEFT (disjoint mean) with its recorded masks
    def dare_ref(seed: int, normalise: bool, masks: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        refs = []
        for i, (name, tau) in enumerate(zip(targets, taus)):
            keep = (random_keep(tau.shape, d, module_generator(seed, name)) if masks is None
                    else torch.stack(masks[2 * i:2 * i + 2])).to(device)
            pruned = tau * keep / d
            mask = elect(pruned)
            refs.append(disjoint_merge(pruned, mask) if normalise else (pruned * mask).sum(0))
        return refs

    ref = dare_ref(args.seed, normalise=False)
    t, res = ours("dare_ties", density=d, seed=args.seed)
    rows.append(("dare_ties", "adaptools dare_ties", t, rel_error(res, ref), floor(ref, k)))
    rows.append(("dare_ties", "  mask noise: adaptools vs another seed's mask", 0.0,
                 rel_error(res, dare_ref(args.seed + 1, normalise=False)), None))
    with recorded_bernoulli() as masks:
        t = peft("dare_ties_svd", "dare_ties_svd", svd_rank=k)
    peft_ref = dare_ref(0, normalise=True, masks=masks)
    rows.append(("dare_ties", f"PEFT dare_ties_svd (svd_rank={k})", t,
                 rel_error(peft_deltas(model, "dare_ties_svd", targets), peft_ref), floor(peft_ref, k)))
    t = peft("dare_ties", "dare_ties")
    rows.append(("dare_ties", "PEFT dare_ties (on A and B; independent mask)", t,
                 rel_error(peft_deltas(model, "dare_ties", targets), dare_ref(args.seed + 2, normalise=True)), None))
    del model

    # KnOTS: dense float64 SVD of [ΔW_a ΔW_b], TIES / DARE-TIES on the coefficient blocks S·V_iᵀ
    bases = []
    for tau in taus:
        U, S, Vh = torch.linalg.svd(torch.cat(list(tau), dim=1).double(), full_matrices=False)
        bases.append((U[:, :k], (S[:k, None] * Vh[:k]).unflatten(1, (2, args.dim)).transpose(0, 1)))
    ref = [U @ ties(list(C), ones.double(), d) for U, C in bases]
    t, res = ours("knots_ties", density=d)
    rows.append(("knots_ties", "adaptools knots_ties", t, rel_error(res, ref), None))
    ref = []
    for name, (U, C) in zip(targets, bases):
        pruned = C * random_keep(C.shape, d, module_generator(args.seed, name)).to(device) / d
        ref.append(U @ (pruned * elect(pruned)).sum(0))
    t, res = ours("knots_dare", density=d, seed=args.seed)
    rows.append(("knots_dare", "adaptools knots_dare", t, rel_error(res, ref), None))

    print()
    print("| method | implementation | time | rel. error vs definition | best possible at its rank |")
    print("|---|---|---|---|---|")
    for method, tool, t, err, fl in rows:
        time_text = "" if t == 0 else f"{t:.2f} s"
        print(f"| {method} | {tool} | {time_text} | {err:.2e} | {'' if fl is None else f'{fl:.3f}'} |")


if __name__ == "__main__":
    main()
