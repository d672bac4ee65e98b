"""Rank-spectrum diagnostics: per-module singular values and rank metrics from the factored SVD, sizes relative to
a base, NF4 survival, and subspace overlap / cosine between adapters, as JSON-ready dicts (docs/spectrum.md).

ΔW = scale·B@A is never formed densely, except for the NF4 survival estimate of one module at a time.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import torch
from torch import Tensor

from .adapter import Adapter, LoraModule
from .device import resolve_device
from .errors import BaseMismatchError, InvalidArgumentError, ShapeMismatchError, UnknownModuleError
from .checkpoints import Container
from .checkpoints.stored import StoredDecoder
from .checkpoints.nf4_quant import (
    NF4State,
    dequantize_nf4,
    is_nf4_weight,
    nf4_from_state_dict,
    nf4_state_keys,
    nf4_survival,
)
from .linalg import SVD, RankPolicy, choose_ranks, factored_svd, group_by, map_by_shape, randomized_svd
from .checkpoints.names import target_rows
from .sources import load, open_base

__all__ = [
    "SCHEMA",
    "ENERGY_LEVELS",
    "SUGGESTED_ENERGY",
    "ModuleGrid",
    "parse_module_path",
    "spectral_metrics",
    "subspace_overlap",
    "factored_inner",
    "spectrum",
    "compare_spectra",
    "module_grid",
    "energy_key",
    "interference_reading",
]

SCHEMA = "adaptools.spectrum/1"
ENERGY_LEVELS = (0.9, 0.99)
"""Energies τ whose ranks are reported per module (RankPolicy("energy", τ), the rule `rerank --energy` uses)."""
SUGGESTED_ENERGY = 0.99
POWER_ITERATIONS = 8
"""Subspace-iteration steps for σ₁(W) of base weights (`randomized_svd` with k=1 and its default oversampling)."""
BASE_BATCH_BYTES = 1 << 28
"""Most bytes of stacked fp32 base weights per batched call (bounds memory for large models)."""
COSINE_ORTHOGONAL = 0.1
"""|cosine| below this reads as orthogonal updates in `interference_reading`."""
OTHER_COLUMN = "other"
"""Grid column of modules whose path has no layer index."""

_LAYER = re.compile(r"^(?P<block>(?:[^.]+\.)*?(?P<layer>\d+))\.(?P<type>.+)$")

AdapterLike = Adapter | str | os.PathLike
BaseLike = Container | str | os.PathLike


def parse_module_path(path: str) -> tuple[str | None, int | None, str]:
    """(block, layer, module_type) from the first numeric path component: `model.layers.3.self_attn.q_proj` →
    ("model.layers.3", 3, "self_attn.q_proj"); a path without one → (None, None, path)."""
    match = _LAYER.match(path)
    if match is None:
        return None, None, path
    return match["block"], int(match["layer"]), match["type"]


def energy_key(tau: float) -> str:
    """JSON key of the rank needed for energy τ: 0.9 → "energy_rank_90", 0.99 → "energy_rank_99"."""
    return f"energy_rank_{round(tau * 100):d}"


# --------------------------------------------------------------------------- per-module metrics


def spectral_metrics(S: Tensor, shape: tuple[int, int]) -> dict[str, Tensor]:
    """Metrics of the (..., k) descending spectra of (m, n) matrices, each a (...) tensor.

    effective_rank = exp(−Σ p_i log p_i) with p_i = s_i / Σ_j s_j (Roy & Vetterli 2007; 0 for ΔW = 0);
    stable_rank = Σ s_i² / s_0² = ‖ΔW‖²_F / ‖ΔW‖²₂ (0 for ΔW = 0); energy_rank_T = the smallest k with
    Σ_{i<k} s_i² >= τ·Σ s_i² (`RankPolicy("energy", τ)`, at least 1); numerical_rank = #{s_i > max(m, n)·ε·s_0}
    with ε the float32 machine epsilon (the default tolerance of `torch.linalg.matrix_rank` for float32).
    """
    s = S.double()
    total = s.sum(-1)
    nonzero = total > 0
    p = s / torch.where(nonzero, total, torch.ones_like(total)).unsqueeze(-1)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    frobenius_sq = s.square().sum(-1)
    top = s[..., 0]
    tolerance = max(shape) * torch.finfo(torch.float32).eps * top
    metrics = {
        "frobenius_norm": frobenius_sq.sqrt(),
        "spectral_norm": top,
        "effective_rank": torch.where(nonzero, entropy.exp(), torch.zeros_like(total)),
        "stable_rank": torch.where(nonzero, frobenius_sq / torch.where(nonzero, top, 1.0).square(), 0.0),
        "numerical_rank": (s > tolerance.unsqueeze(-1)).sum(-1),
    }
    for tau in ENERGY_LEVELS:
        metrics[energy_key(tau)] = choose_ranks(S, RankPolicy("energy", tau))
    return metrics


def _scaled_B(module: LoraModule) -> Tensor:
    """scale·B in at least float32 (folding the scale into a bf16 B would round it)."""
    return module.B.to(torch.promote_types(module.B.dtype, torch.float32)) * module.scale


def _factored_svds(adapter: Adapter, device: str | torch.device) -> dict[str, SVD]:
    """Exact SVD of every module's canonical ΔW = (scale·B) @ A, one batched call per shape group, float32."""
    items = {name: (_scaled_B(m), m.A) for name, m in adapter.items()}
    return map_by_shape(items, lambda B, A: factored_svd(B, A, device=device, dtype=torch.float32))


