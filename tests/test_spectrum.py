"""adaptools.spectrum against dense SVDs, PEFT merges and bitsandbytes; the JSON schema, the plot and the CLI."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from factories import load_base, make_peft_adapter
from safetensors.torch import load_file

import adaptools
from adaptools import Adapter, LoraModule
from adaptools.errors import (
    BaseMismatchError,
    InvalidArgumentError,
    ShapeMismatchError,
    UnknownModuleError,
)
from adaptools.spectrum import compare_spectra, module_grid, parse_module_path, spectrum

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "spectrum.md"


@pytest.fixture(scope="module")
def llama_adapter(llama_base, tmp_path_factory) -> Path:
    return make_peft_adapter(llama_base, tmp_path_factory.mktemp("spec") / "r8", seed=1, r=8, lora_alpha=16,
                             target_modules=LLAMA_TARGETS)


@pytest.fixture(scope="module")
def llama_adapter_r4(llama_base, tmp_path_factory) -> Path:
    return make_peft_adapter(llama_base, tmp_path_factory.mktemp("spec") / "r4", seed=2, r=4, lora_alpha=4,
                             use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def gpt2_adapter(gpt2_base, tmp_path_factory) -> Path:
    return make_peft_adapter(gpt2_base, tmp_path_factory.mktemp("spec") / "gpt2", seed=3, r=6, lora_alpha=12,
                             target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)


def dense(module: LoraModule) -> torch.Tensor:
    """Canonical (out, in) ΔW = scale·B@A in float64."""
    return module.scale * (module.B.double() @ module.A.double())


def reference_metrics(delta: torch.Tensor) -> dict:
    """The documented metrics from a dense SVD."""
    s = torch.linalg.svdvals(delta.double())
    p = s / s.sum()
    energy = torch.cumsum(s.square(), 0) / s.square().sum()
    return {
        "s": s,
        "effective_rank": math.exp(-(p[p > 0] * p[p > 0].log()).sum().item()),
        "stable_rank": (s.square().sum() / s[0] ** 2).item(),
        "energy_rank_90": int((energy < 0.9).sum()) + 1,
        "energy_rank_99": int((energy < 0.99).sum()) + 1,
        "numerical_rank": int(torch.linalg.matrix_rank(delta.float())),
    }


def synthetic_adapter(seed: int = 0) -> Adapter:
    """Linear (one rank-deficient), conv, embedding and an all-zero module, with paths without layer indices too."""
    g = torch.Generator().manual_seed(seed)
    deficient_B = torch.randn(24, 3, generator=g) @ torch.randn(3, 8, generator=g)  # rank 3 of 8
    decay = torch.logspace(0, -3, 6)
    return Adapter({
        "encoder.layers.0.attn.q": LoraModule(torch.randn(8, 16, generator=g), deficient_B, scale=0.5),
        "encoder.layers.0.attn.k": LoraModule(torch.randn(6, 16, generator=g), torch.randn(24, 6, generator=g) * decay, 2.0),
        "decoder.layers.0.attn.q": LoraModule(torch.randn(8, 16, generator=g), torch.randn(24, 8, generator=g), 1.0),
        "conv_in": LoraModule(torch.randn(4, 3 * 9, generator=g), torch.randn(5, 4, generator=g), 1.5, kind="conv",
                              kernel=(3, 3)),
        "embed": LoraModule(torch.randn(4, 40, generator=g), torch.randn(12, 4, generator=g), 1.0, kind="embedding"),
        "lm_head": LoraModule(torch.randn(4, 16, generator=g), torch.zeros(10, 4), 1.0),
    }, name="synthetic")


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("which", ["peft", "synthetic"])
def test_metrics_match_dense_svd(which, llama_adapter):
    adapter = adaptools.load(llama_adapter) if which == "peft" else synthetic_adapter()
    result = spectrum(adapter, device="cpu")
    assert list(result["modules"]) == list(adapter.modules)
    for name, module in adapter.items():
        record, ref = result["modules"][name], reference_metrics(dense(module))
        k = min(module.out_features, module.in_features, module.rank)
        s = torch.tensor(record["singular_values"], dtype=torch.float64)
        assert s.shape == (k,)
        torch.testing.assert_close(s, ref["s"][:k], rtol=1e-5, atol=1e-6 * max(ref["s"][0].item(), 1e-30))
        assert record["frobenius_norm"] == pytest.approx(torch.linalg.matrix_norm(dense(module)).item(), rel=1e-5)
        assert record["spectral_norm"] == pytest.approx(ref["s"][0].item(), rel=1e-5, abs=1e-12)
        assert record["numerical_rank"] == ref["numerical_rank"]
        assert (record["rank"], record["shape"]) == (module.rank, [module.out_features, module.in_features])
        if ref["s"][0] == 0:  # the all-zero module
            assert record["effective_rank"] == record["stable_rank"] == record["numerical_rank"] == 0
            continue
        assert record["effective_rank"] == pytest.approx(ref["effective_rank"], rel=1e-5)
        assert record["stable_rank"] == pytest.approx(ref["stable_rank"], rel=1e-5)
        assert record["energy_rank_90"] == ref["energy_rank_90"]
        assert record["energy_rank_99"] == ref["energy_rank_99"]
    if which == "synthetic":
        assert result["modules"]["encoder.layers.0.attn.q"]["numerical_rank"] == 3
        assert result["modules"]["encoder.layers.0.attn.k"]["energy_rank_90"] < 6


def test_policy_fraction_is_exact():
    """Parameters at each energy = Σ k·(m+n) with k from the dense spectrum, over the adapter's parameter count."""
    adapter = synthetic_adapter()
    result = spectrum(adapter, device="cpu")
    total = sum(m.rank * (m.out_features + m.in_features) for m in adapter.modules.values())
    assert result["num_params"] == total
    for policy in result["policies"]:
        key = f"energy_rank_{round(policy['energy'] * 100)}"
        params = sum(reference_metrics(dense(m))[key] * (m.out_features + m.in_features) if dense(m).any()
                     else m.out_features + m.in_features for m in adapter.modules.values())
        assert policy["params"] == params and policy["fraction"] == pytest.approx(params / total)
    suggestion = result["suggestion"]
    assert suggestion["energy"] == 0.99
    assert f"{100 * suggestion['fraction']:.3g}% of the parameters" in suggestion["text"]
    assert "--energy 0.99" in suggestion["text"]


