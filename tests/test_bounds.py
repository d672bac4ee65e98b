"""Small files never cost big (issue 21): expansions of LoHa/LoKr/Tucker factors, padded layouts, .npz members and
file patterns are bounded from shapes before anything is allocated (adaptools.bounds, adaptools.patterns); a memory
guard runs the bombs in a subprocess under an address-space limit."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

import adaptools
from adaptools import bounds
from adaptools.errors import AdapterFormatError
from adaptools.patterns import MAX_STEPS, UnsafePattern, first_match, peft_rule

pytestmark = pytest.mark.usefixtures("single_thread")

P = "base_model.model."


def one_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.output
    return result.stderr


# --------------------------------------------------------------------------- bomb files (made by code)


def loha_bomb(path: Path, rank: int = 4096, size: int = 16) -> Path:
    """A LoHa module of shape (size, size) whose exact factors would have rank rank²."""
    g = torch.Generator().manual_seed(0)
    save_file({f"lora_unet_x.hada_w{i}_{s}": torch.randn(*shape, generator=g)
               for i in (1, 2) for s, shape in (("a", (size, rank)), ("b", (rank, size)))}, path)
    return path


def lokr_bomb(path: Path, rank: int = 4096, size: int = 4) -> Path:
    """A LoKr module (size², size²) whose decomposed factors have rank `rank` each."""
    g = torch.Generator().manual_seed(1)
    save_file({f"lora_unet_x.lokr_w{i}_{s}": torch.randn(*shape, generator=g)
               for i in (1, 2) for s, shape in (("a", (size, rank)), ("b", (rank, size)))}, path)
    return path


def lokr_full_bomb(path: Path, side: int = 256) -> Path:
    """Two full (side, side) LoKr factors: a (side², side²) ΔW of side⁴ numbers from 2·side² stored."""
    save_file({"lora_unet_x.lokr_w1": torch.randn(side, side), "lora_unet_x.lokr_w2": torch.randn(side, side)}, path)
    return path


def tucker_bomb(path: Path) -> Path:
    """A LoCon Tucker core whose kernel (256x256) times lora_down's inputs (65,536) is 2^32 numbers of A."""
    save_file({"lora_unet_x.lora_down.weight": torch.randn(1, 65536, 1, 1),
               "lora_unet_x.lora_mid.weight": torch.randn(1, 1, 256, 256),
               "lora_unet_x.lora_up.weight": torch.randn(4, 1, 1, 1)}, path)
    return path


def npz_bomb(path: Path, side: int = 16384) -> Path:
    """One deflated member of side² float32 zeros (1 GiB at the default) in an archive of about 1 MB."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros((side, side), np.float32))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model.layers.0.q_proj.lora_a.npy", buf.getvalue())
    return path


def redos_adapter(folder: Path, pattern: str = "(a+)+b") -> Path:
    """A PEFT folder with a module named a…a (32) and a rank_pattern key that backtracks exponentially on it."""
    folder.mkdir()
    module = "a" * 32
    save_file({f"{P}{module}.lora_A.weight": torch.randn(4, 4), f"{P}{module}.lora_B.weight": torch.randn(4, 4)},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                            "rank_pattern": {pattern: 4}}))
    return folder


# --------------------------------------------------------------------------- expansion


def test_loha_with_a_rank_above_its_shape_is_read_densely_and_exactly(tmp_path):
    path = loha_bomb(tmp_path / "loha.safetensors", rank=64, size=6)
    stored = load_file(path)
    module = adaptools.load(path)["lora_unet_x"]
    assert module.rank == 6  # min(out, in), not 64² = 4096
    w = {k.split(".")[-1]: v.double() for k, v in stored.items()}
    expected = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
    torch.testing.assert_close(module.delta(torch.float64), expected * module.scale, rtol=1e-5, atol=1e-5)


def test_lokr_with_a_rank_above_its_shape_is_read_densely_and_exactly(tmp_path):
    path = lokr_bomb(tmp_path / "lokr.safetensors", rank=8, size=3)
    w = {k.split(".")[-1]: v.double() for k, v in load_file(path).items()}
    module = adaptools.load(path)["lora_unet_x"]
    assert module.rank == 9  # min(9, 9) instead of 8·8 = 64
    expected = torch.kron(w["lokr_w1_a"] @ w["lokr_w1_b"], w["lokr_w2_a"] @ w["lokr_w2_b"])
    torch.testing.assert_close(module.delta(torch.float64), expected * module.scale, rtol=1e-5, atol=1e-5)


def test_a_lycoris_loha_on_a_narrow_layer_still_gives_lycoris_own_delta(tmp_path):
    """LyCORIS's own forward is the reference: rank 5·5 = 25 on the 32→8 point conv is read densely (rank 8)."""
    from test_lycoris import lycoris_delta, lycoris_network

    base, _, network = lycoris_network(algo="loha", linear_dim=5, conv_dim=5)
    path = tmp_path / "loha.safetensors"
    network.save_weights(str(path), torch.float32, {})
    adapter = adaptools.load(path)
    assert adapter["lycoris_point"].rank == 8 and adapter["lycoris_lin0"].rank == 16
    for lora in network.loras:
        layer = getattr(base, lora.lora_name.removeprefix("lycoris_"))
        expected = lycoris_delta(lora, layer)
        torch.testing.assert_close(adapter[lora.lora_name].delta().reshape(expected.shape), expected,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [lokr_full_bomb, tucker_bomb], ids=["lokr-full", "tucker-locon"])
