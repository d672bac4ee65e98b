"""PEFT output layouts (DESIGN §13): from the WRITTEN files, the ΔW each consumer's documented scale rule gives
equals PEFT's own get_delta_weight of the same files for the portable layout (the default), for every command
that writes PEFT; the compact layout is misread by the consumers that ignore rank patterns. llama.cpp's own
converter and diffusers' own config builder are run where they apply; padding and serving ranks are checked.
"""
from __future__ import annotations

import collections
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import load_base, make_peft_adapter, peft_delta_weights, peft_model, tuned_copy
from safetensors.torch import load_file, save_file

import adaptools
from adaptools import Adapter, InvalidArgumentError, LoraModule
from adaptools.formats.kohya import kohya_name
from adaptools.formats.layout import padding_cost, serving_rank, target_rank, uniform_rank, written_layout
from conftest import run_cli
from llama_cpp import llama_cpp_tree

pytestmark = pytest.mark.usefixtures("single_thread")

PREFIX = "base_model.model."
ROOT = Path(__file__).resolve().parents[1]

# Two adapters with other ranks, scales (alpha/r = 2, rsLoRA 8/√16 = 2) and partly other modules: o_proj in both.
ADAPTER_A = dict(r=8, lora_alpha=16, target_modules=["v_proj", "o_proj", "up_proj"])
ADAPTER_B = dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["o_proj", "down_proj"])


# --- the consumers' rules, applied to the written files -------------------------------------------------------