def test_parse_module_path_and_grid():
    assert parse_module_path("model.layers.3.self_attn.q_proj") == ("model.layers.3", 3, "self_attn.q_proj")
    assert parse_module_path("transformer.h.11.mlp.c_proj") == ("transformer.h.11", 11, "mlp.c_proj")
    assert parse_module_path("lm_head") == (None, None, "lm_head")
    paths = ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj", "transformer.h.0.mlp.c_fc",
             "transformer.h.1.attn.c_proj", "lm_head"]
    grid = module_grid(paths)
    assert grid.rows == ["0", "1", "lm_head"]
    assert grid.columns == ["attn.c_proj", "mlp.c_proj", "c_fc", "other"]  # short names only where unambiguous
    assert grid.cells["transformer.h.1.attn.c_proj"] == (1, 0) and grid.cells["lm_head"] == (2, 3)
    two_stacks = module_grid(["encoder.block.0.q", "decoder.block.0.q", "encoder.block.1.q"])
    assert two_stacks.rows == ["encoder.block.0", "encoder.block.1", "decoder.block.0"]


# --------------------------------------------------------------------------- base-relative metrics


def peft_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW per weight key in the base layout, from PEFT's own merge_and_unload."""
    from peft import PeftModel

    before = {k: v.clone() for k, v in load_base(base).state_dict().items()}
    merged = PeftModel.from_pretrained(load_base(base), adapter).merge_and_unload().state_dict()
    return {k: (merged[k] - before[k]).double() for k in before if not torch.equal(merged[k], before[k])}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_base_metrics_match_peft_merge(arch, llama_base, gpt2_base, llama_adapter, gpt2_adapter):
    base, adapter = (llama_base, llama_adapter) if arch == "llama" else (gpt2_base, gpt2_adapter)
    result = spectrum(adapter, base=base, device="cpu")
    deltas = peft_deltas(base, adapter)
    weights = load_file(base / "model.safetensors")
    assert {f"{n}.weight" for n in result["modules"]} == set(deltas)
    for name, record in result["modules"].items():
        W, delta = weights[f"{name}.weight"].double(), deltas[f"{name}.weight"]
        assert record["base_frobenius_norm"] == pytest.approx(torch.linalg.matrix_norm(W).item(), rel=1e-5)
        assert record["base_spectral_norm"] == pytest.approx(torch.linalg.matrix_norm(W, 2).item(), rel=1e-4)
        assert record["relative_norm"] == pytest.approx((delta.norm() / W.norm()).item(), rel=1e-4)
        sigma_ratio = torch.linalg.matrix_norm(delta, 2) / torch.linalg.matrix_norm(W, 2)
        assert record["relative_spectral_norm"] == pytest.approx(sigma_ratio.item(), rel=1e-4)
        assert record["nf4_survival"] is None
    assert result["base"] == str(base)