def test_an_expansion_beyond_the_bound_is_one_error_before_allocating(make, tmp_path, runner):
    path = make(tmp_path / "bomb.safetensors")
    with pytest.raises(AdapterFormatError, match="lora_unet_x"):
        adaptools.load(path)
    assert "per stored number" in one_error(run_cli(runner, "info", path))


def test_the_expansion_bound_grows_with_what_the_file_stores():
    assert bounds.expansion_limit(10) == bounds.EXPANSION_FLOOR
    assert bounds.expansion_limit(10**6) == bounds.EXPANSION_FACTOR * 10**6
    assert bounds.exact_fits(8, 8, 100) and not bounds.exact_fits(9, 8, 100)
    assert bounds.expanded_numbers(9, 8, 100) == 2 * 8 * 100 + 8**2


# --------------------------------------------------------------------------- archives


def test_a_compression_bomb_npz_is_refused_before_decompressing(tmp_path, runner):
    path = npz_bomb(tmp_path / "adapters.npz", side=4096)  # 64 MiB of zeros in ~65 kB
    assert "decompress to" in one_error(run_cli(runner, "info", path, "--scale", "1"))


def test_an_npz_member_whose_header_disagrees_with_its_size_is_refused(tmp_path, runner):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros((4, 2), np.float32))
    data = buf.getvalue().replace(b"(4, 2)", b"(9, 2)")  # same header length, other shape
    with zipfile.ZipFile(tmp_path / "adapters.npz", "w") as archive:
        archive.writestr("m.lora_a.npy", data)
        archive.writestr("m.lora_b.npy", data)
    assert "declares shape (9, 2)" in one_error(run_cli(runner, "info", tmp_path / "adapters.npz", "--scale", "1"))


# --------------------------------------------------------------------------- padding


def test_portable_padding_beyond_the_growth_bound_falls_back_to_compact(tmp_path, runner):
    source = tmp_path / "big-rank"
    source.mkdir()
    save_file({f"{P}a.lora_A.weight": torch.randn(65536, 1), f"{P}a.lora_B.weight": torch.randn(1, 65536),
               f"{P}b.lora_A.weight": torch.randn(8, 512), f"{P}b.lora_B.weight": torch.randn(512, 8)},
              source / "adapter_model.safetensors")  # 1 MB; padded to rank 65,536: +268 MB
    (source / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8,
                                                            "rank_pattern": {"a": 65536}}))
    result = run_cli(runner, "convert", source, "--to", "peft", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "writing the compact layout instead" in result.stderr and "%" not in result.stdout
    written = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert written[f"{P}b.lora_A.weight"].shape == (8, 512)  # not padded to 65,536
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["rank_pattern"]
    error = one_error(run_cli(runner, "convert", source, "--to", "mlx", "-o", tmp_path / "m"))
    assert "would grow the adapter" in error and not (tmp_path / "m").exists()


def test_small_adapters_are_always_padded(tmp_path):
    """Growth beyond 16x that adds under 64 MiB is still the portable layout (one rank for every consumer)."""
    from adaptools.formats.layout import growth_refusal

    modules = {f"m{i}": adaptools.LoraModule(torch.randn(1, 32), torch.randn(32, 1)) for i in range(100)}
    modules["big"] = adaptools.LoraModule(torch.randn(512, 32), torch.randn(32, 512))
    small = adaptools.Adapter(modules)  # padding to 512 grows it 84x, by 13 MB
    assert growth_refusal(small, None) is None
    assert "would grow" in growth_refusal(small.with_modules({**modules, "big": adaptools.LoraModule(
        torch.randn(8192, 32), torch.randn(32, 8192))}), None)  # 1,300x, +210 MB


# --------------------------------------------------------------------------- patterns

NORMAL_PATTERNS = ["q_proj", "v_proj", r"model\.layers\.0\.self_attn\.q_proj", "layers.0.self_attn.q_proj",
                   ".*q_proj", r"layers\.\d+\.mlp\.(up|down)_proj", "^model.layers.1.self_attn.v_proj", "mlp",
                   "self_attn.(q|k)_proj", "layers.1[0-9]?.self_attn.o_proj", "proj", "", "a|b|q_proj",
                   r"(?<=\.)v_proj", "layers.*.mlp.gate_proj", r"q_proj\Z"]
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.12.mlp.up_proj",
           "model.layers.10.self_attn.o_proj", "lm_head", "model.layers.3.mlp.gate_proj", "q_proj", "xq_proj",
           "model.layers.0.self_attn.q_proj.base_layer", "model.layers.1.mlp.down_proj"]


