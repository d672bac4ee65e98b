"""PEFT folders: every LoRA feature PEFT writes is read with PEFT's meaning and written back so PEFT gives the same outputs.

References are PEFT itself: `PeftModel.from_pretrained` on the original folder, on the folder adaptools writes, and
the dense merge of the adaptools `Adapter` into the base (`factories.merge_by_hand`).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from factories import load_base, load_model, logits, make_peft_adapter, merge_by_hand, peft_model, randomize_adapter
from safetensors.torch import load_file, save_file

import adaptools
from adaptools.formats.peft import pattern_value

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_ALL = ["c_attn", "c_proj", "c_fc"]

# name: (base fixture, LoraConfig kwargs, make_peft_adapter kwargs)
CASES = {
    "llama_gqa": ("llama_base", dict(target_modules=LLAMA_ALL), {}),
    "rslora": ("llama_base", dict(target_modules=["q_proj", "v_proj"], use_rslora=True), {}),
    "patterns": (
        "llama_base",
        dict(
            target_modules=["q_proj", "v_proj", "down_proj"],
            # dict order decides: layers.1's q_proj takes 6, the other q_proj 3
            rank_pattern={"layers.1.self_attn.q_proj": 6, "q_proj": 3, "v_proj": 2},
            alpha_pattern={"down_proj": 3, r"layers\.0\..*proj": 5},
        ),
        {},
    ),
    "dora": ("llama_base", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True), {}),
    "embedding": ("llama_base", dict(target_modules=["embed_tokens", "q_proj"]), {}),
    "embedding_dora": ("llama_base", dict(target_modules=["embed_tokens", "q_proj"], use_dora=True), {}),
    "saved_embeddings": ("llama_base", dict(target_modules=["q_proj"]), dict(save_embedding_layers=True)),
    "modules_to_save": ("llama_base", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]), {}),
    "fan_in_fan_out": ("gpt2_base", dict(target_modules=GPT2_ALL, fan_in_fan_out=True), {}),
    "fan_in_fan_out_dora": ("gpt2_base", dict(target_modules=GPT2_ALL, fan_in_fan_out=True, use_dora=True), {}),
    "bias_lora_only": ("gpt2_base", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, bias="lora_only"), {}),
    "bias_all": ("gpt2_base", dict(target_modules=["c_attn"], fan_in_fan_out=True, bias="all"), {}),
    "lora_bias": ("gpt2_base", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_bias=True), {}),
    "conv2d": ("vit_base", dict(target_modules=["projection", "q_proj"]), {}),
    "conv2d_dora": ("vit_base", dict(target_modules=["projection", "q_proj"], use_dora=True), {}),
}


def perturb_full_tensors(folder: Path) -> None:
    """Add noise to every full (non-LoRA) tensor PEFT saved, so a stored base embedding or bias matters."""
    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    generator = torch.Generator().manual_seed(7)
    for key, tensor in state.items():
        if "lora_" not in key:
            state[key] = tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
    save_file(state, path, metadata={"format": "pt"})


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def made(request, tmp_path_factory):
    """A function case -> (base folder, PEFT adapter folder); each adapter is made once per module."""
    cache: dict[str, tuple[Path, Path]] = {}

    def make(case: str) -> tuple[Path, Path]:
        if case not in cache:
            base_name, lora, extra = CASES[case]
            base = request.getfixturevalue(base_name)
            folder = make_peft_adapter(base, tmp_path_factory.mktemp(case) / "peft", r=4, lora_alpha=8, **lora, **extra)
            perturb_full_tensors(folder)
            cache[case] = base, folder
        return cache[case]

    return make


def scalings(model) -> list[float]:
    """PEFT's scaling of every LoRA layer of a loaded PeftModel."""
    from peft.tuners.lora import LoraLayer

    return [layer.scaling["default"] for layer in model.modules() if isinstance(layer, LoraLayer)]


@pytest.mark.parametrize("case", list(CASES))
def test_peft_round_trip_and_hand_merge_match_peft(case, made, tmp_path):
    """Written back, PEFT gives the same logits (scale written as 1); merged by hand, the Adapter's ΔW (orientation,
    scale, kind), magnitudes, biases and full tensors give PEFT's logits too."""
    base, folder = made(case)
    reference = logits(peft_model(base, folder))
    assert (reference - logits(load_model(base))).abs().max() > 1e-3  # the adapter does change the outputs

    adapter = adaptools.load(folder)
    adapter.save(tmp_path / "out")
    written = peft_model(base, tmp_path / "out")
    torch.testing.assert_close(logits(written), reference, rtol=1e-5, atol=1e-5)
    assert scalings(written) and all(s == pytest.approx(1.0) for s in scalings(written))

    merged = merge_by_hand(load_model(base), adapter)
    torch.testing.assert_close(logits(merged), reference, rtol=1e-4, atol=1e-5)


