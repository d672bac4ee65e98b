"""SVD re-rank against dense SVDs (Eckart–Young), brute-force rank rules, and PEFT's forward on the results."""
from __future__ import annotations

import importlib
import json

import pytest
import torch
from conftest import run_cli
from factories import input_ids, load_base, make_peft_adapter, peft_delta_weights, peft_logits

import adaptools
from adaptools import Adapter, LoraModule
from adaptools.errors import DoraError, InvalidArgumentError

TOL = 1e-4
rerank_module = importlib.import_module("adaptools.rerank")  # the attribute adaptools.rerank is the function


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def close(error: float, optimum: float, norm: float) -> bool:
    """error = optimum within 1e-4 relative, plus float32 round-off (1e-6·‖ΔW‖) where the optimum is 0."""
    return abs(error - optimum) <= TOL * optimum + 1e-6 * norm


def spectrum(module: LoraModule) -> torch.Tensor:
    """The min(r, m, n) possibly nonzero singular values of the canonical ΔW, by a dense float64 SVD."""
    S = torch.linalg.svdvals(module.scale * module.B.double() @ module.A.double())
    return S[:module.rank]


def best(module: LoraModule, k: int) -> torch.Tensor:
    """Best rank-k approximation of ΔW (dense float64 SVD), canonical orientation."""
    U, S, Vh = torch.linalg.svd(module.scale * module.B.double() @ module.A.double(), full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


@pytest.fixture(scope="module")
def mixed() -> Adapter:
    """Modules of several shapes, ranks, scales and kinds; two of one shape (one batched call)."""
    g = torch.Generator().manual_seed(0)

    def module(m: int, r: int, n: int, scale: float, **kw) -> LoraModule:
        return LoraModule(A=torch.randn(r, n, generator=g), B=torch.randn(m, r, generator=g), scale=scale, **kw)

    return Adapter({
        "q": module(40, 12, 30, 0.5),
        "k": module(40, 12, 30, 2.0),
        "wide": module(10, 16, 50, 1.0),  # rank above min(m, n)
        "emb": module(8, 6, 64, 1.0, kind="embedding"),
        "conv": module(6, 5, 2 * 3 * 3, 1.5, kind="conv", kernel=(3, 3)),
        "fifo": module(24, 7, 20, 0.25, fan_in_fan_out=True),
    })


@pytest.mark.parametrize("k", [1, 3, 6])
def test_error_is_eckart_young_optimum(mixed, k):
    result, report = adaptools.rerank(mixed, rank=k)
    for name, m in mixed.items():
        S = spectrum(m)
        kk = min(k, len(S))
        optimum = float(S[kk:].square().sum().sqrt())
        norm = float(S.square().sum().sqrt())
        entry = report.modules[name]
        assert (entry.old_rank, entry.new_rank) == (m.rank, min(k, m.rank, m.out_features, m.in_features))
        assert rel(entry.norm, norm) <= TOL
        assert close(entry.error, optimum, norm) and close(entry.rel_error, optimum / norm, 1.0)
        assert close(entry.retained_energy, 1 - (optimum / norm) ** 2, 1.0)
        new = result[name]
        assert new.rank == entry.new_rank and new.scale == 1.0 and new.kind == m.kind
        got = m.from_base_layout(new.delta(torch.float64))
        actual = float((m.scale * m.B.double() @ m.A.double() - got).norm())
        assert close(actual, optimum, norm), name
        if kk < len(S):  # the optimum is unique when s_k > s_{k+1}: it is the one Eckart–Young gives
            assert float((got - best(m, kk)).norm()) <= TOL * norm


def test_batched_in_chunks_gives_the_same(mixed, monkeypatch):
    whole, report = adaptools.rerank(mixed, energy=0.8)
    monkeypatch.setattr(rerank_module, "MAX_STACK_ELEMENTS", 1)
    chunked, chunked_report = adaptools.rerank(mixed, energy=0.8)
    for name, entry in report.modules.items():
        other = chunked_report.modules[name]
        assert other.new_rank == entry.new_rank and rel(other.error, entry.error) <= TOL
    for name, m in whole.items():
        assert torch.allclose(chunked.delta(name), m.delta(), atol=1e-5)


@pytest.mark.parametrize("kind,value", [("energy", 0.5), ("energy", 0.9), ("energy", 0.999), ("energy", 1.0),
                                        ("ratio", 2.0), ("ratio", 10.0), ("threshold", 30.0), ("rank", 4)])
def test_policy_picks_smallest_rank_that_meets_it(mixed, kind, value):
    _, report = adaptools.rerank(mixed, **{kind: value})
    for name, m in mixed.items():
        S = spectrum(m).tolist()
        k = report.modules[name].new_rank

        def meets(j: int) -> bool:
            if kind == "energy":
                return sum(s * s for s in S[:j]) >= value * sum(s * s for s in S) * (1 - 1e-9)
            if kind == "ratio":
                return all(s < S[0] / value for s in S[j:])
            if kind == "threshold":
                return all(s < value for s in S[j:])
            return j >= min(value, len(S))

        assert 1 <= k <= len(S) and meets(k), (name, k)
        assert k == 1 or not meets(k - 1), (name, k)


def test_budget_policy(mixed):
    sizes = {n: m.out_features + m.in_features for n, m in mixed.items()}
    budget = 3 * sum(sizes.values()) + 17
    _, report = adaptools.rerank(mixed, budget=budget)
    spent = sum(e.new_rank * sizes[n] for n, e in report.modules.items())
    assert report.params_after == spent <= budget
    for name, e in report.modules.items():  # maximal: no module can grow by one more singular value
        if e.new_rank < len(spectrum(mixed[name])):
            assert sizes[name] > budget - spent
    with pytest.raises(InvalidArgumentError, match="budget"):
        adaptools.rerank(mixed, budget=10)


def test_report_to_dict_is_json(mixed, tmp_path):
    _, report = adaptools.rerank(mixed, ratio=4.0)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["policy"] == "ratio=4"
    assert set(data["modules"]) == set(mixed.modules)
    assert data["worst_rel_error"] == max(m["rel_error"] for m in data["modules"].values())
    assert set(data["modules"]["q"]) == {"old_rank", "new_rank", "out_features", "in_features", "norm", "error",
                                         "rel_error", "retained_energy"}


def test_truncated_result_gives_the_predicted_logits(llama_base, tmp_path):
    """PEFT's forward with the re-ranked adapter equals the base with each best rank-2 ΔW added by hand."""
    path = make_peft_adapter(llama_base, tmp_path / "a", r=6, lora_alpha=12, use_rslora=True,
                             target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], rank_pattern={"v_proj": 3})
    adapter = adaptools.load(path)
    result, report = adaptools.rerank(adapter, rank=2)
    result.save(tmp_path / "r2")

    model = load_base(llama_base)
    from peft import PeftModel

    deltas = peft_delta_weights(PeftModel.from_pretrained(load_base(llama_base), path))
    with torch.no_grad():
        for name, delta in deltas.items():
            U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
            truncated = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
            assert rel(float((delta.double() - truncated).norm()), report.modules[name].error) <= TOL
            model.get_submodule(name).weight += truncated.float()
        expected = model(input_ids()).logits
    got = peft_logits(llama_base, tmp_path / "r2")
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch,lora", [
    ("gpt2_base", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True)),
    ("llama_base", dict(r=4, lora_alpha=2, target_modules=["q_proj", "o_proj"], lora_bias=True)),
])
def test_full_rank_rerank_keeps_peft_logits(request, tmp_path, arch, lora):
    """At full rank nothing is cut: layouts, LoRA biases (s·b) and scales survive the re-factorisation."""
    base = request.getfixturevalue(arch)
    path = make_peft_adapter(base, tmp_path / "a", save_embedding_layers=False, **lora)
    result, report = adaptools.rerank(adaptools.load(path), rank=lora["r"])
    assert report.worst_rel_error <= 1e-6
    result.save(tmp_path / "same")
    assert torch.allclose(peft_logits(base, tmp_path / "same"), peft_logits(base, path), atol=1e-5)


