"""PEFT's own regression files (../shared/fixtures/peft-regression, PEFT 0.6.1, pickled): read with pickle allowed,
merged by hand into their rebuilt tiny torch bases through the Adapter's ΔW, they reproduce PEFT's recorded output.pt.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli
from factories import merge_by_hand
from safetensors.torch import load_file
from torch import nn

import adaptools

pytestmark = pytest.mark.usefixtures("single_thread")

X = torch.arange(90).reshape(9, 10)
LORA_FIXTURES = ["lora_mlp", "lora_mlp_modules_to_save", "lora_conv2d", "lora_emb_conv1d", "adalora_mlp"]
ALL_FIXTURES = [*LORA_FIXTURES, "lora_opt-350m", "ia3_mlp"]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin1(torch.relu(self.lin0(x.float()))), dim=-1)


class ModelConv2D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d, self.lin0 = nn.Conv2d(5, 10, 3), nn.Linear(10, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin0(torch.relu(self.conv2d(x.float().reshape(2, 5, 3, 3))).flatten(1)), dim=-1)


class ModelEmbConv1D(nn.Module):
    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb, self.conv1d, self.lin0 = nn.Embedding(100, 5), Conv1D(1, 5), nn.Linear(10, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin0(torch.relu(self.conv1d(self.emb(x))).flatten(1)), dim=-1)


BASES = {"mlp": MLP, "conv2d": ModelConv2D, "emb_conv1d": ModelEmbConv1D}


def base_for(name: str) -> nn.Module:
    """The fixture's base, built right after torch.manual_seed(0) as the fixtures README says."""
    torch.manual_seed(0)
    return BASES[name.removeprefix("lora_").removeprefix("adalora_").removesuffix("_modules_to_save")]().eval()


def fixture_tensors(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, state dict of adapter_model.bin) read directly, as the test's own reference."""
    state = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    return json.loads((folder / "adapter_config.json").read_text()), state


@pytest.mark.parametrize("name", LORA_FIXTURES)
def test_fixture_merged_by_hand_reproduces_peft_output(name, shared_fixtures):
    folder = shared_fixtures / "peft-regression" / name
    expected = torch.load(folder / "output.pt", map_location="cpu", weights_only=True)
    adapter = adaptools.load(folder, allow_pickle=True)
    with torch.no_grad():
        assert (base_for(name)(X) - expected).abs().max() > 1e-3  # the adapter matters
        merged = merge_by_hand(base_for(name), adapter)(X)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)


def test_fixture_modules_match_their_files(shared_fixtures):
    """Kinds, ranks, scales and tensors as stored: conv kernel, embedding and fan_in_fan_out transposes, AdaLoRA E."""
    root = shared_fixtures / "peft-regression"
    conv = adaptools.load(root / "lora_conv2d", allow_pickle=True)["conv2d"]
    assert (conv.kind, conv.kernel, conv.weight_shape, conv.scale) == ("conv", (3, 3), (10, 5, 3, 3), 1.0)

    emb_conv1d = adaptools.load(root / "lora_emb_conv1d", allow_pickle=True)
    _, state = fixture_tensors(root / "lora_emb_conv1d")
    emb, conv1d = emb_conv1d["emb"], emb_conv1d["conv1d"]
    assert emb.kind == "embedding" and emb.weight_shape == (100, 5)
    assert conv1d.fan_in_fan_out and conv1d.weight_shape == (5, 1)
    A, B = state["base_model.model.emb.lora_embedding_A"], state["base_model.model.emb.lora_embedding_B"]
    torch.testing.assert_close(emb.delta(), (B @ A).T)

    config, state = fixture_tensors(root / "adalora_mlp")
    adalora = adaptools.load(root / "adalora_mlp", allow_pickle=True)["lin0"]
    A, B, E = (state[f"base_model.model.lin0.lora_{k}"] for k in "ABE")
    expected = B @ (A * E) * config["lora_alpha"] / (config["init_r"] + 1e-5)
    torch.testing.assert_close(adalora.delta(), expected)

    saved = adaptools.load(root / "lora_mlp_modules_to_save", allow_pickle=True)
    assert set(saved.extra) == {"lin1.weight", "lin1.bias"}