def _module_records(adapter: Adapter, svds: Mapping[str, SVD]) -> dict[str, dict]:
    """JSON record per module: identity, shape, singular values and `spectral_metrics` (base fields None)."""
    records: dict[str, dict] = {}
    for key, names in group_by({n: (adapter[n].out_features, adapter[n].in_features, svds[n].S.shape[-1])
                                for n in adapter.modules}).items():
        S = torch.stack([svds[n].S for n in names])
        metrics = {k: v.tolist() for k, v in spectral_metrics(S, key[:2]).items()}
        for i, name in enumerate(names):
            module = adapter[name]
            block, layer, module_type = parse_module_path(name)
            records[name] = {
                "layer": layer,
                "block": block,
                "module_type": module_type,
                "kind": module.kind,
                "dora": module.is_dora,
                "shape": [module.out_features, module.in_features],
                "rank": module.rank,
                "params": module.num_params,
                "singular_values": S[i].tolist(),
                **{k: v[i] for k, v in metrics.items()},
                "base_frobenius_norm": None,
                "base_spectral_norm": None,
                "relative_norm": None,
                "relative_spectral_norm": None,
                "nf4_survival": None,
            }
    return {name: records[name] for name in adapter.modules}


# --------------------------------------------------------------------------- base-relative metrics


def _load_base_weight(base: Container, decoder: StoredDecoder, name: str,
                      module: LoraModule) -> tuple[Tensor, Tensor, NF4State | None]:
    """(canonical fp32 W (out, in), W in its stored layout and dtype, NF4 state or None) of module `name`, found
    through the base's name map (a fused weight's row block, rows in the module's order); other quantized weights
    (FP8) decoded by the base's decoder."""
    target = base.names.target(name)
    if target is None:
        raise UnknownModuleError(f"module {name!r} is not in the base ({name + '.weight'!r} missing)")
    key = target.key
    state = None
    if is_nf4_weight(key, base.weight_map):
        tensors = {k: base.get(k) for k in (key, *nf4_state_keys(key)) if k in base}
        packed, state = nf4_from_state_dict(key, tensors)
        stored = dequantize_nf4(packed, state)
    else:
        stored = decoder.read(base, key) if decoder.specs(base)[key].encoded else base.get(key)
    stored = target_rows(stored, target)
    if tuple(stored.shape) != tuple(module.weight_shape):
        raise BaseMismatchError(
            f"module {name!r}: base weight has shape {tuple(stored.shape)}, the adapter expects {module.weight_shape}")
    return module.from_base_layout(stored.float()), stored, state