def test_nf4_base_survival_matches_bitsandbytes(tmp_path):
    """NF4 base quantized by transformers + bitsandbytes; survival and sizes from bitsandbytes' own (de)quantization.
    In-features are multiples of 64: bitsandbytes' CPU dequantize is only right for those."""
    F = pytest.importorskip("bitsandbytes.functional")
    from factories import make_base
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = make_base(tmp_path / "base", "llama", hidden_size=64, intermediate_size=128)
    adapter_path = make_peft_adapter(base, tmp_path / "adapter", seed=4, r=4, lora_alpha=1,
                                     target_modules=["q_proj", "down_proj"])
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    AutoModelForCausalLM.from_pretrained(base, device_map="cpu", quantization_config=config).save_pretrained(
        tmp_path / "nf4")
    result = spectrum(adapter_path, base=tmp_path / "nf4", device="cpu")
    tensors = load_file(tmp_path / "nf4" / "model.safetensors")
    adapter = adaptools.load(adapter_path)
    for name, record in result["modules"].items():
        key = f"{name}.weight"
        state = F.QuantState.from_dict({k[len(key) + 1:]: v for k, v in tensors.items() if k.startswith(key + ".")},
                                       device=torch.device("cpu"))
        W = F.dequantize_4bit(tensors[key], state)
        delta = dense(adapter[name]).float()

        def roundtrip(x):
            return F.dequantize_4bit(*F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True))

        survival = ((roundtrip(W + delta) - roundtrip(W)) * delta).sum() / delta.square().sum()
        assert record["nf4_survival"] == pytest.approx(survival.item(), rel=1e-4)
        assert record["relative_norm"] == pytest.approx((delta.norm() / W.norm()).item(), rel=1e-5)


def test_base_errors(llama_base):
    g = torch.Generator().manual_seed(0)
    wrong = Adapter({"model.layers.0.self_attn.q_proj": LoraModule(torch.randn(2, 16, generator=g), torch.randn(16, 2))})
    with pytest.raises(BaseMismatchError, match="shape"):
        spectrum(wrong, base=llama_base, device="cpu")
    with pytest.raises(UnknownModuleError, match="not_there"):
        spectrum(Adapter({"not_there": wrong["model.layers.0.self_attn.q_proj"]}), base=llama_base, device="cpu")
    with pytest.raises(InvalidArgumentError):
        spectrum(Adapter({}), device="cpu")


# --------------------------------------------------------------------------- comparison


def _with(adapter: Adapter, transform) -> Adapter:
    return adapter.with_modules({n: transform(m) for n, m in adapter.items()})