def test_modules_and_scales_follow_the_config(made):
    base, folder = made("patterns")
    adapter = adaptools.load(folder)
    peft = peft_model(base, folder)
    from peft.tuners.lora import LoraLayer

    layers = {n.removeprefix("base_model.model."): m for n, m in peft.named_modules() if isinstance(m, LoraLayer)}
    assert set(adapter.modules) == set(layers)
    for name, module in adapter.items():
        assert module.rank == layers[name].r["default"]
        assert module.scale == pytest.approx(layers[name].scaling["default"])
    assert adapter["model.layers.1.self_attn.q_proj"].rank == 6
    assert adapter["model.layers.0.self_attn.q_proj"].rank == 3


@pytest.mark.parametrize(
    "module",
    ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj",
     "model.layers.1.mlp.down_proj", "xq_proj", "model.layers.0.self_attn.v_proj"],
)
def test_pattern_value_is_peft_get_pattern_key(module):
    from peft.utils.other import get_pattern_key

    patterns = {"layers.1.self_attn.q_proj": 6, "q_proj": 3, r"layers\.0\..*proj": 5}
    key = get_pattern_key(patterns.keys(), module)
    assert pattern_value(patterns, module, "default") == patterns.get(key, "default")


def test_dora_magnitudes_are_kept_exactly(made, tmp_path):
    for case in ("dora", "conv2d_dora", "embedding_dora"):
        _, folder = made(case)
        stored = {k: v for k, v in load_file(folder / "adapter_model.safetensors").items() if "magnitude" in k}
        adapter = adaptools.load(folder)
        assert adapter.is_dora and len(stored) == len(adapter)
        adapter.save(tmp_path / case)
        written = load_file(tmp_path / case / "adapter_model.safetensors")
        for key, tensor in stored.items():
            assert torch.equal(written[key], tensor)
        assert json.loads((tmp_path / case / "adapter_config.json").read_text())["use_dora"] is True


def test_full_tensors_are_keyed_as_in_the_base(made):
    _, folder = made("embedding")
    assert "model.embed_tokens.weight" in adaptools.load(folder).extra  # from embed_tokens.base_layer.weight
    _, folder = made("modules_to_save")
    assert set(adaptools.load(folder).extra) == {"lm_head.weight"}
    _, folder = made("bias_all")
    extra = adaptools.load(folder).extra
    assert "transformer.h.0.attn.c_attn.bias" in extra and "transformer.h.0.ln_1.bias" in extra


def test_unknown_config_keys_pass_through(made, tmp_path):
    base, folder = made("llama_gqa")
    source = tmp_path / "source"
    source.mkdir()
    (source / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    config = json.loads((folder / "adapter_config.json").read_text())
    config["a_future_peft_option"] = {"kept": [1, 2, 3]}
    (source / "adapter_config.json").write_text(json.dumps(config))
    adaptools.load(source).save(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["a_future_peft_option"] == {"kept": [1, 2, 3]}
    assert written["task_type"] == config["task_type"] and written["base_model_name_or_path"] == str(base)
    torch.testing.assert_close(logits(peft_model(base, tmp_path / "out")), logits(peft_model(base, folder)))


@pytest.mark.parametrize("pruned", [False, True])
def test_adalora_reads_as_lora(pruned, llama_base, tmp_path):
    """ΔW = B·(A⊙E)·alpha/(ranknum+1e-5), ranknum = init_r even after PEFT pruned ranks via rank_pattern."""
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(init_r=6, target_r=4, total_step=10, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(load_base(llama_base), config)
    randomize_adapter(model)
    if pruned:
        model.peft_config["default"].rank_pattern = {
            name: [i % 2 == 0 or "v_proj" in name for i in range(6)]
            for name, _ in model.base_model.model.named_parameters() if "lora_E" in name
        }
    model.save_pretrained(tmp_path / "adalora")
    adapter = adaptools.load(tmp_path / "adalora")
    assert adapter["model.layers.0.self_attn.q_proj"].rank == (3 if pruned else 6)
    assert adapter["model.layers.0.self_attn.v_proj"].rank == 6
    adapter.save(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    reference = logits(peft_model(llama_base, tmp_path / "adalora"))
    torch.testing.assert_close(logits(peft_model(llama_base, tmp_path / "lora")), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(merge_by_hand(load_base(llama_base), adapter)), reference, rtol=1e-4, atol=1e-5)


def test_other_peft_types_are_unsupported(llama_base, tmp_path):
    from peft import VeraConfig, get_peft_model

    get_peft_model(load_base(llama_base), VeraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "vera")
    with pytest.raises(adaptools.UnsupportedAdapterError, match="unsupported adapter type 'VERA'"):
        adaptools.load(tmp_path / "vera")


def test_weights_file_path_reads_like_its_folder(made):
    _, folder = made("dora")
    by_folder, by_file = adaptools.load(folder), adaptools.load(folder / "adapter_model.safetensors")
    assert by_folder.ranks == by_file.ranks
    assert all(torch.equal(by_folder.delta(n), by_file.delta(n)) for n in by_folder)


def test_mixed_dora_and_lora_modules_are_refused(made, tmp_path):
    _, folder = made("dora")
    adapter = adaptools.load(folder)
    first = next(iter(adapter))
    modules = dict(adapter.modules, **{first: replace(adapter[first], magnitude=None)})
    with pytest.raises(adaptools.DoraError, match="use_dora applies to every module"):
        adapter.with_modules(modules).save(tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()
