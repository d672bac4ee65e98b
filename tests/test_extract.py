"""adaptools extract: LoRA from (base, tuned) checkpoints against dense SVDs, PEFT's forward and adaptools merge."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from factories import input_ids, load_base, make_base, tuned_copy
from safetensors.torch import load_file, save_file

import adaptools
from adaptools.errors import BaseMismatchError, InvalidArgumentError, ShapeMismatchError
from adaptools.extract import Checkpoint
from adaptools.linalg import RankPolicy, adaptive_svd, budget_ranks, truncation_error

pytestmark = pytest.mark.usefixtures("single_thread")

# --------------------------------------------------------------------------- the math against dense SVDs


def with_spectrum(s: torch.Tensor, m: int, n: int, seed: int) -> torch.Tensor:
    """A random m x n float32 matrix U diag(s) Vᵀ with the given singular values."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    return ((U * s) @ V.T).float()


SPECTRA = {
    "power 0.25": lambda i: (i + 1) ** -0.25,   # slowly decaying: the hard case for a range finder
    "power 0.5": lambda i: (i + 1) ** -0.5,
    "power 1": lambda i: (i + 1) ** -1.0,
    "exponential": lambda i: torch.exp(-i / 20),
}
POLICIES = [RankPolicy("rank", 24), RankPolicy("rank", 40), RankPolicy("energy", 0.5), RankPolicy("energy", 0.9),
            RankPolicy("ratio", 3.0), RankPolicy("threshold", 0.35)]


