"""LyCORIS files against the LyCORIS library itself (lycoris-lora): its own modules (LoHa, LoKr, LoCon with Tucker
cores, DoRA) built on a tiny torch model with random weights and saved with its own `save_weights`; adaptools' exact
factors must give the ΔW of LyCORIS's own forward, and `adaptools merge` the outputs of the model with LyCORIS applied.

LyCORIS's forward applies each module's scale alpha/r once; its `merge_to` (get_diff_weight) of lycoris-lora 4.1.3
applies it twice for LoHa and LoKr, so the reference here is the forward.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

import adaptools

lycoris = pytest.importorskip("lycoris")  # the `test` extra installs lycoris-lora
pytestmark = pytest.mark.usefixtures("single_thread")


class Net(nn.Module):
    """A linear layer and two convolutions (3x3 and 1x1, no padding) in a row."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(16, 24)
        self.conv = nn.Conv2d(24, 32, 3)
        self.point = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        h = self.lin0(x).permute(0, 3, 1, 2)
        return self.point(torch.relu(self.conv(h)))


X = torch.randn(2, 5, 5, 16, generator=torch.Generator().manual_seed(5))

CASES = {
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr"),
    "lokr-tucker": dict(algo="lokr", use_tucker=True, linear_dim=1, conv_dim=2),
    "lokr-decompose-both": dict(algo="lokr", decompose_both=True, linear_dim=1),
    "lokr-full": dict(algo="lokr", full_matrix=True),
    "locon-tucker": dict(algo="locon", use_tucker=True, conv_dim=3, conv_alpha=2),
    "locon-dora": dict(algo="locon", dora_wd=True),
}


def lycoris_network(seed: int = 0, **kwargs):
    """(base Net, the same Net with a LyCORIS network applied and random non-zero weights, the network)."""
    from lycoris import create_lycoris

    torch.manual_seed(seed)
    base = Net().eval()
    model = Net().eval()
    model.load_state_dict(base.state_dict())
    logging.disable(logging.WARNING)
    try:
        network = create_lycoris(model, 1.0, **{"linear_dim": 2, "linear_alpha": 1, **kwargs})
    finally:
        logging.disable(logging.NOTSET)
    network.apply_to()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in network.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.5
            # a DoRA magnitude is a row norm: moved, but kept positive (adaptools refuses m <= 0)
            param.copy_((param + noise).abs() + 0.1 if "dora_scale" in name else noise)
    return base, model, network


def save_base(model: nn.Module, folder):
    """The torch model as a checkpoint folder adaptools merges into (model.safetensors + config.json)."""
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    return folder