def _base_metrics(adapter: Adapter, records: dict[str, dict], base: Container, device: torch.device) -> None:
    """Fill the base fields of `records`: ‖W‖_F, σ₁(W) (randomized subspace iteration), ‖ΔW‖_F/‖W‖_F,
    σ₁(ΔW)/σ₁(W) and, for NF4 weights, `nf4_survival` (dense ΔW of that one module). Same-shape modules are
    stacked, at most BASE_BATCH_BYTES of fp32 weights per call; one module's base tensor is read at a time."""
    shapes = {n: (m.out_features, m.in_features) for n, m in adapter.items()}
    decoder = base.decoder()
    for (m, n), names in group_by(shapes).items():
        step = max(1, BASE_BATCH_BYTES // (4 * m * n))
        for start in range(0, len(names), step):
            chunk = names[start:start + step]
            stack = torch.empty(len(chunk), m, n, device=device)
            for i, name in enumerate(chunk):
                W, stored, state = _load_base_weight(base, decoder, name, adapter[name])
                stack[i] = W
                if state is not None:
                    survival = nf4_survival(stored, adapter[name].delta().to(stored.device),
                                            blocksize=state.blocksize, double_quant=state.double_quant)
                    records[name]["nf4_survival"] = float(survival)
            frobenius = torch.linalg.matrix_norm(stack).double().cpu()
            sigma = randomized_svd(stack, 1, power_iters=POWER_ITERATIONS, device=device).S[:, 0].double().cpu()
            for i, name in enumerate(chunk):
                rec = records[name]
                rec["base_frobenius_norm"] = frobenius[i].item()
                rec["base_spectral_norm"] = sigma[i].item()
                rec["relative_norm"] = _ratio(rec["frobenius_norm"], frobenius[i].item())
                rec["relative_spectral_norm"] = _ratio(rec["spectral_norm"], sigma[i].item())


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


# --------------------------------------------------------------------------- policies and the single-adapter document


def _policy(adapter: Adapter, records: Mapping[str, dict], tau: float) -> dict:
    """Parameters of the adapter re-ranked at energy τ: Σ k_j·(m_j + n_j) plus magnitudes and biases, exactly."""
    key = energy_key(tau)
    params = sum(m.num_params - (m.rank - records[name][key]) * (m.out_features + m.in_features)
                 for name, m in adapter.items())
    return {"energy": tau, "params": params, "fraction": params / adapter.num_params}


def _suggestion(policy: Mapping, total: int) -> dict:
    """The policy with a one-line reading, e.g. "`--energy 0.99` keeps 99% ... with 38.2% of the parameters"."""
    text = (f"`adaptools rerank --energy {policy['energy']:g}` keeps {policy['energy']:.0%} of the energy of every module with "
            f"{100 * policy['fraction']:.3g}% of the parameters ({policy['params']:,} of {total:,})")
    if policy["params"] >= total:
        text += "; the stored ranks are already tight"
    return {**policy, "text": text}


def _as_adapter(adapter: AdapterLike, base: BaseLike | None, allow_pickle: bool) -> Adapter:
    if isinstance(adapter, Adapter):
        return adapter
    return load(adapter, allow_pickle=allow_pickle, base=base)


def _as_base(base: BaseLike | None) -> Container | None:
    return None if base is None else open_base(base)


def _analyse(adapter: Adapter, base: Container | None, device: torch.device) -> tuple[dict, dict[str, SVD]]:
    if not adapter.modules:
        raise InvalidArgumentError(f"adapter {adapter.name or ''!r} has no LoRA modules to analyse")
    svds = _factored_svds(adapter, device)
    records = _module_records(adapter, svds)
    if base is not None:
        _base_metrics(adapter, records, base, device)
    policies = [_policy(adapter, records, tau) for tau in ENERGY_LEVELS]
    document = {
        "schema": SCHEMA,
        "name": adapter.name,
        "format": adapter.source_format,
        "base_model": adapter.base_model,
        "base": None if base is None else str(base.root),
        "num_params": adapter.num_params,
        "modules": records,
        "policies": policies,
        "suggestion": _suggestion(next(p for p in policies if p["energy"] == SUGGESTED_ENERGY), adapter.num_params),
    }
    return document, svds


def spectrum(adapter: AdapterLike, base: BaseLike | None = None, *, device: str | torch.device = "auto",
             allow_pickle: bool = False) -> dict:
    """Rank-spectrum diagnostics of one adapter (an `Adapter` or a path), optionally relative to a base checkpoint.

    Returns the document `adaptools spectrum --json` writes (schema in docs/spectrum.md): `modules` keyed by module
    path, each with `singular_values` and the metrics of `spectral_metrics` (plus base-relative sizes with `base`),
    `policies` (parameters kept at each energy of ENERGY_LEVELS) and `suggestion`. Load it into pandas with
    `pd.DataFrame.from_dict(result["modules"], orient="index")`.
    """
    dev = resolve_device(device)
    checkpoint = _as_base(base)
    return _analyse(_as_adapter(adapter, checkpoint, allow_pickle), checkpoint, dev)[0]


# --------------------------------------------------------------------------- comparison


def subspace_overlap(Q1: Tensor, Q2: Tensor, k1: Tensor, k2: Tensor) -> tuple[Tensor, Tensor]:
    """Overlap of the spans of the first k1 columns of Q1 (..., m, p) and first k2 of Q2 (..., m, q) (orthonormal).

    overlap = ‖Q1ᵀQ2‖²_F / min(k1, k2) = mean cos² of the principal angles (1: one span contains the other,
    0: orthogonal; NaN where k1 or k2 is 0). Returns (overlap (...), principal cosines (..., min(p, q)), descending,
    of which the first min(k1, k2) are meaningful).
    """
    inner = Q1.mT @ Q2
    rows = torch.arange(inner.shape[-2], device=inner.device) < k1.unsqueeze(-1)
    cols = torch.arange(inner.shape[-1], device=inner.device) < k2.unsqueeze(-1)
    inner = inner * (rows.unsqueeze(-1) & cols.unsqueeze(-2))
    overlap = (inner.square().sum((-2, -1)) / torch.minimum(k1, k2)).clamp(max=1.0)
    return overlap, torch.linalg.svdvals(inner).clamp(max=1.0)


def factored_inner(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> Tensor:
    """⟨B1A1, B2A2⟩_F = trace((B1ᵀB2)(A2A1ᵀ)) = Σ (B1ᵀB2) ⊙ (A1A2ᵀ), without forming either product; batched."""
    return ((B1.mT @ B2) * (A1 @ A2.mT)).sum((-2, -1))


def _pair_records(a: Adapter, b: Adapter, svd_a: Mapping[str, SVD], svd_b: Mapping[str, SVD], doc_a: dict,
                  doc_b: dict, device: torch.device) -> dict[str, dict]:
    """Per shared module: column/row subspace overlap (numerical-rank spans), principal cosines, update cosine."""
    shared = [n for n in a.modules if n in b.modules]
    for name in shared:
        if doc_a["modules"][name]["shape"] != doc_b["modules"][name]["shape"]:
            raise ShapeMismatchError(f"module {name!r} has shape {doc_a['modules'][name]['shape']} in one adapter and "
                                     f"{doc_b['modules'][name]['shape']} in the other: adapters of different bases?")

    def rank(doc: dict, name: str) -> Tensor:
        return torch.tensor(doc["modules"][name]["numerical_rank"])

    items = {n: (svd_a[n].U, svd_b[n].U, svd_a[n].Vh.mT, svd_b[n].Vh.mT, rank(doc_a, n), rank(doc_b, n),
                 _scaled_B(a[n]), a[n].A, _scaled_B(b[n]), b[n].A) for n in shared}

    def batched(Ua, Ub, Va, Vb, ka, kb, Ba, Aa, Bb, Ab):
        t = [x.to(device, torch.float32) for x in (Ua, Ub, Va, Vb, Ba, Aa, Bb, Ab)]
        ka, kb = ka.to(device), kb.to(device)
        col, col_cos = subspace_overlap(t[0], t[1], ka, kb)
        row, row_cos = subspace_overlap(t[2], t[3], ka, kb)
        return col, row, col_cos, row_cos, factored_inner(*t[4:])

    results = map_by_shape(items, batched)
    records = {}
    for name in shared:
        col, row, col_cos, row_cos, inner = (x.double().cpu() for x in results[name])
        ma, mb = doc_a["modules"][name], doc_b["modules"][name]
        k = min(ma["numerical_rank"], mb["numerical_rank"])
        norms = ma["frobenius_norm"] * mb["frobenius_norm"]
        m, n = ma["shape"]
        kmax = max(ma["numerical_rank"], mb["numerical_rank"])
        records[name] = {
            "column_overlap": col.item() if k else None,
            "row_overlap": row.item() if k else None,
            "cosine": max(-1.0, min(1.0, inner.item() / norms)) if norms > 0 else None,
            "inner_product": inner.item(),
            "column_cosines": col_cos[:k].tolist(),
            "row_cosines": row_cos[:k].tolist(),
            "column_overlap_chance": kmax / m,
            "row_overlap_chance": kmax / n,
        }
    return records


def _pair_summary(records: Mapping[str, dict], doc_a: dict, doc_b: dict) -> dict:
    """Mean overlaps over shared modules and the cosine of the whole update restricted to them."""
    inner = sum(r["inner_product"] for r in records.values())
    sq_a = sum(doc_a["modules"][n]["frobenius_norm"] ** 2 for n in records)
    sq_b = sum(doc_b["modules"][n]["frobenius_norm"] ** 2 for n in records)

    def mean(key: str) -> float | None:
        values = [r[key] for r in records.values() if r[key] is not None]
        return sum(values) / len(values) if values else None

    summary = {
        "cosine": inner / math.sqrt(sq_a * sq_b) if sq_a * sq_b > 0 else None,
        "mean_column_overlap": mean("column_overlap"),
        "mean_row_overlap": mean("row_overlap"),
        "mean_overlap_chance": (mean("column_overlap_chance") + mean("row_overlap_chance")) / 2 if records else None,
        "mean_cosine": mean("cosine"),
    }
    return {**summary, "reading": interference_reading(summary)}


def interference_reading(summary: Mapping) -> str:
    """One sentence on what combining two adapters will do, from the whole-update cosine and the mean overlaps."""
    cosine = summary["cosine"]
    if cosine is None:
        return "no shared module with a nonzero update in both adapters: nothing to interfere"
    if abs(cosine) < COSINE_ORTHOGONAL:
        text = f"nearly orthogonal updates (cosine {cosine:.3f}): a sum keeps both with little interference"
    elif cosine > 0:
        text = (f"aligned updates (cosine {cosine:.3f}): they reinforce each other, so a plain sum overshoots "
                "the shared directions; weights below 1 (e.g. an average) compensate")
    else:
        text = (f"opposing updates (cosine {cosine:.3f}): they cancel where they overlap, so a sum loses part of "
                "each; prefer TIES/DARE or keeping them apart")
    overlaps = [summary[k] for k in ("mean_column_overlap", "mean_row_overlap") if summary[k] is not None]
    if overlaps:
        text += (f"; subspace overlap {sum(overlaps) / len(overlaps):.2f} "
                 f"(random subspaces of these sizes: {summary['mean_overlap_chance']:.2f})")
    return text


def compare_spectra(adapters: Sequence[AdapterLike], base: BaseLike | None = None, *,
                    names: Sequence[str] | None = None, device: str | torch.device = "auto",
                    allow_pickle: bool = False) -> dict:
    """Spectra of two or more adapters and, for every pair, per shared module the overlap of their column spaces
    (U) and row spaces (V) and the cosine ⟨ΔW₁, ΔW₂⟩_F / (‖ΔW₁‖_F‖ΔW₂‖_F), all from factors.

    Returns {"schema", "adapters": [`spectrum` documents], "comparison": {"pairs": [...]}} (docs/spectrum.md);
    `names` label the adapters (default: each adapter's name).
    """
    if len(adapters) < 2:
        raise InvalidArgumentError(f"a comparison needs at least two adapters, got {len(adapters)}")
    if names is not None and len(names) != len(adapters):
        raise InvalidArgumentError(f"{len(names)} names for {len(adapters)} adapters")
    dev = resolve_device(device)
    checkpoint = _as_base(base)
    loaded = [_as_adapter(a, checkpoint, allow_pickle) for a in adapters]
    analysed = [_analyse(a, checkpoint, dev) for a in loaded]
    docs = [doc for doc, _ in analysed]
    for i, doc in enumerate(docs):
        doc["name"] = names[i] if names is not None else doc["name"] or f"adapter {i}"
    pairs = []
    for i, j in combinations(range(len(loaded)), 2):
        records = _pair_records(loaded[i], loaded[j], analysed[i][1], analysed[j][1], docs[i], docs[j], dev)
        pairs.append({
            "pair": [i, j],
            "names": [docs[i]["name"], docs[j]["name"]],
            "only_in_first": [n for n in loaded[i].modules if n not in loaded[j].modules],
            "only_in_second": [n for n in loaded[j].modules if n not in loaded[i].modules],
            **_pair_summary(records, docs[i], docs[j]),
            "modules": records,
        })
    return {"schema": SCHEMA, "adapters": docs, "comparison": {"pairs": pairs}}


# --------------------------------------------------------------------------- layout shared by the table and the plot


@dataclass(frozen=True)
class ModuleGrid:
    """Layers × module types: `cells[path] = (row, column)` into `rows` (layer labels) and `columns` (type labels).

    Paths without a layer index get a row of their own (labelled by the path) in the column OTHER_COLUMN.
    """

    rows: list[str]
    columns: list[str]
    cells: dict[str, tuple[int, int]]


def module_grid(paths: Sequence[str]) -> ModuleGrid:
    """Arrange module paths as layers × module types; rows are labelled by the layer index when all layered paths
    share one prefix (else by the block path), columns by the last name of the type where that is unambiguous."""
    parsed = {p: parse_module_path(p) for p in paths}
    layered = {p: v for p, v in parsed.items() if v[0] is not None}
    prefixes = {block.rpartition(".")[0] for block, _, _ in layered.values()}
    prefix_order = list(dict.fromkeys(block.rpartition(".")[0] for block, _, _ in layered.values()))
    blocks = sorted({(prefix_order.index(b.rpartition(".")[0]), layer, b) for b, layer, _ in layered.values()})
    types = list(dict.fromkeys(t for _, _, t in layered.values()))
    last = [t.rpartition(".")[2] for t in types]
    type_label = {t: s if last.count(s) == 1 else t for t, s in zip(types, last)}
    rows = [str(layer) if len(prefixes) == 1 else block for _, layer, block in blocks]
    row_of = {block: i for i, (_, _, block) in enumerate(blocks)}
    columns = [type_label[t] for t in types]
    cells = {p: (row_of[b], types.index(t)) for p, (b, _, t) in layered.items()}
    others = [p for p in paths if p not in layered]
    if others:
        columns.append(OTHER_COLUMN)
        for p in others:
            cells[p] = (len(rows), len(columns) - 1)
            rows.append(p)
    return ModuleGrid(rows, columns, {p: cells[p] for p in paths})