def test_comparison_constructed_cases():
    a = synthetic_adapter()
    negated = _with(a, lambda m: m.with_factors(-m.B, m.A, m.scale))
    result = compare_spectra([a, a, negated], device="cpu")
    same, opposite = result["comparison"]["pairs"][0], result["comparison"]["pairs"][1]
    assert (same["pair"], opposite["pair"]) == ([0, 1], [0, 2])
    for pair, sign in ((same, 1.0), (opposite, -1.0)):
        assert pair["cosine"] == pytest.approx(sign, abs=1e-6)
        for name, record in pair["modules"].items():
            if name == "lm_head":  # ΔW = 0: nothing to compare
                assert record["cosine"] is record["column_overlap"] is record["row_overlap"] is None
                continue
            assert record["cosine"] == pytest.approx(sign, abs=1e-6)
            assert record["column_overlap"] == pytest.approx(1.0, abs=1e-5)
            assert record["row_overlap"] == pytest.approx(1.0, abs=1e-5)
            assert len(record["column_cosines"]) == result["adapters"][0]["modules"][name]["numerical_rank"]
        assert "nearly orthogonal" not in pair["reading"]
    assert "opposing" in opposite["reading"]

    # B columns in disjoint coordinate blocks; A rows disjoint (row spaces orthogonal) or equal (row spaces shared)
    eye = torch.eye(16)
    first = Adapter({"m": LoraModule(eye[:4] * 2.0, eye[:, :4] + 0.1 * eye[:, 4:8])})
    orthogonal = Adapter({"m": LoraModule(eye[8:12], eye[:, 8:12])})
    shared_rows = Adapter({"m": LoraModule(eye[:4], eye[:, 12:16])})
    pairs = compare_spectra([first, orthogonal, shared_rows], device="cpu")["comparison"]["pairs"]
    assert pairs[0]["modules"]["m"]["column_overlap"] == pytest.approx(0.0, abs=1e-7)
    assert pairs[0]["modules"]["m"]["row_overlap"] == pytest.approx(0.0, abs=1e-7)
    assert pairs[0]["modules"]["m"]["cosine"] == pytest.approx(0.0, abs=1e-7)
    assert "nearly orthogonal" in pairs[0]["reading"]
    assert pairs[1]["modules"]["m"]["column_overlap"] == pytest.approx(0.0, abs=1e-7)
    assert pairs[1]["modules"]["m"]["row_overlap"] == pytest.approx(1.0, abs=1e-6)
    assert pairs[1]["modules"]["m"]["cosine"] == pytest.approx(0.0, abs=1e-7)


def test_comparison_matches_dense(llama_adapter, llama_adapter_r4):
    a, b = adaptools.load(llama_adapter), adaptools.load(llama_adapter_r4)
    pair = compare_spectra([a, b], device="cpu")["comparison"]["pairs"][0]
    assert set(pair["modules"]) == set(b.modules)
    assert pair["only_in_first"] == [n for n in a.modules if n not in b.modules] and pair["only_in_second"] == []
    total_inner = total_a = total_b = 0.0
    for name, record in pair["modules"].items():
        da, db = dense(a[name]), dense(b[name])
        inner = (da * db).sum().item()
        total_inner, total_a, total_b = total_inner + inner, total_a + da.square().sum(), total_b + db.square().sum()
        assert record["cosine"] == pytest.approx(inner / (da.norm() * db.norm()).item(), abs=1e-5)
        assert record["inner_product"] == pytest.approx(inner, rel=1e-4, abs=1e-7)
        Ua, _, Vha = torch.linalg.svd(da)
        Ub, _, Vhb = torch.linalg.svd(db)
        ka, kb = a[name].rank, b[name].rank
        for got, cosines, X, Y, n in ((record["column_overlap"], record["column_cosines"], Ua[:, :ka], Ub[:, :kb], da.shape[0]),
                                      (record["row_overlap"], record["row_cosines"], Vha[:ka].T, Vhb[:kb].T, da.shape[1])):
            M = X.T @ Y
            assert got == pytest.approx((M.square().sum() / min(ka, kb)).item(), abs=1e-5)
            torch.testing.assert_close(torch.tensor(cosines, dtype=torch.float64), torch.linalg.svdvals(M), atol=1e-5, rtol=0)
        assert record["column_overlap_chance"] == max(ka, kb) / da.shape[0]
    assert pair["cosine"] == pytest.approx(total_inner / math.sqrt(total_a * total_b), abs=1e-5)


def test_comparison_errors():
    a = synthetic_adapter()
    with pytest.raises(InvalidArgumentError):
        compare_spectra([a], device="cpu")
    other = Adapter({"conv_in": LoraModule(torch.randn(4, 7), torch.randn(5, 4))})
    with pytest.raises(ShapeMismatchError, match="conv_in"):
        compare_spectra([a, other], device="cpu")


# --------------------------------------------------------------------------- JSON