def lycoris_delta(module, base_layer: nn.Module) -> torch.Tensor:
    """ΔW of a LyCORIS module measured through its own forward: on identity inputs (one-hot images for a conv)."""
    W, b = base_layer.weight, base_layer.bias
    with torch.no_grad():
        if isinstance(base_layer, nn.Linear):
            eye = torch.eye(W.shape[1])
            return (module(eye) - F.linear(eye, W, b)).T
        n = W[0].numel()
        eye = torch.eye(n).reshape(n, *W.shape[1:])
        out = (module(eye) - F.conv2d(eye, W, b)).reshape(n, W.shape[0])
        return out.T.reshape(W.shape)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(case name, saved LyCORIS file, base Net, Net with LyCORIS applied, network)."""
    base, model, network = lycoris_network(**CASES[request.param])
    path = tmp_path_factory.mktemp("lycoris") / f"{request.param}.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return request.param, path, base, model, network


def test_factors_give_lycoris_own_delta(case):
    name, path, base, _, network = case
    adapter = adaptools.load(path)
    assert adapter.source_format == "lycoris" and len(adapter) == 3
    for lora in network.loras:
        base_layer = getattr(base, lora.lora_name.removeprefix("lycoris_"))
        module = adapter[lora.lora_name]
        expected = lycoris_delta(lora, base_layer)
        assert expected.abs().max() > 1e-3
        if module.is_dora:  # LyCORIS DoRA on the output side: W' = m / (‖V‖ + eps) ⊙ V, V = W + ΔW
            V = base_layer.weight.detach() + module.delta().reshape(expected.shape)
            norms = V.flatten(1).norm(dim=1).reshape(-1, *[1] * (V.ndim - 1))
            ours = V * module.magnitude.reshape(norms.shape) / norms - base_layer.weight.detach()
        else:
            ours = module.delta().reshape(expected.shape)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_ranks_are_the_exact_expansions(case):
    """LoHa: r1·r2; LoKr: rank(W1)·rank(W2); LoCon with a Tucker core: r; all at LyCORIS's scale alpha / r."""
    name, path, _, _, network = case
    adapter = adaptools.load(path)
    stored = load_file(path)
    for lora in network.loras:
        module, key = adapter[lora.lora_name], lora.lora_name
        if name.startswith("loha"):
            assert module.rank == stored[f"{key}.hada_w1_b"].shape[0] * stored[f"{key}.hada_w2_b"].shape[0]
        elif name.startswith("lokr"):
            def rank_of(side):
                full = stored.get(f"{key}.lokr_{side}")
                return (torch.linalg.matrix_rank(full.flatten(1)).item() if full is not None
                        else stored[f"{key}.lokr_{side}_b"].shape[0])
            assert module.rank == rank_of("w1") * rank_of("w2")
        else:
            assert module.rank == stored[f"{key}.lora_up.weight"].shape[1]
        torch.testing.assert_close(torch.tensor(module.scale), torch.tensor(float(lora.scale)))


def test_merge_gives_the_model_with_lycoris_applied(case, tmp_path):
    name, path, base, model, _ = case
    folder = save_base(base, tmp_path / "base")
    adaptools.merge(folder, path, out=tmp_path / "merged")
    merged = Net().eval()
    merged.load_state_dict(load_file(tmp_path / "merged" / "model.safetensors"))
    with torch.no_grad():
        expected = model(X)
        assert (base(X) - expected).abs().max() > 1e-2
        torch.testing.assert_close(merged(X), expected, rtol=1e-4, atol=1e-4)


def test_combine_and_spectrum_work_on_lycoris_files(tmp_path, runner):
    """The exact factors combine like any LoRA: ΔW of the sum is the sum of the families' ΔW."""
    paths = []
    for seed, algo in enumerate(("loha", "lokr", "locon")):  # LoCon's 1x1 conv meets LoHa's flattened factors
        _, _, network = lycoris_network(seed=seed, algo=algo, use_tucker=True)
        paths.append(tmp_path / f"{algo}.safetensors")
        network.save_weights(str(paths[-1]), torch.float32, {})
    adapters = [adaptools.load(p) for p in paths]
    total = adaptools.combine(adapters, [1.0, -0.5, 2.0])
    for name in total:
        flat = [a.delta(name).flatten(1) for a in adapters]
        expected = flat[0] - 0.5 * flat[1] + 2.0 * flat[2]
        torch.testing.assert_close(total.delta(name).flatten(1), expected, rtol=1e-4, atol=1e-5)
        assert total[name].rank == sum(a[name].rank for a in adapters)
        assert total[name].kind == ("linear" if name == "lycoris_lin0" else "conv")
    result = run_cli(runner, "spectrum", paths[0])
    assert result.exit_code == 0, result.stderr
    assert "lycoris_conv" in result.stdout


def test_alpha_zero_or_missing_means_rank(tmp_path):
    base, _, network = lycoris_network(algo="loha", linear_alpha=1)
    path = tmp_path / "loha.safetensors"
    network.save_weights(str(path), torch.float32, {})
    state = load_file(path)
    save_file({k: (torch.tensor(0.0) if k == "lycoris_lin0.alpha" else v) for k, v in state.items()
               if k != "lycoris_conv.alpha"}, tmp_path / "odd.safetensors")
    adapter = adaptools.load(tmp_path / "odd.safetensors")
    assert adapter["lycoris_lin0"].scale == adapter["lycoris_conv"].scale == 1.0
    assert adapter["lycoris_point"].scale == 0.5