@pytest.fixture(scope="module")
def stacks() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per spectrum: a stack of two 700 x 600 matrices (large enough for the randomized path) and their spectra."""
    i = torch.arange(600, dtype=torch.float64)
    out = {}
    for j, (name, f) in enumerate(SPECTRA.items()):
        s = f(i)
        out[name] = torch.stack([with_spectrum(s, 700, 600, 2 * j), with_spectrum(s * 0.5, 700, 600, 2 * j + 1)]), s
    return out


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.kind}={p.value:g}")
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_randomized_error_is_within_one_percent_of_eckart_young_and_reported_exactly(stacks, spectrum, policy):
    M, s = stacks[spectrum]
    total = torch.linalg.vector_norm(M, dim=(-2, -1), dtype=torch.float64).square()
    results = adaptive_svd(M, policy, total, method="randomized")
    for j, ((U, S, Vh), k, method) in enumerate(results):
        assert method == "randomized"
        exact = s * (1.0 if j == 0 else 0.5)
        optimal = float(exact[k:].square().sum().sqrt())
        true = float((M[j].double() - (U[:, :k] * S[:k]).double() @ Vh[:k].double()).norm())
        reported = float(truncation_error(S.double(), k, total[j])[0])
        assert true <= 1.01 * optimal, (k, true / optimal)
        assert reported == pytest.approx(true, rel=1e-4)
        # the policy's choice on the sketch agrees with the choice on the exact spectrum
        k_exact = int(adaptools.linalg.choose_ranks(exact, policy))
        if policy.kind == "energy":
            assert reported**2 <= (1 - policy.value) * float(total[j]) * (1 + 1e-9)
            assert k_exact <= k <= 1.03 * k_exact + 1
        else:
            assert abs(k - k_exact) <= 0.03 * k_exact + 1


def test_budget_on_sketched_spectra_keeps_the_exact_budget_choice(stacks):
    M, s = stacks["power 0.5"]
    total = torch.linalg.vector_norm(M, dim=(-2, -1), dtype=torch.float64).square()
    budget = 60 * (700 + 600)
    exact = budget_ranks([s, s * 0.5], [(700, 600)] * 2, budget)
    sketched = [S[:k].double() for (_, S, _), k, _ in adaptive_svd(M, RankPolicy("rank", 120), total)]
    assert budget_ranks(sketched, [(700, 600)] * 2, budget) == exact


def test_full_width_sketch_and_exact_method_give_the_optimum(stacks):
    M, s = stacks["exponential"]
    total = torch.linalg.vector_norm(M, dim=(-2, -1), dtype=torch.float64).square()
    for method in ("exact", "randomized"):
        (U, S, Vh), k, used = adaptive_svd(M[:1], RankPolicy("rank", 600), total[:1], method=method)[0]
        assert (used, k) == (method, 600)
        torch.testing.assert_close(S.double(), s, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("extract")
    base = make_base(root / "base")
    return base, tuned_copy(base, root / "tuned")


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids()).logits


@pytest.mark.parametrize("full_tensors", [False, True])
def test_full_rank_extraction_gives_the_tuned_models_logits_through_peft(pair, tmp_path, full_tensors):
    from peft import PeftModel

    base, tuned = pair
    adapter, report = adaptools.extract(base, tuned, rank=10_000, dtype=torch.float32, full_tensors=full_tensors)
    assert report.worst_rel_error < 1e-5
    embeddings = {"model.embed_tokens.weight", "lm_head.weight"}
    assert ("model.embed_tokens" in adapter) != full_tensors
    assert set(adapter.extra) == {"model.norm.weight"} | (embeddings if full_tensors else set())
    if not full_tensors:
        assert adapter["model.embed_tokens"].kind == "embedding" and adapter["lm_head"].kind == "linear"
    assert report.unchanged == 4  # the layer norms of both layers
    adapter.save(tmp_path / "out")
    got = logits_of(PeftModel.from_pretrained(load_base(base), tmp_path / "out").eval())
    torch.testing.assert_close(got, logits_of(load_base(tuned)), atol=2e-5, rtol=1e-4)


def test_gpt2_conv1d_full_rank_gives_the_tuned_logits(gpt2_base, tmp_path):
    from peft import PeftModel

    # wte is tied to the LM head: a LoRA on the embedding does not reach PEFT's output head, so it stays unchanged
    tuned = tuned_copy(gpt2_base, tmp_path / "tuned", skip=("wte",))
    adapter, _ = adaptools.extract(gpt2_base, tuned, rank=10_000, dtype=torch.float32)
    assert adapter["transformer.h.0.attn.c_attn"].fan_in_fan_out
    adapter.save(tmp_path / "out")
    got = logits_of(PeftModel.from_pretrained(load_base(gpt2_base), tmp_path / "out").eval())
    torch.testing.assert_close(got, logits_of(load_base(tuned)), atol=2e-5, rtol=1e-4)


def test_merged_back_with_adaptools_merge_equals_base_plus_best_rank_k(pair, tmp_path, runner):
    base, tuned = pair
    result = run_cli(runner, "extract", base, tuned, "--rank", 3, "--dtype", "float32", "-o", tmp_path / "lora",
                     "--report", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert run_cli(runner, "merge", base, tmp_path / "lora", "-o", tmp_path / "merged").exit_code == 0
    merged, W0, W1 = (load_file(p / "model.safetensors") for p in (tmp_path / "merged", base, tuned))
    for key in W0:
        if key.endswith("layernorm.weight"):
            assert torch.equal(merged[key], W0[key])
            continue
        if key == "model.norm.weight":
            assert torch.equal(merged[key], W1[key])
            continue
        delta = (W1[key] - W0[key]).double()
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        torch.testing.assert_close((merged[key].double() - W0[key].double()), best, atol=1e-5, rtol=1e-4)
        entry = report["modules"][key.removesuffix(".weight")]
        assert entry["new_rank"] == 3
        assert entry["error"] == pytest.approx(float(S[3:].square().sum().sqrt()), rel=1e-4)
        assert entry["retained_energy"] == pytest.approx(float(S[:3].square().sum() / S.square().sum()), rel=1e-4)


def test_budget_policy_spends_at_most_the_budget_and_unchanged_modules_are_left_out(tmp_path):
    base = make_base(tmp_path / "base")
    tuned = tuned_copy(base, tmp_path / "tuned", skip=("mlp", "embed", "lm_head"))
    adapter, report = adaptools.extract(base, tuned, budget=1000)
    assert set(adapter.modules) == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}
    assert report.params <= 1000 and report.unchanged == 12 and set(adapter.extra) == {"model.norm.weight"}
    spectra = {n: torch.linalg.svdvals((load_file(tuned / "model.safetensors")[n + ".weight"]
                                        - load_file(base / "model.safetensors")[n + ".weight"]).double())
               for n in adapter.modules}
    shapes = {n: (m.out_features, m.in_features) for n, m in adapter.items()}
    assert adapter.ranks == adaptools.linalg.select_ranks(spectra, shapes, RankPolicy("budget", 1000))


def test_include_exclude_and_kohya_output(pair, tmp_path, runner):
    base, tuned = pair
    adapter, _ = adaptools.extract(base, tuned, rank=2, include=r"layers\.1\.", exclude="mlp")
    assert set(adapter.modules) == {f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"} and not adapter.extra
    result = run_cli(runner, "extract", base, tuned, "--rank", 2, "--include", "self_attn", "--to", "kohya",
                     "-o", tmp_path / "lora.safetensors")
    assert result.exit_code == 0, result.output
    assert len(load_file(tmp_path / "lora.safetensors")) == 3 * 8


def test_mlx_output_reads_back_as_the_same_updates_and_full_tensors_are_refused(pair, tmp_path, runner):
    base, tuned = pair
    result = run_cli(runner, "extract", base, tuned, "--rank", 3, "--include", r"layers\.", "--to", "mlx",
                     "-o", tmp_path / "mlx")
    assert result.exit_code == 0, result.output
    expected, _ = adaptools.extract(base, tuned, rank=3, include=r"layers\.")
    written = adaptools.load(tmp_path / "mlx")
    assert adaptools.detect_format(tmp_path / "mlx") == "mlx" and set(written.modules) == set(expected.modules)
    assert set(written.ranks.values()) == {3}
    for name in expected.modules:
        torch.testing.assert_close(written.delta(name), expected.delta(name), atol=1e-6, rtol=1e-4)
    refused = run_cli(runner, "extract", base, tuned, "--rank", 3, "--to", "mlx", "-o", tmp_path / "all")
    assert refused.exit_code == 2 and "cannot hold full tensors" in refused.stderr and not (tmp_path / "all").exists()


def test_any_shard_layouts_and_an_hf_cache_snapshot_give_the_same_adapter(pair, tmp_path):
    base, tuned = pair
    sharded = tuned_copy(base, tmp_path / "sharded", max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    # an HF cache layout: blobs/ and snapshots/<rev>/ of relative symlinks
    repo = tmp_path / "models--org--base"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(base.iterdir())):
        shutil.copyfile(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    reference, _ = adaptools.extract(base, tuned, rank=3, dtype=torch.float32)
    for b, t in ((snapshot, sharded), (base, sharded)):
        adapter, _ = adaptools.extract(b, t, rank=3, dtype=torch.float32)
        assert adapter.ranks == reference.ranks
        for name, m in adapter.items():
            torch.testing.assert_close(m.B @ m.A, reference[name].B @ reference[name].A, atol=1e-6, rtol=1e-5)


def test_nf4_base_gives_the_lora_that_restores_the_original_weights(tmp_path):
    base = make_base(tmp_path / "base", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2)
    nf4 = tmp_path / "nf4"
    adaptools.quantize(base, nf4)
    adapter, report = adaptools.extract(nf4, base, rank=10_000, dtype=torch.float32)
    assert set(adapter.modules) == {f"model.layers.{i}.{p}" for i in range(2) for p in
                                    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert not adapter.extra and report.unchanged == 7  # embeddings, LM head and norms stay unquantized
    dequantized, original = Checkpoint.open(nf4), load_file(base / "model.safetensors")
    for name, m in adapter.items():
        restored = dequantized.read(name + ".weight").float() + m.B @ m.A
        torch.testing.assert_close(restored, original[name + ".weight"], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- mismatched checkpoints


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def drop_tensor(folder: Path, key: str) -> None:
    state = load_file(folder / "model.safetensors")
    del state[key]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def mismatched(kind: str, base: Path, root: Path) -> Path:
    if kind == "shapes":
        return make_base(root / kind, intermediate_size=40)
    if kind == "vocab":
        return make_base(root / kind, vocab_size=128)
    tuned = root / kind
    shutil.copytree(base, tuned)
    if kind == "keys":
        drop_tensor(tuned, "model.layers.1.mlp.up_proj.weight")
    elif kind == "model_type":
        edit_config(tuned, model_type="mistral")
    elif kind == "vocab-shape":
        state = load_file(tuned / "model.safetensors")
        state["model.embed_tokens.weight"] = torch.zeros(100, 32)
        save_file(state, tuned / "model.safetensors", metadata={"format": "pt"})
    return tuned


MISMATCHES = {
    "keys": (BaseMismatchError, "1 only in the base (model.layers.1.mlp.up_proj.weight)"),
    "shapes": (ShapeMismatchError, "6 tensors have other shapes"),
    "model_type": (BaseMismatchError, "base model_type 'llama', tuned 'mistral'"),
    "vocab": (BaseMismatchError, "the vocabulary size changed (96 tokens in the base, 128"),
    "vocab-shape": (BaseMismatchError, "resize the base's embeddings to 100"),
}


@pytest.mark.parametrize("kind", list(MISMATCHES))
def test_mismatched_checkpoints_are_one_line_errors(kind, pair, tmp_path, runner):
    base = pair[0]
    tuned = mismatched(kind, base, tmp_path)
    error, text = MISMATCHES[kind]
    with pytest.raises(error) as caught:
        adaptools.extract(base, tuned, rank=2)
    assert text in str(caught.value)
    result = run_cli(runner, "extract", base, tuned, "--rank", 2, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and text in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_failure_half_way_closes_the_progress_bar_before_one_error_line(pair, tmp_path, runner):
    """A NaN in a later weight of TUNED ends `extract` inside its pass: the progress bar it showed on stderr is
    closed on a line of its own (as merge's), and stderr ends with one `error:` line, alone on its line."""
    base, tuned = pair
    bad = Path(shutil.copytree(tuned, tmp_path / "tuned"))
    state = load_file(bad / "model.safetensors")
    key = [k for k, v in state.items() if v.ndim == 2 and "layers." in k][-1]
    state[key][0, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    result = run_cli(runner, "extract", base, bad, "--rank", 2, "-o", tmp_path / "out")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    *bar, error, end = result.stderr.split("\n")
    assert bar and all(line.startswith("\rextracting:") for line in bar), result.stderr  # the bar was shown
    assert end == "" and error.startswith("error: ") and "\r" not in error and key in error, result.stderr


@pytest.mark.parametrize("args, text", [
    ((), "give exactly one of --rank"),
    (("--rank", 2, "--energy", 0.9), "give exactly one of"),
    (("--energy", 1.5), "energy must be in (0, 1]"),
    (("--rank", 2, "--include", "("), "not a valid regular expression"),
    (("--rank", 2, "--include", "nothing-matches"), "leave no tensor"),
    (("--rank", 2, "--budget", 10), "give exactly one of"),
])
def test_bad_options_are_one_line_errors(args, text, pair, tmp_path, runner):
    base, tuned = pair
    result = run_cli(runner, "extract", base, tuned, *args, "-o", tmp_path / "out")
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and text in result.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidArgumentError):
        adaptools.extract(base, tuned, budget=10)  # below rank 1 for every module


def test_budget_grows_the_sketch_of_a_module_that_takes_most_of_it(tmp_path):
    """Four 600 x 600 modules (randomized path), one 100x stronger: it takes almost all of the budget, beyond the
    first sketch (twice the mean rank, 50), so its spectrum is sketched again, wider."""
    i = torch.arange(600, dtype=torch.float64)
    spectra = {"big": (i + 1) ** -0.5, **{f"small{j}": 0.01 * (i + 1) ** -0.5 for j in range(3)}}
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    for folder in (base, tuned):
        folder.mkdir()
    deltas = {f"{name}.weight": with_spectrum(s, 600, 600, seed) for seed, (name, s) in enumerate(spectra.items())}
    save_file({k: torch.zeros(600, 600) for k in deltas}, str(base / "model.safetensors"))
    save_file(deltas, str(tuned / "model.safetensors"))
    budget = 100 * 1200
    adapter, report = adaptools.extract(base, tuned, budget=budget, dtype=torch.float32)
    exact = budget_ranks(list(spectra.values()), [(600, 600)] * 4, budget)
    assert adapter.ranks["big"] > 50 and report.params <= budget
    assert abs(adapter.ranks["big"] - exact[0]) <= 2
    for name, s in spectra.items():
        k, m = adapter.ranks[name], adapter[name]
        optimal = float(s[k:].square().sum().sqrt())
        true = float((deltas[name + ".weight"].double() - (m.B @ m.A).double()).norm())
        assert true <= 1.01 * optimal and report.modules[name].error == pytest.approx(true, rel=1e-4)
        assert report.modules[name].method == "randomized"


def test_nothing_to_extract_is_one_line_error_and_no_output(pair, tmp_path, runner):
    """Found in review: a tuned model equal to its base (or changed in full tensors only) ended in a traceback."""
    base, _ = pair
    with pytest.raises(InvalidArgumentError, match="nothing to extract"):
        adaptools.extract(base, base, rank=2)
    for fmt in ("peft", "kohya"):
        result = run_cli(runner, "extract", base, base, "--rank", 2, "--to", fmt, "-o", tmp_path / fmt)
        assert result.exit_code == 2 and result.stderr.count("error:") == 1 and "nothing to extract" in result.stderr
        assert not (tmp_path / fmt).exists() and not list(tmp_path.glob(f".{fmt}*"))
    only_norm = tuned_copy(base, tmp_path / "only_norm", skip=("proj", "embed_tokens", "lm_head"))
    with pytest.raises(InvalidArgumentError, match="only full tensors changed"):
        adaptools.extract(base, only_norm, rank=2)