TOP_LEVEL = {"schema": str, "name": (str, type(None)), "format": str, "base_model": (str, type(None)),
             "base": (str, type(None)), "num_params": int, "modules": dict, "policies": list, "suggestion": dict}
MODULE = {"layer": (int, type(None)), "block": (str, type(None)), "module_type": str, "kind": str, "dora": bool,
          "shape": list, "rank": int, "params": int, "singular_values": list, "frobenius_norm": float,
          "spectral_norm": float, "effective_rank": float, "stable_rank": float, "numerical_rank": int,
          "energy_rank_90": int, "energy_rank_99": int, "base_frobenius_norm": (float, type(None)),
          "base_spectral_norm": (float, type(None)), "relative_norm": (float, type(None)),
          "relative_spectral_norm": (float, type(None)), "nf4_survival": (float, type(None))}
PAIR = {"pair": list, "names": list, "only_in_first": list, "only_in_second": list, "cosine": float,
        "mean_column_overlap": float, "mean_row_overlap": float, "mean_overlap_chance": float,
        "mean_cosine": float, "reading": str, "modules": dict}
PAIR_MODULE = {"column_overlap": float, "row_overlap": float, "cosine": float, "inner_product": float,
               "column_cosines": list, "row_cosines": list, "column_overlap_chance": float,
               "row_overlap_chance": float}


def check_keys(record: dict, expected: dict, documented: str) -> None:
    assert set(record) == set(expected)
    for key, kind in expected.items():
        value = record[key]
        assert isinstance(value, kind) and (kind is bool or not isinstance(value, bool)), key
        assert f"`{key}`" in documented, f"{key} is not in docs/spectrum.md"


def test_json_schema_is_documented_and_typed(llama_adapter, llama_adapter_r4, llama_base):
    documented = DOCS.read_text()
    result = spectrum(llama_adapter, base=llama_base, device="cpu")
    assert result["schema"] == "adaptools.spectrum/1" and f'`"{result["schema"]}"`' in documented
    check_keys(result, TOP_LEVEL, documented)
    for record in result["modules"].values():
        check_keys(record, MODULE, documented)
        assert all(isinstance(s, float) for s in record["singular_values"])
    for policy in result["policies"]:
        assert set(policy) == {"energy", "params", "fraction"}
        assert all(f"`{k}`" in documented for k in policy)
    assert set(result["suggestion"]) == {"energy", "params", "fraction", "text"}
    comparison = compare_spectra([llama_adapter, llama_adapter_r4], device="cpu")
    assert set(comparison) == {"schema", "adapters", "comparison"} and set(comparison["comparison"]) == {"pairs"}
    for pair in comparison["comparison"]["pairs"]:
        check_keys(pair, PAIR, documented)
        for record in pair["modules"].values():
            check_keys(record, PAIR_MODULE, documented)
    assert json.loads(json.dumps(comparison)) == comparison  # plain JSON data, no NaN


def test_pandas_frame():
    pd = pytest.importorskip("pandas")
    result = spectrum(synthetic_adapter(), device="cpu")
    frame = pd.DataFrame.from_dict(result["modules"], orient="index")
    assert list(frame.index) == list(result["modules"])
    assert frame["effective_rank"].tolist() == [r["effective_rank"] for r in result["modules"].values()]


def test_cli_json_equals_api_and_refuses_existing(runner, llama_adapter, tmp_path):
    out = tmp_path / "spectrum.json"
    res = run_cli(runner, "spectrum", llama_adapter, "--json", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text()) == spectrum(llama_adapter, device="cpu")
    before = out.read_text()
    res = run_cli(runner, "spectrum", llama_adapter, "--json", out)
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "already exists" in res.stderr
    assert out.read_text() == before
    out.write_text("old")
    assert run_cli(runner, "spectrum", llama_adapter, "--json", out, "--overwrite").exit_code == 0
    assert json.loads(out.read_text())["modules"]
    res = run_cli(runner, "spectrum", llama_adapter, "--json", "-")
    assert res.exit_code == 0 and json.loads(res.stdout) == json.loads(out.read_text())


# --------------------------------------------------------------------------- plot


def panels(fig) -> int:
    return len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"])


