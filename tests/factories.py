"""Test fixtures made by code: tiny random transformers models saved as HF folders, and PEFT adapters on them.

Every helper returns paths of real files written with transformers / PEFT, so tests compare adaptools
against the ecosystem on the same bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_llama_config(**overrides):
    """A LlamaConfig small enough for fast tests, with grouped-query attention (4 heads, 2 KV heads)."""
    from transformers import LlamaConfig

    params = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def tiny_gpt2_config(**overrides):
    """A GPT2Config small enough for fast tests (Conv1D layers: fan_in_fan_out)."""
    from transformers import GPT2Config

    params = dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    params.update(overrides)
    return GPT2Config(**params)


def make_base(path: Path, arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0,
              max_shard_size: str | None = None, **overrides) -> Path:
    """Save a random tiny causal LM ("llama" or "gpt2") with save_pretrained; returns the folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_llama_config(**overrides) if arch == "llama" else tiny_gpt2_config(**overrides)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return Path(path)


def load_base(path: Path, dtype: torch.dtype = torch.float32):
    """AutoModelForCausalLM.from_pretrained in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def make_peft_adapter(base: Path, path: Path, seed: int = 1, randomize: bool = True,
                      save_embedding_layers: bool | str = "auto", **lora_kwargs) -> Path:
    """Create a PEFT LoRA on the base with LoraConfig(**lora_kwargs), give every adapter tensor random values, save it."""
    from peft import LoraConfig, get_peft_model

    model = load_model(base)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    if randomize:
        randomize_adapter(peft_model, seed)
    peft_model.save_pretrained(path, save_embedding_layers=save_embedding_layers)
    return Path(path)


def randomize_adapter(peft_model, seed: int = 1) -> None:
    """Random values for every adapter tensor (DoRA magnitudes perturbed around PEFT's init), trained biases and
    modules_to_save copies, so that every saved tensor matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                noise = torch.randn(param.shape, generator=generator) * 0.1
                if "magnitude" in name:  # a magnitude is a row norm: positive
                    param.copy_((noise + param).abs())
                else:
                    param.copy_(noise)
            elif "modules_to_save" in name or (name.endswith(".bias") and param.requires_grad):  # bias="all"/"lora_only"
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def input_ids(vocab_size: int = 96, batch: int = 2, length: int = 7, seed: int = 3) -> torch.Tensor:
    """Random token ids for logits comparisons."""
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def peft_logits(base: Path, adapter: Path, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of base + adapter through PeftModel.from_pretrained (PEFT's own forward)."""
    from peft import PeftModel

    ids = input_ids() if ids is None else ids
    model = PeftModel.from_pretrained(load_base(base), adapter).eval()
    with torch.no_grad():
        return model(ids).logits


def peft_merged_logits(base: Path, adapter: Path, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of PEFT's own merge_and_unload of base + adapter."""
    from peft import PeftModel

    ids = input_ids() if ids is None else ids
    model = PeftModel.from_pretrained(load_base(base), adapter).merge_and_unload().eval()
    with torch.no_grad():
        return model(ids).logits


def model_logits(path: Path, ids: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits of a saved model folder loaded with AutoModelForCausalLM.from_pretrained."""
    ids = input_ids() if ids is None else ids
    with torch.no_grad():
        return load_base(path, dtype)(ids).logits


def make_vit_base(path: Path, seed: int = 0) -> Path:
    """Save a random tiny ViT image classifier (its patch embedding is a Conv2d, 4x4 kernel) with save_pretrained."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                       image_size=8, patch_size=4, num_labels=3)
    ViTForImageClassification(config).save_pretrained(path)
    return Path(path)


def load_vit(path: Path):
    """ViTForImageClassification.from_pretrained in eval mode."""
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(path).eval()


def load_model(path: Path):
    """A saved tiny base as its transformers class: the ViT classifier, or a causal LM (load_base)."""
    import json

    is_vit = json.loads((Path(path) / "config.json").read_text()).get("model_type") == "vit"
    return load_vit(path) if is_vit else load_base(path)


def logits(model) -> torch.Tensor:
    """Logits of a causal LM on input_ids(), or of a ViT classifier on fixed random pixels."""
    if model.config.model_type == "vit":
        inputs = {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))}
    else:
        inputs = {"input_ids": input_ids()}
    with torch.no_grad():
        return model(**inputs).logits


def peft_model(base: Path, adapter: Path):
    """PeftModel.from_pretrained of the adapter on its base, in eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base), adapter).eval()


def merge_by_hand(model: torch.nn.Module, adapter) -> torch.nn.Module:
    """Reference merge into a torch model, dense: extra tensors replace the model's, then W += ΔW per module.

    DoRA modules follow PEFT: V = W + ΔW (canonical orientation), W' = (m / ‖V‖_row) ⊙ V; a LoRA bias adds scale·bias.
    """
    state = model.state_dict()
    for key, tensor in adapter.extra.items():
        state[key] = tensor.to(state[key].dtype)
    for name, module in adapter.items():
        weight = state[f"{name}.weight"].float()
        if module.is_dora:
            V = module.from_base_layout(weight) + module.scale * module.B.float() @ module.A.float()
            merged = module.to_base_layout(V * (module.magnitude.float() / V.norm(dim=1)).unsqueeze(1))
        else:
            merged = weight + module.delta()
        state[f"{name}.weight"] = merged
        if module.bias is not None:
            state[f"{name}.bias"] = state[f"{name}.bias"] + module.scale * module.bias
    model.load_state_dict(state)
    return model


def peft_delta_weights(peft_model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT's own ΔW (`get_delta_weight`, base weight layout) of `adapter_name`, per module path."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, layer in peft_model.named_modules():
        if isinstance(layer, LoraLayer) and (adapter_name in layer.lora_A or adapter_name in layer.lora_embedding_A):
            with torch.no_grad():
                deltas[name.removeprefix("base_model.model.")] = layer.get_delta_weight(adapter_name).float()
    return deltas


def tuned_copy(base: Path, out: Path, *, seed: int = 5, scale: float = 0.02, skip: tuple[str, ...] = (),
               **save_kwargs) -> Path:
    """The base with every 2-D weight (embeddings and LM head included) and the final norm moved."""
    model = load_base(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (p.ndim == 2 or name.endswith("norm.weight") and "layers" not in name) and not any(s in name for s in skip):
                p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(out, **save_kwargs)
    return out


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (all shards)."""
    from safetensors.torch import load_file

    return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}


def config(folder: Path) -> dict:
    """A folder's config.json."""
    return json.loads((folder / "config.json").read_text())


def messages(stderr: str) -> list[str]:
    """The lines of stderr other than the tqdm progress bar's."""
    return [line for line in stderr.split("\n") if line and not line.startswith("\r")]


def assert_no_output(result, out: Path) -> None:
    """A CLI run that failed with one `error:` line and left nothing at `out` (no temporary folder either)."""
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
