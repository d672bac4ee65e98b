"""Crafted adapter files found in the final review to end in a traceback or to be read wrong: each is now one
`error:` line with exit status 2 from `adaptools info`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import save_file

PEFT = "base_model.model.model.layers.0.self_attn.q_proj"
MLX = "model.layers.0.self_attn.q_proj"


def peft_folder(root: Path, tensors: dict, **config) -> Path:
    root.mkdir()
    save_file(tensors, root / "adapter_model.safetensors")
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}))
    return root


def lora(rank: int = 4) -> dict:
    return {f"{PEFT}.lora_A.weight": torch.randn(rank, 32), f"{PEFT}.lora_B.weight": torch.randn(32, rank)}


def mlx_folder(root: Path, tensors: dict, **config) -> Path:
    root.mkdir()
    save_file(tensors, root / "adapters.safetensors")
    (root / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "dora" if f"{MLX}.m" in tensors else "lora", "num_layers": -1,
         "lora_parameters": {"rank": 4, "scale": 2.0}, **config}))
    return root


def crafted(kind: str, root: Path) -> Path:
    if kind == "rank 0":
        return peft_folder(root, lora(0))
    if kind == "AdaLoRA ranknum of two values":
        tensors = {f"{PEFT}.lora_A.weight": torch.randn(4, 32), f"{PEFT}.lora_B.weight": torch.randn(32, 4),
                   f"{PEFT}.lora_E.weight": torch.randn(4, 1), f"{PEFT}.ranknum": torch.ones(2)}
        return peft_folder(root, tensors, peft_type="ADALORA", init_r=4)
    if kind == "mlx model an object":
        return mlx_folder(root, {f"{MLX}.lora_a": torch.randn(32, 4), f"{MLX}.lora_b": torch.randn(4, 32)},
                          model={"a": 1})
    if kind == "mlx DoRA magnitude negative":
        return mlx_folder(root, {f"{MLX}.lora_a": torch.randn(32, 4), f"{MLX}.lora_b": torch.randn(4, 32),
                                 f"{MLX}.m": -torch.ones(32)})
    if kind == "LoHa pattern not a regex":
        tensors = {f"{PEFT}.hada_w1_a": torch.randn(32, 2), f"{PEFT}.hada_w1_b": torch.randn(2, 32),
                   f"{PEFT}.hada_w2_a": torch.randn(32, 2), f"{PEFT}.hada_w2_b": torch.randn(2, 32)}
        return peft_folder(root, tensors, peft_type="LOHA", r=2, alpha=2, alpha_pattern={"((": 2})
    if kind == "diffusers metadata with a string boolean":
        root.mkdir()
        key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        save_file({f"{key}.lora_A.weight": torch.randn(4, 32), f"{key}.lora_B.weight": torch.randn(32, 4)},
                  root / "pytorch_lora_weights.safetensors",
                  metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8,
                                                                 "unet.use_rslora": "false"})})
        return root / "pytorch_lora_weights.safetensors"
    if kind == "kohya alpha NaN":
        root.mkdir()
        name = "lora_unet_down_blocks_0_attn1_to_q"
        save_file({f"{name}.lora_down.weight": torch.randn(4, 32), f"{name}.lora_up.weight": torch.randn(32, 4),
                   f"{name}.alpha": torch.tensor(float("nan"))}, root / "lora.safetensors")
        return root / "lora.safetensors"
    raise AssertionError(kind)


KINDS = ["rank 0", "AdaLoRA ranknum of two values", "mlx model an object", "mlx DoRA magnitude negative",
         "LoHa pattern not a regex", "diffusers metadata with a string boolean", "kohya alpha NaN"]


@pytest.mark.parametrize("kind", KINDS)
def test_crafted_file_is_one_error_line(kind, tmp_path, runner):
    path = crafted(kind, tmp_path / "adapter")
    for args in (["info", path], ["convert", path, "--to", "peft", "-o", tmp_path / "out"]):
        result = run_cli(runner, *args)
        assert result.exit_code == 2, (kind, result.output, result.exception)
        assert result.stderr.count("error:") == 1 and result.stderr.strip().startswith("error:"), result.stderr
        assert not (tmp_path / "out").exists()


def test_each_refuses_an_adapter_name_that_is_no_folder_name(llama_base, tmp_path, runner):
    """Found in review: `--each` wrote the model of an adapter named '..' outside its folder (then deleted it)."""
    from factories import make_peft_adapter

    adapter = make_peft_adapter(llama_base, tmp_path / "style", r=2, lora_alpha=4, target_modules=["q_proj"])
    (adapter / "sub").mkdir()
    result = run_cli(runner, "merge", llama_base, adapter / "sub" / "..", adapter, "--each", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "--each output folder" in result.stderr and not (tmp_path / "out").exists()


def test_replay_refuses_an_absolute_input_path(llama_base, tmp_path, runner):
    """Found in review: a recipe could point replay at any local folder by an absolute path."""
    from factories import make_peft_adapter

    adapter = make_peft_adapter(llama_base, tmp_path / "style", r=2, lora_alpha=4, target_modules=["q_proj"])
    assert run_cli(runner, "convert", adapter, "--to", "peft", "-o", tmp_path / "out").exit_code == 0
    recipe_file = tmp_path / "out" / "adaptools_recipe.json"
    recipe = json.loads(recipe_file.read_text())
    recipe["inputs"][0]["path"] = str(adapter.resolve())
    recipe["params"]["adapter"] = str(adapter.resolve())
    recipe_file.write_text(json.dumps(recipe))
    result = run_cli(runner, "replay", recipe_file, "-o", tmp_path / "again")
    assert result.exit_code == 2 and "relative to the recipe's folder" in result.stderr
    assert not (tmp_path / "again").exists()