def test_plot_png_size_and_panels(runner, llama_adapter, llama_adapter_r4, tmp_path):
    imread = pytest.importorskip("matplotlib.image").imread
    from adaptools.spectrum_plot import spectrum_figure

    out = tmp_path / "spectrum.png"
    res = run_cli(runner, "spectrum", llama_adapter, "--plot", out)
    assert res.exit_code == 0, res.output
    result = spectrum(llama_adapter, device="cpu")
    fig = spectrum_figure(result)
    assert panels(fig) == len(LLAMA_TARGETS) + 1  # energy curves per module type + the heatmap
    width, height = fig.get_size_inches() * fig.dpi
    image = imread(out)
    assert image.shape == (round(height), round(width), 4) and image[..., :3].std() > 0.05

    comparison = compare_spectra([llama_adapter, llama_adapter_r4, llama_adapter], device="cpu")
    assert panels(spectrum_figure(comparison)) == len(LLAMA_TARGETS) + 3  # + one overlap heatmap per pair
    assert run_cli(runner, "spectrum", llama_adapter, "--plot", out).exit_code == 2  # exists
    res = run_cli(runner, "spectrum", llama_adapter, llama_adapter_r4, "--plot", out, "--overwrite")
    assert res.exit_code == 0 and imread(out).shape[2] == 4


def test_plot_without_matplotlib(runner, llama_adapter, tmp_path, monkeypatch):
    from adaptools.spectrum_plot import spectrum_figure

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(InvalidArgumentError, match=re.escape("adaptools[plot]")):
        spectrum_figure(spectrum(synthetic_adapter(), device="cpu"))
    res = run_cli(runner, "spectrum", llama_adapter, "--plot", tmp_path / "x.png")
    assert res.exit_code == 2 and "matplotlib" in res.stderr and not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- terminal output


def test_cli_tables(runner, llama_adapter, gpt2_adapter, tmp_path):
    res = run_cli(runner, "spectrum", llama_adapter, "--top", "2")
    assert res.exit_code == 0, res.output
    result = spectrum(llama_adapter, device="cpu")
    lines = res.stdout.splitlines()
    header = next(line for line in lines if line.startswith("layer "))
    assert header.split()[1:] == list(dict.fromkeys(r["module_type"].split(".")[1] for r in result["modules"].values()))
    assert sorted(header.split()[1:]) == sorted(LLAMA_TARGETS)
    row0 = lines[lines.index(header) + 2].split()
    assert row0[0] == "0" and float(row0[1]) == pytest.approx(
        result["modules"]["model.layers.0.mlp.down_proj"]["effective_rank"], abs=0.006)
    assert lines[-1] == "suggestion: " + result["suggestion"]["text"]
    assert "top 2 modules" in res.stdout

    res = run_cli(runner, "spectrum", gpt2_adapter)
    header = next(line for line in res.stdout.splitlines() if line.startswith("layer "))
    assert sorted(header.split()[1:]) == ["attn.c_proj", "c_attn", "c_fc", "mlp.c_proj"]

    path = tmp_path / "flat"
    synthetic_adapter().with_modules({k: v for k, v in synthetic_adapter().items() if "layers" not in k}).save(path)
    res = run_cli(runner, "spectrum", path, "--top", "0")
    assert res.exit_code == 0, res.output
    rows = {line.split()[0] for line in res.stdout.splitlines() if line.split()}
    assert {"conv_in", "embed", "lm_head"} <= rows and "top" not in res.stdout


def test_cli_comparison(runner, llama_adapter, llama_adapter_r4):
    res = run_cli(runner, "spectrum", llama_adapter, llama_adapter_r4, "--top", "1")
    assert res.exit_code == 0, res.output
    pair = compare_spectra([llama_adapter, llama_adapter_r4], names=["r8", "r4"], device="cpu")["comparison"]["pairs"][0]
    assert "r8 vs r4: 6 shared modules (only in r8: 8, only in r4: 0)" in res.stdout
    assert f"reading: {pair['reading']}" in res.stdout
    assert "top 1 modules by |cosine|" in res.stdout
    res = run_cli(runner, "spectrum", llama_adapter, "--device", "nonsense")
    assert res.exit_code == 2 and res.stderr.startswith("error: ")