def test_dtype_kept_or_asked(mixed):
    half = mixed.to(dtype=torch.float16)
    out, _ = adaptools.rerank(half, rank=2)
    assert {m.dtype for _, m in out.items()} == {torch.float16}
    out, _ = adaptools.rerank(half, rank=2, dtype=torch.float32)
    assert {m.dtype for _, m in out.items()} == {torch.float32}


@pytest.mark.parametrize("options", [{}, {"rank": 2, "energy": 0.9}, {"energy": 1.5}, {"energy": 0.0},
                                     {"rank": 0}, {"ratio": 0.5}, {"threshold": -1.0}, {"rank": 2, "policy": "rank=2"}])
def test_invalid_policies(mixed, options):
    with pytest.raises(InvalidArgumentError):
        adaptools.rerank(mixed, **options)


def test_dora_refused(llama_base, tmp_path):
    dora = make_peft_adapter(llama_base, tmp_path / "d", r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(DoraError, match="dora to-lora"):
        adaptools.rerank(adaptools.load(dora), rank=1)


# --------------------------------------------------------------------------- CLI


@pytest.fixture()
def adapter_path(llama_base, tmp_path):
    return make_peft_adapter(llama_base, tmp_path / "a", r=6, target_modules=["q_proj", "k_proj", "up_proj"])


def test_cli_rerank_writes_adapter_report_and_summary(runner, adapter_path, tmp_path, monkeypatch):
    from adaptools_cli.commands import rerank as command

    monkeypatch.setattr(command, "PROGRESS_MIN_MODULES", 1)
    res = run_cli(runner, "rerank", adapter_path, "--energy", "0.9", "-o", tmp_path / "out", "--layout", "compact",
                  "--report", tmp_path / "report.json", "--device", "cpu")
    assert res.exit_code == 0, res.output + res.stderr
    _, expected = adaptools.rerank(adaptools.load(adapter_path), energy=0.9)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data == json.loads(json.dumps(expected.to_dict()))
    assert adaptools.load(tmp_path / "out").ranks == {n: e.new_rank for n, e in expected.modules.items()}
    assert "rank before" in res.output and "worst relative error" in res.output
    assert f"{expected.worst_rel_error:.4g}" in res.output
    assert "module" in res.stderr  # the progress bar


@pytest.mark.parametrize("args,message", [
    ([], "exactly one"),
    (["--rank", "2", "--budget", "1000"], "exactly one"),
    (["--energy", "1.5"], "energy"),
    (["--rank", "0"], "rank"),
    (["--ratio", "0.5"], "ratio"),
])
def test_cli_rerank_errors(runner, adapter_path, tmp_path, args, message):
    res = run_cli(runner, "rerank", adapter_path, *args, "-o", tmp_path / "out", "--report", tmp_path / "r.json")
    assert res.exit_code == 2
    assert res.stderr.startswith("error:") and message in res.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no CUDA device exists")
def test_cli_rerank_cuda_without_gpu(runner, adapter_path, tmp_path):
    res = run_cli(runner, "rerank", adapter_path, "--rank", "2", "--device", "cuda", "-o", tmp_path / "out")
    assert res.exit_code == 2 and "CUDA" in res.stderr and not (tmp_path / "out").exists()