def test_ia3_fixture_merged_reproduces_peft_output(shared_fixtures, tmp_path):
    """IA3 (feedforward lin0: its input columns scaled) merged by `adaptools.merge` into the rebuilt base."""
    from safetensors.torch import save_file

    folder = shared_fixtures / "peft-regression" / "ia3_mlp"
    expected = torch.load(folder / "output.pt", map_location="cpu", weights_only=True)
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in base_for("mlp").state_dict().items()}, base / "model.safetensors")
    (base / "config.json").write_text("{}")
    with pytest.raises(adaptools.UnsupportedAdapterError, match="a sum of IA3 adapters is not a weight update"):
        adaptools.load(folder, allow_pickle=True)
    adaptools.merge(base, folder, out=tmp_path / "merged", allow_pickle=True)
    merged = base_for("mlp")
    merged.load_state_dict(load_file(tmp_path / "merged" / "model.safetensors"))
    with torch.no_grad():
        assert (base_for("mlp")(X) - expected).abs().max() > 1e-3
        torch.testing.assert_close(merged(X), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_info_json_on_every_fixture(name, shared_fixtures, runner):
    folder = shared_fixtures / "peft-regression" / name
    result = run_cli(runner, "info", folder, "--json", "--allow-pickle")
    config, state = fixture_tensors(folder)
    if config["peft_type"] == "IA3":
        assert result.exit_code == 0, result.stderr
        info = json.loads(result.stdout)
        assert info["format"] == "peft-ia3"
        assert info["modules"] == {"lin0": {"kind": "linear", "scales": "input", "features": 10, "dtype": "float32"}}
        return
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "peft" and info["dora"] is False
    assert info["base_model"] == config["base_model_name_or_path"]
    expected = {}
    for key, A in state.items():
        if key.endswith(("lora_A.weight", "lora_embedding_A", "lora_A")):
            module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            r = A.shape[0]
            adalora = config["peft_type"] == "ADALORA"
            scale = config["lora_alpha"] / (config["init_r"] + 1e-5 if adalora else r)
            expected[module] = dict(rank=r, scale=pytest.approx(scale), in_features=math.prod(A.shape[1:]),
                                    out_features=state[key.replace("_A", "_B")].shape[0])
    fields = ("rank", "scale", "out_features", "in_features")
    assert {m: {k: v[k] for k in fields} for m, v in info["modules"].items()} == expected


def test_opt_fixture_converts_to_peft_and_kohya(shared_fixtures, runner, tmp_path):
    folder = shared_fixtures / "peft-regression" / "lora_opt-350m"
    _, state = fixture_tensors(folder)
    result = run_cli(runner, "convert", folder, "--to", "peft", "-o", tmp_path / "peft", "--allow-pickle")
    assert result.exit_code == 0, result.stderr
    written = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert written.keys() == state.keys()  # alpha = r = 8: scale 1 already, tensors unchanged
    assert all(torch.equal(written[k], state[k]) for k in state)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == "facebook/opt-350m"

    result = run_cli(runner, "convert", tmp_path / "peft", "--to", "kohya", "-o", tmp_path / "opt.safetensors")
    assert result.exit_code == 0, result.stderr
    kohya = load_file(tmp_path / "opt.safetensors")
    q = "model.decoder.layers.3.self_attn.q_proj"
    assert torch.equal(kohya[f"lora_unet_{q.replace('.', '_')}.lora_down.weight"], state[f"base_model.model.{q}.lora_A.weight"])
    assert kohya[f"lora_unet_{q.replace('.', '_')}.alpha"].item() == 8.0
    assert len(kohya) == 3 * len(state) // 2
