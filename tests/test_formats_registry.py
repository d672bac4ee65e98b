"""The family registry: detection (`info` names the family), PEFT weights without their config, kohya edge cases,
and the errors for what is out of scope, each through the CLI (one `error:` line, exit 2)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import adaptools
from adaptools.formats import FAMILIES, FORMATS

from conftest import run_cli
from factories import make_peft_adapter
from test_errors_cli import assert_one_line_error

PEFT_OPTIONS = dict(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def peft_dir(llama_base, tmp_path_factory):
    return make_peft_adapter(llama_base, tmp_path_factory.mktemp("peft") / "lora", **PEFT_OPTIONS)


def test_every_family_has_the_interface():
    for family in FAMILIES:
        assert isinstance(family.NAME, str) and callable(family.detect) and callable(family.read)
        if hasattr(family, "write"):
            assert isinstance(family.WRITES_FILE, bool)
    assert {"peft", "kohya", "mlx", "diffusers"} <= set(FORMATS)


@pytest.mark.parametrize("to, name", [("peft", "p"), ("kohya", "k.safetensors"), ("mlx", "m"), ("diffusers", "d.safetensors")])
def test_info_names_the_family_of_each_conversion(to, name, peft_dir, llama_base, tmp_path, runner):
    out = tmp_path / name
    assert run_cli(runner, "convert", peft_dir, "--to", to, "-o", out).exit_code == 0
    result = run_cli(runner, "info", out)
    assert result.exit_code == 0 and result.stdout.startswith(f"format: {to}\n"), result.stdout
    back = adaptools.load(out, base=llama_base)
    source = adaptools.load(peft_dir)
    for module in source:
        torch.testing.assert_close(back.delta(module), source.delta(module), rtol=1e-5, atol=1e-6)


def weights_without_config(peft_dir, tmp_path):
    folder = tmp_path / "weights_only"
    shutil.copytree(peft_dir, folder)
    (folder / "adapter_config.json").unlink()
    return folder


def test_peft_weights_without_config_assume_alpha_r_and_say_so(peft_dir, tmp_path, runner):
    folder = weights_without_config(peft_dir, tmp_path)
    with pytest.warns(UserWarning, match="assuming lora_alpha = r"):
        guessed = adaptools.load(folder)
    assert {m.scale for m in guessed.modules.values()} == {1.0}
    result = run_cli(runner, "info", folder / "adapter_model.safetensors")
    assert result.exit_code == 0 and "format: peft" in result.stdout
    assert result.stderr.startswith("warning: ") and "pass --alpha or --scale" in result.stderr


@pytest.mark.parametrize("option", [{"alpha": 12.0}, {"scale": 3.0}])
def test_peft_weights_without_config_take_alpha_or_scale(option, peft_dir, tmp_path, runner):
    folder = weights_without_config(peft_dir, tmp_path)
    reference = adaptools.load(peft_dir)  # lora_alpha 12, r 4: scale 3, as PEFT computes it
    read = adaptools.load(folder, **option)
    for name in reference:
        torch.testing.assert_close(read.delta(name), reference.delta(name))
    flag, value = next(iter(option.items()))
    result = run_cli(runner, "convert", folder, f"--{flag}", str(value), "--to", "peft", "-o", tmp_path / "out")
    assert result.exit_code == 0 and result.stderr == ""
    for name in reference:
        torch.testing.assert_close(adaptools.load(tmp_path / "out").delta(name), reference.delta(name))


def test_scale_and_alpha_together_are_refused(peft_dir, tmp_path, runner):
    folder = weights_without_config(peft_dir, tmp_path)
    assert_one_line_error(run_cli(runner, "info", folder, "--scale", "1", "--alpha", "2"), "not both")


def test_prompt_tuning_is_refused_with_the_reason(tmp_path, runner):
    folder = tmp_path / "prompt"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8}))
    save_file({"prompt_embeddings": torch.randn(8, 16)}, folder / "adapter_model.safetensors")
    assert_one_line_error(run_cli(runner, "info", folder),
                          "PEFT PROMPT_TUNING adapters hold virtual tokens, not a weight update")


@pytest.mark.parametrize("family", ["kohya", "diffusers", "mlx_file"])
def test_truncated_files_say_so(family, peft_dir, tmp_path, runner):
    target = {"kohya": "k.safetensors", "diffusers": "d.safetensors", "mlx_file": "m"}[family]
    to = family.removesuffix("_file")
    assert run_cli(runner, "convert", peft_dir, "--to", to, "-o", tmp_path / target).exit_code == 0
    file = tmp_path / target if to != "mlx" else tmp_path / target / "adapters.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    assert_one_line_error(run_cli(runner, "info", file), "this file is truncated")


def test_a_model_checkpoint_is_not_an_adapter(llama_base, runner):
    assert_one_line_error(run_cli(runner, "info", llama_base / "model.safetensors"), "holds full weights only")


def test_a_folder_of_nothing_names_what_it_lacks(tmp_path, runner):
    (tmp_path / "notes.txt").write_text("x")
    assert_one_line_error(run_cli(runner, "info", tmp_path), "adapters.safetensors or adapters.npz (mlx-lm)")


# --- kohya edge cases ---------------------------------------------------------------------------------------


def test_kohya_zero_alpha_means_rank(tmp_path):
    down, up = torch.randn(3, 8), torch.randn(6, 3)
    save_file({"lora_unet_a.lora_down.weight": down, "lora_unet_a.lora_up.weight": up, "lora_unet_a.alpha": torch.tensor(0.0)},
              tmp_path / "k.safetensors")
    module = adaptools.load(tmp_path / "k.safetensors")["lora_unet_a"]
    assert module.scale == 1.0
    torch.testing.assert_close(module.delta(), up @ down)


def test_kohya_3x3_locon_conv_matches_kohyas_merge(tmp_path):
    """kohya's networks/lora.py merges a 3x3 LoRA conv as conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)."""
    gen = torch.Generator().manual_seed(7)
    down, up = torch.randn(4, 6, 3, 3, generator=gen), torch.randn(10, 4, 1, 1, generator=gen)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)},
              tmp_path / "locon.safetensors")
    module = adaptools.load(tmp_path / "locon.safetensors")[name]
    assert module.kind == "conv" and module.kernel == (3, 3) and module.weight_shape == (10, 6, 3, 3)
    kohya = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * (2.0 / 4)
    torch.testing.assert_close(module.delta(), kohya)
    adaptools.load(tmp_path / "locon.safetensors").save(tmp_path / "again.safetensors", format="kohya")
    again = load_file(tmp_path / "again.safetensors")
    assert again[f"{name}.lora_down.weight"].shape == (4, 6, 3, 3)


