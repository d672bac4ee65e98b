"""Seeded fuzz per adapter family and of CLI option values (issue 21): files generated from drawn shapes, dtypes and
fields (LoHa, LoKr, Tucker LoCon, mlx .npz and safetensors, diffusers metadata, AdaLoRA masks), and drawn option
values on a valid adapter. Each run ends in exit status 2 with one `error:` line and nothing written, or exit 0 with
a readable output; never a traceback or a hang, and no file beside the output changes."""
from __future__ import annotations

import io
import json
import math
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factories import make_peft_adapter
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_fuzz_inputs import FUZZ, RUN_SECONDS, VALUES, outside, time_limit
from test_untrusted_inputs import tree_digest

import adaptools
from adaptools import bounds
from adaptools_cli.main import cli

pytestmark = pytest.mark.usefixtures("single_thread")

P = "base_model.model."
DIMS = st.sampled_from([0, 1, 2, 3, 5, 8]) | st.sampled_from([1024, 4096])
SMALL = st.sampled_from([1, 2, 3, 4])
DTYPES = st.sampled_from([torch.float32] * 6 + [torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn,
                                                 torch.int32, torch.uint8, torch.bool])
NUMBERS = st.sampled_from([0.0, 1.0, -1.0, 4.0, 1e30, 3e39, 1e308, float("nan"), float("inf")])