def test_rerank_of_loha_reports_the_exact_error(tmp_path):
    _, _, network = lycoris_network(algo="loha", linear_dim=3, conv_dim=3)
    path = tmp_path / "loha.safetensors"
    network.save_weights(str(path), torch.float32, {})
    adapter = adaptools.load(path)
    assert adapter.ranks["lycoris_lin0"] == 9
    reranked, report = adaptools.rerank(adapter, rank=4)
    for name, module in adapter.items():
        dense = module.delta(torch.float64).reshape(module.out_features, -1)
        S = torch.linalg.svdvals(dense)
        fit = report.modules[name]
        # rank r1·r2 = 9, or dense (rank min(out, in)) where that is smaller (adaptools.bounds)
        assert (fit.old_rank, fit.new_rank) == (min(9, *dense.shape), 4)
        assert fit.error == pytest.approx(S[4:].square().sum().sqrt().item(), rel=1e-4)
        kept = reranked[name].delta(torch.float64).reshape(dense.shape)
        assert (dense - kept).norm().item() == pytest.approx(fit.error, rel=1e-3)


def test_rerank_cli_writes_a_kohya_file(tmp_path, runner):
    """A LyCORIS file keeps its kohya names: the re-ranked LoRA is written as a kohya file by default."""
    _, _, network = lycoris_network(algo="lokr", linear_dim=1)
    network.save_weights(str(tmp_path / "lokr.safetensors"), torch.float32, {})
    result = run_cli(runner, "rerank", tmp_path / "lokr.safetensors", "--rank", "2", "-o", tmp_path / "r2.safetensors")
    assert result.exit_code == 0, result.stderr
    written = adaptools.load(tmp_path / "r2.safetensors")
    expected, _ = adaptools.rerank(adaptools.load(tmp_path / "lokr.safetensors"), rank=2)
    assert written.source_format == "kohya" and written.ranks == expected.ranks
    for name in expected:
        torch.testing.assert_close(written.delta(name), expected.delta(name))


def test_info_shows_family_and_expanded_rank(case, runner):
    name, path, _, _, _ = case
    result = run_cli(runner, "info", path, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    adapter = adaptools.load(path)
    assert info["format"] == "lycoris"
    assert {m: v["rank"] for m, v in info["modules"].items()} == adapter.ranks
    text = run_cli(runner, "info", path)
    assert "format: lycoris" in text.stdout


def test_input_side_dora_is_refused_clearly(tmp_path, runner):
    from lycoris.modules.locon import LoConModule

    torch.manual_seed(0)
    layer = nn.Linear(16, 24)
    module = LoConModule("lycoris_lin0", layer, lora_dim=2, alpha=1, weight_decompose=True, wd_on_out=False)
    state = {f"lycoris_lin0.{k}": v.detach().contiguous() for k, v in module.custom_state_dict().items()}
    assert state["lycoris_lin0.dora_scale"].shape == (1, 16)
    save_file(state, tmp_path / "dora.safetensors")
    result = run_cli(runner, "info", tmp_path / "dora.safetensors")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "input-side weight decomposition" in result.stderr and result.stderr.startswith("error: ")


def test_other_lycoris_algorithms_are_named_in_the_error(tmp_path, runner):
    save_file({"lycoris_lin0.oft_blocks": torch.zeros(4, 4, 4), "lycoris_lin0.alpha": torch.tensor(1.0)},
              tmp_path / "oft.safetensors")
    result = run_cli(runner, "info", tmp_path / "oft.safetensors")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and "OFT" in result.stderr and "not a low-rank weight update" in result.stderr