def test_sdxl_text_encoders_keep_their_prefixes_and_refuse_one_base(tmp_path):
    gen = torch.Generator().manual_seed(8)
    path = "text_model.encoder.layers.0.self_attn.q_proj"
    state = {}
    for prefix in ("lora_te1_", "lora_te2_", "lora_unet_"):
        name = prefix + path.replace(".", "_")
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = torch.randn(2, 8, generator=gen), torch.randn(8, 2, generator=gen)
    save_file(state, tmp_path / "sdxl.safetensors")
    adapter = adaptools.load(tmp_path / "sdxl.safetensors")
    assert sorted(n[:9] for n in adapter.modules) == ["lora_te1_", "lora_te2_", "lora_unet"]
    base = tmp_path / "te"
    base.mkdir()
    save_file({f"{path}.weight": torch.zeros(8, 8)}, base / "model.safetensors")
    single = {k: v for k, v in state.items() if k.startswith("lora_te2_")}
    save_file(single, tmp_path / "te2.safetensors")
    assert list(adaptools.load(tmp_path / "te2.safetensors", base=base).modules) == [path]
    with pytest.raises(adaptools.UnknownModuleError, match="map to the same weight"):
        adaptools.load(tmp_path / "sdxl.safetensors", base=base)


def test_reading_options_reach_combine_and_rerank(peft_dir, tmp_path, runner):
    folder = weights_without_config(peft_dir, tmp_path)
    reference = adaptools.load(peft_dir)
    result = run_cli(runner, "combine", folder, folder, "--weights", "0.5,0.5", "--alpha", "12", "-o", tmp_path / "sum")
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    summed = adaptools.load(tmp_path / "sum")
    for name in reference:
        torch.testing.assert_close(summed.delta(name), reference.delta(name))
    result = run_cli(runner, "rerank", folder, "--scale", "3", "--rank", "4", "-o", tmp_path / "re")
    assert result.exit_code == 0, result.stderr
    for name in reference:
        torch.testing.assert_close(adaptools.load(tmp_path / "re").delta(name), reference.delta(name), rtol=1e-4, atol=1e-5)


def test_pickled_weights_go_to_their_family_by_name(peft_dir, tmp_path):
    folder = tmp_path / "old_peft"
    folder.mkdir()
    torch.save(load_file(peft_dir / "adapter_model.safetensors"), folder / "adapter_model.bin")
    assert adaptools.detect_format(folder / "adapter_model.bin") == "peft"
    with pytest.raises(adaptools.PickleNotAllowedError):
        adaptools.load(folder)
    read = adaptools.load(folder, allow_pickle=True, alpha=12.0)
    reference = adaptools.load(peft_dir)
    for name in reference:
        torch.testing.assert_close(read.delta(name), reference.delta(name))
    torch.save({"unet.a.lora_A.weight": torch.ones(1, 2), "unet.a.lora_B.weight": torch.ones(2, 1)},
               tmp_path / "pytorch_lora_weights.bin")
    assert adaptools.detect_format(tmp_path / "pytorch_lora_weights.bin") == "diffusers"