def capped(shape: tuple[int, ...]) -> tuple[int, ...]:
    """`shape` with its largest dimensions cut until it holds at most 2^16 numbers."""
    while math.prod(shape) > 2**16:
        shape = tuple(max(1, s // 4) if s == max(shape) else s for s in shape)
    return shape


def tensor(data: st.DataObject, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor of `shape` (capped) in a drawn dtype."""
    shape = capped(shape)
    dtype = dtype or data.draw(DTYPES)
    values = torch.randn(shape, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 9))))
    return values.to(dtype) if dtype.is_floating_point else (values.abs() * 3).to(dtype)


def shape(data: st.DataObject, consistent: tuple[int, ...]) -> tuple[int, ...]:
    """`consistent` most of the time, else drawn dimensions (a mismatch)."""
    return consistent if data.draw(st.integers(0, 3)) else tuple(data.draw(DIMS) for _ in consistent)


def loha(data: st.DataObject, folder: Path) -> Path:
    out, inp, r1, r2 = (data.draw(DIMS) for _ in range(4))
    parts = {"hada_w1_a": (out, r1), "hada_w1_b": (r1, inp), "hada_w2_a": (out, r2), "hada_w2_b": (r2, inp)}
    if data.draw(st.booleans()):  # Tucker cores: w1a (r, out), w1b (r, in), t (r, r, k, k)
        k = data.draw(SMALL)
        parts = {"hada_t1": (r1, r1, k, k), "hada_w1_a": (r1, out), "hada_w1_b": (r1, inp),
                 "hada_t2": (r1, r1, k, k), "hada_w2_a": (r1, out), "hada_w2_b": (r1, inp)}
    return lycoris_file(data, folder, parts)


def lokr(data: st.DataObject, folder: Path) -> Path:
    a, b, c, d, k1, k2 = (data.draw(DIMS) for _ in range(6))
    parts = {"lokr_w1": (a, c)} if data.draw(st.booleans()) else {"lokr_w1_a": (a, k1), "lokr_w1_b": (k1, c)}
    second = data.draw(st.sampled_from(["full", "pair", "tucker"]))
    if second == "full":
        parts["lokr_w2"] = (b, d)
    elif second == "pair":
        parts.update(lokr_w2_a=(b, k2), lokr_w2_b=(k2, d))
    else:
        k = data.draw(SMALL)
        parts.update(lokr_t2=(k2, k2, k, k), lokr_w2_a=(k2, b), lokr_w2_b=(k2, d))
    return lycoris_file(data, folder, parts)


def tucker(data: st.DataObject, folder: Path) -> Path:
    r, out, inp, k = data.draw(DIMS), data.draw(DIMS), data.draw(DIMS), data.draw(SMALL)
    return lycoris_file(data, folder, {"lora_down.weight": (r, inp, 1, 1), "lora_mid.weight": (r, r, k, k),
                                       "lora_up.weight": (out, r, 1, 1)})


def lycoris_file(data: st.DataObject, folder: Path, parts: dict[str, tuple[int, ...]]) -> Path:
    tensors = {f"lora_unet_x.{role}": tensor(data, shape(data, s)) for role, s in parts.items()}
    if data.draw(st.booleans()):
        alpha_shape = data.draw(st.sampled_from([(), (2,)]))
        tensors["lora_unet_x.alpha"] = torch.full(alpha_shape, data.draw(NUMBERS), dtype=torch.float64).float()
    path = folder / "lycoris.safetensors"
    save_file(tensors, path, metadata={"ss_network_module": "lycoris.kohya"})
    return path


def npz(data: st.DataObject, folder: Path) -> Path:
    r, inp, out = data.draw(DIMS), data.draw(DIMS), data.draw(DIMS)
    dtype = data.draw(st.sampled_from([np.float32, np.float32, np.float16, np.float64, np.int32, np.uint8, np.bool_]))
    arrays = {"model.layers.0.self_attn.q_proj.lora_a": np.ones(capped(shape(data, (inp, r))), dtype),
              "model.layers.0.self_attn.q_proj.lora_b": np.ones(capped(shape(data, (r, out))), dtype)}
    path = folder / "adapters.npz"
    method = data.draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, array)
            raw = buf.getvalue()
            if data.draw(st.integers(0, 3)) == 0:  # a lying .npy header or cut data
                at = data.draw(st.integers(0, len(raw) - 1))
                raw = data.draw(st.sampled_from([raw[:at], raw[:at] + bytes([raw[at] ^ 0x11]) + raw[at + 1:]]))
            archive.writestr(name + ".npy", raw)
    return path


def mlx(data: st.DataObject, folder: Path) -> Path:
    r = data.draw(DIMS)
    key = "model.layers.0.self_attn.q_proj"
    save_file({f"{key}.lora_a": tensor(data, shape(data, (8, r))), f"{key}.lora_b": tensor(data, shape(data, (r, 8)))},
              folder / "adapters.safetensors")
    params = {"rank": r, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}
    params[data.draw(st.sampled_from(["rank", "scale", "keys", "dropout"]))] = data.draw(VALUES)
    config = {"fine_tune_type": data.draw(st.sampled_from(["lora", "dora", "full", "x"])), "num_layers":
              data.draw(st.sampled_from([-1, 1, 2, 0])), "lora_parameters": params}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def diffusers(data: st.DataObject, folder: Path) -> Path:
    r = data.draw(DIMS)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {f"{key}.lora_A.weight": tensor(data, shape(data, (r, 8))),
               f"{key}.lora_B.weight": tensor(data, shape(data, (8, r)))}
    if data.draw(st.booleans()):
        tensors[f"{key}.alpha"] = torch.tensor(data.draw(NUMBERS), dtype=torch.float64).float()
    config = {"r": r, "lora_alpha": 4, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False}
    config[data.draw(st.sampled_from(list(config)))] = data.draw(VALUES)
    metadata = {"lora_adapter_metadata": json.dumps({"unet": config})} if data.draw(st.booleans()) else {}
    path = folder / "pytorch_lora_weights.safetensors"
    save_file(tensors, path, metadata={"format": "pt", **metadata})
    return path


def adalora(data: st.DataObject, folder: Path) -> Path:
    r = data.draw(st.sampled_from([0, 1, 3]))
    module = "model.layers.0.self_attn.q_proj"
    save_file({f"{P}{module}.lora_A": tensor(data, shape(data, (r, 8))),
               f"{P}{module}.lora_B": tensor(data, shape(data, (8, r))),
               f"{P}{module}.lora_E": tensor(data, shape(data, (r, 1))),
               f"{P}{module}.ranknum": torch.tensor(data.draw(NUMBERS), dtype=torch.float64).float()},
              folder / "adapter_model.safetensors")
    mask = data.draw(st.lists(st.booleans(), max_size=5))
    config = {"peft_type": "ADALORA", "r": max(r, 1), "init_r": max(r, 1), "lora_alpha": data.draw(NUMBERS),
              "rank_pattern": {f"{P}{module}.lora_E": mask}}
    (folder / "adapter_config.json").write_text(json.dumps(config, allow_nan=True))
    return folder


FAMILIES = {"loha": loha, "lokr": lokr, "tucker": tucker, "npz": npz, "mlx": mlx, "diffusers": diffusers,
            "adalora": adalora}


def run_contract(work: Path, args: list) -> None:
    """Run the CLI in `work` and check the module doc's contract; a success must write a readable adapter."""
    before = tree_digest(work)
    with time_limit(RUN_SECONDS):
        result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code in (0, 2), (result.exit_code, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    if result.exit_code == 2:
        assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0], result.stderr
        assert "Traceback" not in result.output and not (work / "out").exists()
    elif (work / "out").exists():
        adaptools.load(work / "out", scale=1.0).check_finite()
    assert outside(tree_digest(work), "out") == outside(before, "out")


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuzz_family_files(family, fuzz_root, monkeypatch):
    monkeypatch.setattr(bounds, "EXPANSION_FLOOR", 2**20)  # the bounds are exercised without 512 MiB expansions
    monkeypatch.setattr(bounds, "EXPANSION_FACTOR", 64)
    @settings(max_examples=30, **FUZZ)
    @given(data=st.data())
    def check(data):
        work = Path(tempfile.mkdtemp(dir=fuzz_root))
        (work / "sentinel.txt").write_text("must not change")
        folder = work / "in"
        folder.mkdir()
        source = FAMILIES[family](data, folder)
        command = data.draw(st.sampled_from(["info", "convert", "spectrum"]))
        scale = ["--scale", "1"] if family == "npz" else []
        to = "kohya" if family in ("loha", "lokr", "tucker") else "peft"
        args = {"info": ["info", source, *scale], "spectrum": ["spectrum", source, *scale],
                "convert": ["convert", source, "--to", to, "-o", work / "out", *scale]}[command]
        run_contract(work, args)
        shutil.rmtree(work)

    check()


OPTION_VALUES = st.sampled_from(["0", "1", "-1", "8", "1e21", "1" + "0" * 21, "nan", "inf", "-inf", "", " ", "1,2",
                                 "0.5", "2", "meta", "cuda:7", "cpu", "auto", "..", "/", "a" * 300, "\x00", "1,nan",
                                 "0.5,2", "1e400", "-0", "float8", "fp16", "nf4", "5.5e-324"])
OPTIONS = {
    "convert": ["--pad-rank", "--serve", "--layout", "--scale", "--alpha", "--to"],
    "combine": ["--weights", "--density", "--method", "--rank", "--energy", "--seed", "--device", "--dtype"],
    "rerank": ["--rank", "--energy", "--ratio", "--threshold", "--budget", "--device", "--pad-rank"],
    "info": ["--scale", "--alpha"],
}


@pytest.fixture(scope="module")
def option_adapter(llama_base, tmp_path_factory) -> Path:
    return make_peft_adapter(llama_base, tmp_path_factory.mktemp("options") / "adapter", r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"])


@settings(max_examples=60, **FUZZ)
@given(data=st.data())
def test_fuzz_option_values(option_adapter, fuzz_root, data):
    work = Path(tempfile.mkdtemp(dir=fuzz_root))
    (work / "sentinel.txt").write_text("must not change")
    command = data.draw(st.sampled_from(list(OPTIONS)))
    chosen = data.draw(st.lists(st.sampled_from(OPTIONS[command]), min_size=1, max_size=3, unique=True))
    options = [part for name in chosen for part in (name, data.draw(OPTION_VALUES))]
    inputs = [option_adapter, option_adapter] if command == "combine" else [option_adapter]
    fixed = {"convert": ["--to", "peft"] if "--to" not in chosen else [], "combine": [], "rerank": [],
             "info": []}[command]
    output = [] if command == "info" else ["-o", work / "out"]
    if command == "rerank" and not {"--rank", "--energy", "--ratio", "--threshold", "--budget"} & set(chosen):
        fixed = ["--rank", "2"]
    run_contract(work, [command, *inputs, *fixed, *options, *output])
    shutil.rmtree(work)