def read_written(folder: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(adapter_config.json, {module: {"A", "B"}} in file order, the raw state dict) of a written PEFT folder."""
    config = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(folder / "adapter_model.safetensors")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        for suffix, role in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if key.endswith(suffix):
                factors.setdefault(key.removeprefix(PREFIX).removesuffix(suffix), {})[role] = tensor
    return config, factors, state


def pattern(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key with re.match(rf"(.*\\.)?({key})$", module)."""
    return next((v for k, v in (patterns or {}).items() if re.match(rf"(.*\.)?({k})$", module)), default)


def peft_rule(config: dict, factors: dict) -> dict[str, float]:
    """PEFT and vLLM >= 0.32: alpha_m / r_m from the patterns (alpha / sqrt(r) with rsLoRA)."""
    scales = {}
    for m in factors:
        r = pattern(config.get("rank_pattern"), m, config["r"])
        alpha = pattern(config.get("alpha_pattern"), m, config["lora_alpha"])
        scales[m] = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    return scales


def llama_cpp_rule(config: dict, factors: dict) -> dict[str, float]:
    """llama.cpp: the converter writes the one lora_alpha; the runtime divides it by each tensor's rank (b->ne[0])."""
    return {m: config["lora_alpha"] / f["A"].shape[0] for m, f in factors.items()}


def global_rule(config: dict, factors: dict) -> dict[str, float]:
    """TGI, LoRAX, vLLM <= 0.31: the config's lora_alpha / r for every module, patterns ignored."""
    return {m: config["lora_alpha"] / config["r"] for m in factors}


def mlx_rule(config: dict, factors: dict) -> dict[str, float] | None:
    """mlx-lm: one rank and one scale (lora_alpha / r) for every layer; mixed tensor ranks are rejected (None)."""
    if {f["A"].shape[0] for f in factors.values()} != {config["r"]}:
        return None
    return {m: config["lora_alpha"] / config["r"] for m in factors}


def diffusers_kwargs(state: dict[str, torch.Tensor], before_040: bool) -> dict:
    """diffusers' own LoraConfig kwargs for a state dict without metadata (diffusers.utils.peft_utils.get_peft_kwargs,
    fed as diffusers' loader feeds it). diffusers < 0.40 did not mirror the ranks into alpha_pattern: lora_alpha
    was the rank of the first lora_B key for every module."""
    from diffusers.utils.peft_utils import get_peft_kwargs

    state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    ranks = {f"^{k}": v.shape[1] for k, v in state.items() if "lora_B" in k and v.ndim > 1}
    kwargs = get_peft_kwargs(ranks, None, state)
    if before_040:
        kwargs.update(lora_alpha=next(iter(ranks.values())), alpha_pattern={})
    return kwargs


def diffusers_deltas(base: Path, state: dict[str, torch.Tensor], before_040: bool) -> dict[str, torch.Tensor]:
    """ΔW of PEFT layers injected with diffusers' config and loaded with the state dict (as diffusers' loader does)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    model = load_base(base)
    inject_adapter_in_model(LoraConfig(**diffusers_kwargs(state, before_040)), model)
    set_peft_model_state_dict(model, {k.removeprefix(PREFIX): v for k, v in state.items()})
    return peft_delta_weights(model)


RULES = {"llama.cpp": llama_cpp_rule, "tgi/lorax/vllm<=0.31": global_rule, "vllm>=0.32": peft_rule, "mlx-lm": mlx_rule}


def consumer_deltas(base: Path, folder: Path) -> dict[str, dict[str, torch.Tensor] | None]:
    """{consumer: {module: ΔW}} from the written files (None: the consumer rejects the files)."""
    config, factors, state = read_written(folder)
    deltas: dict[str, dict[str, torch.Tensor] | None] = {}
    for consumer, rule in RULES.items():
        scales = rule(config, factors)
        deltas[consumer] = None if scales is None else {m: scales[m] * f["B"] @ f["A"] for m, f in factors.items()}
    deltas["diffusers>=0.40"] = diffusers_deltas(base, state, before_040=False)
    deltas["diffusers<0.40"] = diffusers_deltas(base, state, before_040=True)
    return deltas


def same(got: dict[str, torch.Tensor] | None, want: dict[str, torch.Tensor]) -> bool:
    """Every module's ΔW equal (float32 rounding)."""
    return got is not None and got.keys() == want.keys() and all(
        torch.allclose(got[m], want[m], rtol=1e-5, atol=1e-6) for m in want
    )


# --- the outputs: one per command that writes PEFT ----------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(llama_base, tmp_path_factory) -> dict[str, Path]:
    """a (r8), b (r16, rsLoRA), their exact sum c (ranks 8, 16, 24: the rerank input), a hand-made kohya file with
    its own rank and alpha per module, and a DoRA adapter."""
    root = tmp_path_factory.mktemp("layout_inputs")
    a = make_peft_adapter(llama_base, root / "a", seed=1, **ADAPTER_A)
    b = make_peft_adapter(llama_base, root / "b", seed=2, **ADAPTER_B)
    adaptools.combine([adaptools.load(a), adaptools.load(b)], [1.0, 1.0]).save(root / "c", layout="compact")
    generator = torch.Generator().manual_seed(5)
    kohya = {}
    for module, (rank, alpha, out, inp) in {"model.layers.0.self_attn.v_proj": (4, 1.0, 16, 32),
                                           "model.layers.1.self_attn.o_proj": (8, 16.0, 32, 32),
                                           "model.layers.1.mlp.down_proj": (2, 3.0, 32, 48)}.items():
        name = kohya_name(module)
        kohya[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=generator) * 0.1
        kohya[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=generator) * 0.1
        kohya[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(kohya, root / "kohya.safetensors")
    dora = make_peft_adapter(llama_base, root / "dora", seed=3, r=4, lora_alpha=8, use_dora=True,
                             target_modules=["v_proj", "o_proj", "down_proj"])
    tuned = tuned_copy(llama_base, root / "tuned", skip=("embed_tokens", "lm_head", "norm"))  # linear weights moved
    return {"a": a, "b": b, "c": root / "c", "kohya": root / "kohya.safetensors", "dora": dora, "tuned": tuned}


def threshold(c: Path) -> float:
    """A singular-value threshold in the middle of c's spectra (some modules keep more values than others)."""
    values = torch.cat([torch.linalg.svdvals(adaptools.load(c).delta(m)) for m in adaptools.load(c)])
    return float(values[values > 1e-6].median())


def command(kind: str, paths: dict[str, Path], base: Path) -> tuple[list[str], Adapter]:
    """(CLI arguments, the API's in-memory result) of one kind of output."""
    c = adaptools.load(paths["c"])
    if kind == "combine":
        return (["combine", paths["a"], paths["b"], "--weights", "0.5,0.5"],
                adaptools.combine([adaptools.load(paths["a"]), adaptools.load(paths["b"])], [0.5, 0.5]))
    if kind.startswith("rerank-"):
        policy = kind.removeprefix("rerank-")
        value = {"rank": 12, "energy": 0.9, "ratio": 3.0, "threshold": threshold(paths["c"]),
                 "budget": c.num_params // 2}[policy]
        return ["rerank", paths["c"], f"--{policy}", str(value)], adaptools.rerank(c, **{policy: value})[0]
    if kind == "convert":
        return (["convert", paths["kohya"], "--to", "peft", "--base", base],
                adaptools.load(paths["kohya"], base=base))
    if kind == "extract":
        return (["extract", base, paths["tuned"], "--energy", "0.9"],
                adaptools.extract(base, paths["tuned"], energy=0.9)[0])
    if kind == "to-lora":
        return (["dora", "to-lora", paths["dora"], "--base", base, "--energy", "0.95"],
                adaptools.to_lora(adaptools.load(paths["dora"]), base, energy=0.95)[0])
    raise AssertionError(kind)


KINDS = ["combine", "rerank-rank", "rerank-energy", "rerank-ratio", "rerank-threshold", "rerank-budget", "convert",
         "to-lora", "extract"]


@pytest.fixture(scope="module")
def outputs(inputs, llama_base, tmp_path_factory):
    """written(kind, *layout_args) -> (output folder, the API's result), written once by the CLI."""
    root = tmp_path_factory.mktemp("layout_outputs")
    cache: dict[tuple, tuple[Path, Adapter]] = {}

    def written(kind: str, *layout_args: str) -> tuple[Path, Adapter]:
        if (kind, *layout_args) not in cache:
            from click.testing import CliRunner

            args, expected = command(kind, inputs, llama_base)
            folder = root / "-".join([kind, *layout_args]).replace("--", "")
            result = run_cli(CliRunner(), *args, *layout_args, "-o", folder)
            assert result.exit_code == 0, result.output + result.stderr
            cache[(kind, *layout_args)] = folder, expected
        return cache[(kind, *layout_args)]

    return written


@pytest.mark.parametrize("kind", KINDS)
def test_every_consumer_reads_the_default_output_as_peft_does(kind, outputs, llama_base):
    folder, expected = outputs(kind)
    config, factors, _ = read_written(folder)
    rank = max(m.rank for _, m in expected.items())
    assert {f["A"].shape[0] for f in factors.values()} == {rank} and config["r"] == config["lora_alpha"] == rank
    assert not config["rank_pattern"] and not config["alpha_pattern"] and config["use_rslora"] is False

    reference = peft_delta_weights(peft_model(llama_base, folder))
    assert same(reference, {m: module.delta() for m, module in expected.items()})
    for consumer, deltas in consumer_deltas(llama_base, folder).items():
        assert same(deltas, reference), consumer


@pytest.mark.parametrize("kind", KINDS)
def test_compact_output_is_misread_by_every_consumer_that_ignores_rank_patterns(kind, outputs, llama_base):
    """Documents why compact is not the default: on mixed ranks only PEFT, vLLM >= 0.32, diffusers >= 0.40 and
    (because every scale written is 1) TGI/LoRAX/vLLM <= 0.31 get it right; llama.cpp scales each module by
    r / r_m, diffusers < 0.40 by r_first / r_m, and mlx-lm refuses the file."""
    folder, expected = outputs(kind, "--layout", "compact")
    _, factors, _ = read_written(folder)
    assert len({f["A"].shape[0] for f in factors.values()}) > 1  # mixed ranks: the case that matters
    assert {m: f["A"].shape[0] for m, f in factors.items()} == {m: module.rank for m, module in expected.items()}

    reference = peft_delta_weights(peft_model(llama_base, folder))
    assert same(reference, {m: module.delta() for m, module in expected.items()})
    misread = {consumer for consumer, deltas in consumer_deltas(llama_base, folder).items() if not same(deltas, reference)}
    assert misread == {"llama.cpp", "diffusers<0.40", "mlx-lm"}


def test_serving_rank_pads_to_the_smallest_rank_vllm_takes(outputs, llama_base):
    folder, expected = outputs("combine", "--serve", "vllm")  # ranks 8, 16, 24 -> 32
    config, factors, _ = read_written(folder)
    assert config["r"] == config["lora_alpha"] == 32 and {f["A"].shape[0] for f in factors.values()} == {32}
    reference = peft_delta_weights(peft_model(llama_base, folder))
    assert same(reference, {m: module.delta() for m, module in expected.items()})
    assert all(same(deltas, reference) for deltas in consumer_deltas(llama_base, folder).values())

    folder, _ = outputs("combine", "--pad-rank", "40")
    assert read_written(folder)[0]["r"] == 40


def test_padding_cost_is_said_when_notable(inputs, tmp_path, runner):
    args, expected = command("combine", inputs, None)
    res = run_cli(runner, *args, "-o", tmp_path / "portable")
    assert res.exit_code == 0, res.output + res.stderr
    assert "serve it with" not in res.output
    cost = padding_cost(expected)
    portable = sum(t.numel() for t in load_file(tmp_path / "portable" / "adapter_model.safetensors").values())
    assert portable == expected.num_params + cost.params_added and cost.notable
    said = f"padded to rank 24: +{cost.params_added:,} parameters, +{cost.bytes_added / 1e6:.2f} MB"
    assert f"{said} (+{100 * cost.fraction:.0f}%) for portability" in res.output

    res = run_cli(runner, "rerank", inputs["a"], "--rank", "8", "-o", tmp_path / "uniform")  # nothing to pad
    assert res.exit_code == 0 and "padded" not in res.output

    res = run_cli(runner, "rerank", inputs["a"], "--rank", "8", "--serve", "vllm", "-o", tmp_path / "served")
    assert res.exit_code == 0 and "padded" not in res.output and "serve it with vllm --max-lora-rank 8" in res.output


@pytest.mark.parametrize(("args", "message"), [
    (["--pad-rank", "16"], "has rank 24, above the requested rank 16: bring it down with `adaptools rerank --rank 16`"),
    (["--serve", "vllm", "--pad-rank", "48"], "vllm serves adapters of rank 1, 8, 16, 32, 64, 128, 256, 320, 512"),
    (["--layout", "compact", "--serve", "vllm"], "padding to one rank is the portable layout"),
    (["--format", "kohya", "--layout", "compact"], "kohya files keep each module's rank and alpha"),
    (["--format", "kohya", "--pad-rank", "32"], "apply to PEFT, mlx and diffusers outputs only"),
])
def test_layout_mistakes_are_one_error_line_and_no_output(args, message, inputs, tmp_path, runner):
    res = run_cli(runner, "combine", inputs["a"], inputs["b"], *args, "-o", tmp_path / "out")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")
    assert message in res.stderr
    assert not (tmp_path / "out").exists()


def test_kohya_output_keeps_each_modules_rank_and_alpha(inputs, llama_base, tmp_path, runner):
    res = run_cli(runner, "combine", inputs["a"], inputs["b"], "--format", "kohya", "-o", tmp_path / "k.safetensors")
    assert res.exit_code == 0, res.output + res.stderr
    state = load_file(tmp_path / "k.safetensors")
    ranks = {k.removesuffix(".lora_down.weight"): v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight")}
    assert sorted(set(ranks.values())) == [8, 16, 24]  # not padded
    expected = adaptools.combine([adaptools.load(inputs["a"]), adaptools.load(inputs["b"])], [1.0, 1.0])
    back = adaptools.load(tmp_path / "k.safetensors", base=llama_base)
    assert same({m: back.delta(m) for m in back}, {m: expected.delta(m) for m in expected})


def test_padding_keeps_dora_magnitudes_and_peft_outputs(inputs, llama_base, tmp_path, runner):
    """to-dora of the mixed-rank sum c: the portable DoRA adapter (padded) gives PEFT the same logits as the compact one."""
    from factories import peft_logits

    for layout in ("portable", "compact"):
        res = run_cli(runner, "dora", "to-dora", inputs["c"], "--base", llama_base, "--layout", layout,
                      "-o", tmp_path / layout)
        assert res.exit_code == 0, res.output + res.stderr
    portable, compact = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("portable", "compact"))
    magnitudes = [k for k in compact if k.endswith("lora_magnitude_vector")]
    assert magnitudes and all(torch.equal(portable[k], compact[k]) for k in magnitudes)
    assert {v.shape[0] for k, v in portable.items() if k.endswith("lora_A.weight")} == {24}
    torch.testing.assert_close(peft_logits(llama_base, tmp_path / "portable"), peft_logits(llama_base, tmp_path / "compact"),
                               rtol=1e-5, atol=1e-5)


# --- the API: uniform_rank and friends -----------------------------------------------------------------------

def module(rank: int, scale: float = 1.0, out: int = 6, inp: int = 5, seed: int = 0, **extra) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(A=torch.randn(rank, inp, generator=g), B=torch.randn(out, rank, generator=g), scale=scale, **extra)


def test_uniform_rank_keeps_delta_magnitude_and_bias():
    adapter = Adapter({"x": module(2, 0.5, magnitude=torch.rand(6) + 1, bias=torch.randn(6)),
                       "y": module(5, 3.0, seed=1), "c": module(3, 2.0, out=4, inp=18, kind="conv", kernel=(3, 3))})
    padded = uniform_rank(adapter, 7)
    assert padded.ranks == {"x": 7, "y": 7, "c": 7} and {m.scale for _, m in padded.items()} == {1.0}
    for name, m in adapter.items():
        torch.testing.assert_close(padded.delta(name), m.delta())
    assert torch.equal(padded["x"].magnitude, adapter["x"].magnitude)
    torch.testing.assert_close(padded["x"].bias, 0.5 * adapter["x"].bias)  # the scale goes with B
    cost = padding_cost(adapter, 7)
    assert cost.params_added == padded.num_params - adapter.num_params and cost.bytes_added == 4 * cost.params_added
    assert uniform_rank(adapter).ranks == {"x": 5, "y": 5, "c": 5}
    with pytest.raises(InvalidArgumentError, match="rerank --rank 4"):
        uniform_rank(adapter, 4)


@pytest.mark.parametrize(("top", "expected"), [(1, 1), (2, 8), (8, 8), (9, 16), (300, 320), (321, 512), (512, 512)])
def test_serving_rank_is_the_smallest_vllm_max_lora_rank_that_fits(top, expected):
    adapter = Adapter({"x": module(1), "y": module(top, out=2, inp=2)})
    assert serving_rank(adapter, "vllm") == target_rank(adapter, serve="vllm") == expected


def test_serving_rank_refuses_ranks_vllm_cannot_serve_and_unknown_servers():
    adapter = Adapter({"x": module(513, out=2, inp=2)})
    with pytest.raises(InvalidArgumentError, match="above the largest rank vllm serves, 512: .*rerank --rank 512"):
        serving_rank(adapter, "vllm")
    with pytest.raises(InvalidArgumentError, match="unknown server"):
        serving_rank(adapter, "tgi")


def test_written_layout_api():
    adapter = Adapter({"x": module(2), "y": module(4, 2.0)})
    assert written_layout(adapter, "peft", "compact") is adapter
    assert written_layout(adapter, "kohya") is adapter
    assert written_layout(adapter, "peft").ranks == {"x": 4, "y": 4}
    for kwargs in (dict(layout="compact"), dict(pad_rank=8)):
        with pytest.raises(InvalidArgumentError, match="PEFT, mlx and diffusers outputs only"):
            written_layout(adapter, "kohya", **kwargs)
    assert written_layout(adapter, "mlx", pad_rank=8).ranks == {"x": 8, "y": 8}
    with pytest.raises(InvalidArgumentError, match="one rank for every module"):
        written_layout(adapter, "mlx", "compact")
    with pytest.raises(InvalidArgumentError, match="unknown layout"):
        written_layout(adapter, "peft", "dense")


def test_save_api_writes_portable_by_default_and_compact_on_request(tmp_path):
    adapter = Adapter({"model.x": module(2), "model.y": module(4, 2.0)})
    adapter.save(tmp_path / "portable")
    adaptools.save_adapter(adapter, tmp_path / "compact", layout="compact")
    adapter.save(tmp_path / "served", pad_rank=8)
    assert json.loads((tmp_path / "portable" / "adapter_config.json").read_text())["r"] == 4
    compact = json.loads((tmp_path / "compact" / "adapter_config.json").read_text())
    assert len(compact["rank_pattern"]) == 1 and compact["rank_pattern"] == compact["alpha_pattern"]
    assert json.loads((tmp_path / "served" / "adapter_config.json").read_text())["r"] == 8
    for name in ("portable", "compact", "served"):
        back = adaptools.load(tmp_path / name)
        assert same({m: back.delta(m) for m in back}, {m: adapter.delta(m) for m in adapter})


# --- llama.cpp's own converter -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def llama_cpp_converter() -> Path:
    """convert_lora_to_gguf.py from the llama-cpp-python sdist (tests/llama_cpp.py)."""
    return llama_cpp_tree() / "convert_lora_to_gguf.py"


def gguf_deltas(converter: Path, base: Path, folder: Path, gguf_file: Path) -> dict[str, torch.Tensor]:
    """Run llama.cpp's converter on `folder`, read the GGUF back with gguf.GGUFReader and apply llama.cpp's runtime
    rule (llama_adapter_lora_weight::get_scale: alpha ? alpha / b->ne[0] : 1) to each lora_a / lora_b pair."""
    gguf = pytest.importorskip("gguf")
    run = subprocess.run([sys.executable, str(converter), "--base", str(base), "--outtype", "f32",
                          "--outfile", str(gguf_file), str(folder)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    reader = gguf.GGUFReader(gguf_file)
    field = reader.fields[gguf.Keys.Adapter.LORA_ALPHA]
    alpha = float(field.parts[field.data[0]][0])
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    deltas = {}
    for name, a in tensors.items():
        if name.endswith(".lora_a"):
            b = tensors[name.removesuffix(".lora_a") + ".lora_b"]
            rank = b.shape[-1]  # ne[0] of lora_b: GGUF lists dimensions innermost first, numpy outermost first
            deltas[name.removesuffix(".weight.lora_a")] = (alpha / rank if alpha else 1.0) * b @ a
    return deltas


@pytest.mark.parametrize("kind", ["combine", "rerank-energy"])
def test_llama_cpp_converter_reads_portable_right_and_compact_wrong(kind, llama_cpp_converter, outputs, llama_base,
                                                                   tmp_path):
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)  # no q/k_proj: llama.cpp permutes their rows
    for layout_args, right in (((), True), (("--layout", "compact"), False)):
        folder, expected = outputs(kind, *layout_args)
        reference = peft_delta_weights(peft_model(llama_base, folder))
        got = gguf_deltas(llama_cpp_converter, llama_base, folder, tmp_path / f"{folder.name}.gguf")
        assert sorted(got) == sorted(names.get_name(m) for m in reference)
        agree = {m: torch.allclose(got[names.get_name(m)], reference[m], rtol=1e-5, atol=1e-6) for m in reference}
        if right:
            assert all(agree.values())
        else:  # compact: lora_alpha is the most common rank, every other module is scaled by r / r_m
            common = collections.Counter(m.rank for _, m in expected.items()).most_common(1)[0][0]
            assert agree == {m: module.rank == common for m, module in expected.items()}
            assert not all(agree.values())
