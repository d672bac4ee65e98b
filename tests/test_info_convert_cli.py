"""`adaptools info` and `adaptools convert` through the click app: what info reports is what PEFT builds from the same
folder, and converting PEFT -> kohya -> PEFT (with --base) keeps PEFT's logits."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from factories import logits, make_peft_adapter, peft_model

from adaptools.formats.kohya import kohya_name

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = {
    "llama_patterns_dora": ("llama_base", dict(target_modules=["q_proj", "k_proj", "down_proj"], rank_pattern={"k_proj": 2},
                                               alpha_pattern={"down_proj": 2}, use_dora=True)),
    "llama_embedding_rslora": ("llama_base", dict(target_modules=["embed_tokens", "v_proj"], use_rslora=True)),
    "gpt2_fan_in_fan_out": ("gpt2_base", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}


@pytest.fixture(scope="module")
def adapters(request, tmp_path_factory) -> dict:
    """case -> (base folder, PEFT adapter folder)."""
    made = {}
    for case, (base_name, lora) in CASES.items():
        base = request.getfixturevalue(base_name)
        made[case] = base, make_peft_adapter(base, tmp_path_factory.mktemp(case) / "peft", r=4, lora_alpha=8, **lora)
    return made


def peft_layers(base, folder) -> dict:
    """PEFT's own LoRA layers of the folder, by module path."""
    from peft.tuners.lora import LoraLayer

    model = peft_model(base, folder)
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("case", list(CASES))
def test_info_json_matches_peft(case, adapters, runner):
    base, folder = adapters[case]
    result = run_cli(runner, "info", folder, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    layers = peft_layers(base, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert info["format"] == "peft" and info["base_model"] == config["base_model_name_or_path"]
    assert info["dora"] is bool(config["use_dora"])
    assert set(info["modules"]) == set(layers)
    total = 0
    for name, layer in layers.items():
        module = info["modules"][name]
        r, out, inp = layer.r["default"], layer.out_features, layer.in_features
        assert (module["rank"], module["out_features"], module["in_features"]) == (r, out, inp)
        assert module["scale"] == pytest.approx(layer.scaling["default"])
        total += r * (out + inp) + (out if config["use_dora"] else 0)
        assert module["params"] == r * (out + inp) + (out if config["use_dora"] else 0)
    assert info["num_params"] == total


def test_info_table(adapters, runner):
    base, folder = adapters["llama_patterns_dora"]
    result = run_cli(runner, "info", folder)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "format: peft" in lines and "dora: yes" in lines and f"base model: {base}" in lines
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("model.")}
    layers = peft_layers(base, folder)
    assert set(rows) == set(layers)
    for name, layer in layers.items():
        assert int(rows[name][2]) == layer.r["default"]
        assert float(rows[name][3]) == pytest.approx(layer.scaling["default"], rel=1e-3)


def test_convert_peft_to_kohya_to_peft(adapters, runner, tmp_path):
    base, folder = adapters["llama_patterns_dora"]
    kohya = tmp_path / "lora.safetensors"
    result = run_cli(runner, "convert", folder, "--to", "kohya", "-o", kohya)
    assert result.exit_code == 0, result.stderr
    assert str(kohya) in result.stdout

    info = json.loads(run_cli(runner, "info", kohya, "--json").stdout)
    layers = peft_layers(base, folder)
    assert info["format"] == "kohya" and info["dora"] is True
    assert set(info["modules"]) == {kohya_name(n) for n in layers}
    mapped = json.loads(run_cli(runner, "info", kohya, "--json", "--base", base).stdout)
    assert set(mapped["modules"]) == set(layers)

    refused = run_cli(runner, "convert", kohya, "--to", "peft", "-o", tmp_path / "peft")
    assert refused.exit_code == 2 and "--base" in refused.stderr and not (tmp_path / "peft").exists()

    result = run_cli(runner, "convert", kohya, "--to", "peft", "--base", base, "-o", tmp_path / "peft")
    assert result.exit_code == 0, result.stderr
    torch.testing.assert_close(
        logits(peft_model(base, tmp_path / "peft")), logits(peft_model(base, folder)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("case", ["llama_embedding_rslora", "gpt2_fan_in_fan_out"])
def test_convert_peft_to_peft_keeps_logits(case, adapters, runner, tmp_path):
    base, folder = adapters[case]
    result = run_cli(runner, "convert", folder, "--to", "peft", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    torch.testing.assert_close(
        logits(peft_model(base, tmp_path / "out")), logits(peft_model(base, folder)), rtol=1e-5, atol=1e-5
    )
    refused = run_cli(runner, "convert", folder, "--to", "kohya", "-o", tmp_path / "out.safetensors")
    assert refused.exit_code == 2 and "kohya files cannot hold" in refused.stderr