def test_patterns_give_pefts_own_answer_on_normal_patterns():
    from peft.utils.other import get_pattern_key

    for module in MODULES:
        for i in range(len(NORMAL_PATTERNS)):
            keys = NORMAL_PATTERNS[i:] + NORMAL_PATTERNS[:i]
            patterns = {key: n for n, key in enumerate(keys)}
            found = get_pattern_key(keys, module)
            assert first_match(patterns, module, "default") == patterns.get(found, "default"), (module, keys)


@pytest.mark.parametrize("pattern", ["(a+)+b", "(a|a)*b", "(a|aa)+$", "(x*)*y", r"(\w+\.)*z", r"(.)\1", "(a?){20}b",
                                     "(a|a)" * 30 + "b", ".*.*.*.*.*x", "a" * 2000])
def test_a_pattern_without_a_small_bound_is_refused_by_name(pattern):
    with pytest.raises(UnsafePattern):
        first_match({pattern: 1}, "a" * 32, None)
    assert repr(pattern)[:12] in str(pytest.raises(UnsafePattern, first_match, {pattern: 1}, "a" * 32, None).value)


def test_the_bound_on_steps_covers_long_names():
    rule = peft_rule(r"layers\.\d+\.q")
    assert rule.steps(40) <= MAX_STEPS
    with pytest.raises(UnsafePattern, match="characters"):
        peft_rule(".*x.*y.*z").match("a" * 1000)


def test_a_redos_config_is_one_error_in_moments(tmp_path, runner):
    folder = redos_adapter(tmp_path / "redos")
    assert "(a+)+b" in one_error(run_cli(runner, "info", folder))
    feed = tmp_path / "ia3"
    feed.mkdir()
    save_file({f"{P}{'a' * 32}.ia3_l": torch.ones(1, 4)}, feed / "adapter_model.safetensors")
    (feed / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "feedforward_modules": "(a+)+b"}))
    with pytest.raises(AdapterFormatError, match=re.escape("(a+)+b")):
        adaptools.formats.ia3.read_ia3(feed)


# --------------------------------------------------------------------------- memory and time guard

GUARD = textwrap.dedent("""
    import resource, signal, sys, time
    import adaptools
    from adaptools.errors import AdaptoolsError
    signal.alarm(60)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + GROWTH, vm + GROWTH))
    for path in sys.argv[1:]:
        start = time.monotonic()
        try:
            adaptools.load(path, scale=1.0) if path.endswith(".npz") else adaptools.load(path)
            outcome = "read"
        except AdaptoolsError as exc:
            outcome = "refused"
        print(path.rsplit("/", 1)[-1], outcome, round(time.monotonic() - start, 2), flush=True)
""")


def test_bombs_stay_within_an_address_space_limit_and_seconds(tmp_path):
    """Each bomb in a child whose address space may grow by 1 GiB only (the reported cost was 3.9–4.2 GB)."""
    files = [loha_bomb(tmp_path / "loha.safetensors"), lokr_bomb(tmp_path / "lokr.safetensors"),
             lokr_full_bomb(tmp_path / "lokr-full.safetensors"), tucker_bomb(tmp_path / "tucker.safetensors"),
             npz_bomb(tmp_path / "adapters.npz"), redos_adapter(tmp_path / "redos")]
    code = GUARD.replace("GROWTH", str(2**30))
    done = subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    outcome = {line.split()[0]: (line.split()[1], float(line.split()[2])) for line in done.stdout.splitlines()}
    assert {name: o for name, (o, _) in outcome.items()} == {
        "loha.safetensors": "read", "lokr.safetensors": "read", "lokr-full.safetensors": "refused",
        "tucker.safetensors": "refused", "adapters.npz": "refused", "redos": "refused"}
    assert all(seconds < 10 for _, seconds in outcome.values()), outcome


def test_a_merge_method_on_a_module_claiming_a_huge_dense_delta_is_refused(tmp_path, runner):
    """A rank-1 module of (65,536 x 65,536) stores 131,072 numbers; TIES would build 2 dense 16 GiB task matrices."""
    folder = tmp_path / "wide"
    folder.mkdir()
    save_file({f"{P}m.lora_A.weight": torch.randn(1, 65536), f"{P}m.lora_B.weight": torch.randn(65536, 1)},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    error = one_error(run_cli(runner, "combine", folder, folder, "--method", "ties", "--density", "0.5",
                              "-o", tmp_path / "o"))
    assert "'m'" in error and "per stored number" in error and not (tmp_path / "o").exists()
