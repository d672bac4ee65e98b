"""Every user mistake: a typed exception in the API; in the CLI one `error: ...` line on stderr, exit status 2,
no traceback (unless --debug), and nothing left behind where the output would have gone."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from factories import make_peft_adapter
from safetensors.torch import load_file, save_file

import adaptools

pytestmark = pytest.mark.usefixtures("single_thread")

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def good(llama_base, tmp_path_factory) -> Path:
    """A valid PEFT LoRA folder (q_proj, v_proj, r=4) to break in many ways."""
    return make_peft_adapter(llama_base, tmp_path_factory.mktemp("good") / "peft", r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"])


def edit_tensors(change):
    """A mutation that rewrites adapter_model.safetensors after `change(state)`."""
    def mutate(folder: Path) -> None:
        state = load_file(folder / WEIGHTS)
        change(state)
        save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
    return mutate


def edit_config(change):
    def mutate(folder: Path) -> None:
        config = json.loads((folder / CONFIG).read_text())
        change(config)
        (folder / CONFIG).write_text(json.dumps(config))
    return mutate


def truncate(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) - 100])


def set_value(key: str, value: float):
    def change(state):
        state[key][0, 0] = value
    return change


# name: (mutation of a copy of the good adapter, exception type, message fragment)
BROKEN = {
    "missing_path": (lambda f: shutil.rmtree(f), adaptools.InputNotFoundError, "does not exist"),
    "not_an_adapter": (lambda f: [p.unlink() for p in f.iterdir()], adaptools.AdapterFormatError, "not an adapter folder"),
    "no_weights": (lambda f: (f / WEIGHTS).unlink(), adaptools.AdapterFormatError, "no adapter_model.safetensors"),
    "truncated_safetensors": (truncate, adaptools.AdapterFormatError, "this file is truncated"),
    "garbage_safetensors": (lambda f: (f / WEIGHTS).write_bytes(os.urandom(4096)), adaptools.AdapterFormatError,
                            "not a readable safetensors file"),
    "invalid_json": (lambda f: (f / CONFIG).write_text('{"r": 4,'), adaptools.AdapterFormatError, "not valid JSON"),
    "rank_mismatch": (edit_tensors(lambda s: s.__setitem__(f"{Q}.lora_B.weight", torch.zeros(32, 3))),
                      adaptools.RankMismatchError, "lora_A has rank 4 but lora_B has rank 3"),
    "rank_not_config": (edit_config(lambda c: c.update(r=8)), adaptools.ShapeMismatchError, "the config says r=8"),
    "one_dim_factor": (edit_tensors(lambda s: s.__setitem__(f"{Q}.lora_B.weight", torch.zeros(32))),
                       adaptools.ShapeMismatchError, "are not LoRA factors"),
    "dora_without_magnitude": (edit_config(lambda c: c.update(use_dora=True)), adaptools.AdapterFormatError,
                               "has no lora_magnitude_vector"),
    "nan": (edit_tensors(set_value(f"{Q}.lora_A.weight", float("nan"))), adaptools.NonFiniteError, "NaN or Inf"),
    "inf": (edit_tensors(set_value(f"{Q}.lora_B.weight", float("-inf"))), adaptools.NonFiniteError, "NaN or Inf"),
    "unsupported_type": (edit_config(lambda c: c.update(peft_type="VERA")), adaptools.UnsupportedAdapterError,
                         "unsupported adapter type 'VERA'"),
    "alpha_not_a_number": (edit_config(lambda c: c.update(lora_alpha="x")), adaptools.AdapterFormatError,
                           "'lora_alpha' must be a finite number, got 'x'"),
    "pattern_not_a_regex": (edit_config(lambda c: c.update(rank_pattern={"(": 2})), adaptools.AdapterFormatError,
                            "rank_pattern key '(' is not a regular expression"),
    "pattern_not_a_dict": (edit_config(lambda c: c.update(alpha_pattern=["q_proj"])), adaptools.AdapterFormatError,
                           "'alpha_pattern' must be a JSON object"),
    # Wrong values in adapter_config.json (issue 13): typed, with the key named.
    "r_infinity": (edit_config(lambda c: c.update(r=float("inf"))), adaptools.AdapterFormatError,
                   "not valid JSON (Infinity is not a JSON number)"),
    "r_string": (edit_config(lambda c: c.update(r="8")), adaptools.AdapterFormatError,
                 "'r' must be a positive integer, got '8'"),
    "r_fraction": (edit_config(lambda c: c.update(r=8.5)), adaptools.AdapterFormatError,
                   "'r' must be a positive integer, got 8.5"),
    "r_bool": (edit_config(lambda c: c.update(r=True)), adaptools.AdapterFormatError,
               "'r' must be a positive integer, got True"),
    "alpha_nan": (edit_config(lambda c: c.update(lora_alpha=float("nan"))), adaptools.AdapterFormatError,
                  "not valid JSON (NaN is not a JSON number)"),
    "alpha_overflow": (lambda f: (f / CONFIG).write_text('{"r": 4, "lora_alpha": 1e400}'), adaptools.AdapterFormatError,
                       "the number 1e400 is out of range"),
    "rslora_yes": (edit_config(lambda c: c.update(use_rslora="yes")), adaptools.AdapterFormatError,
                   "'use_rslora' must be true or false, got 'yes'"),
    "dora_one": (edit_config(lambda c: c.update(use_dora=1)), adaptools.AdapterFormatError,
                 "'use_dora' must be true or false, got 1"),
    "target_modules_number": (edit_config(lambda c: c.update(target_modules=5)), adaptools.AdapterFormatError,
                              "'target_modules' must be a string or a list of strings, got 5"),
    "rank_pattern_zero": (edit_config(lambda c: c.update(rank_pattern={"q_proj": 0})), adaptools.AdapterFormatError,
                          "\"rank_pattern['q_proj']\" must be a positive integer, got 0"),
    "alpha_pattern_negative": (edit_config(lambda c: c.update(alpha_pattern={"q_proj": -2})),
                               adaptools.AdapterFormatError, "must be a positive finite number, got -2"),
    "peft_type_list": (edit_config(lambda c: c.update(peft_type=["LORA"])), adaptools.AdapterFormatError,
                       "'peft_type' must be a string"),
    "config_is_a_folder": (lambda f: ((f / CONFIG).unlink(), (f / CONFIG).mkdir()), adaptools.AdapterFormatError,
                           "is a folder, where a file is expected"),
    "config_deeply_nested": (lambda f: (f / CONFIG).write_text('{"r": 4, "x": ' + "[" * 5000 + "]" * 5000 + "}"),
                             adaptools.AdapterFormatError, "nested more than 64 levels deep"),
    "config_not_utf8": (lambda f: (f / CONFIG).write_bytes(b'{"r": 4, "lora_alpha": 8, "x": "\xff"}'),
                        adaptools.AdapterFormatError, "not UTF-8"),
    "config_not_an_object": (lambda f: (f / CONFIG).write_text("[4]"), adaptools.AdapterFormatError,
                             "does not hold a JSON object"),
    "pickle_not_allowed": (lambda f: (torch.save(load_file(f / WEIGHTS), f / "adapter_model.bin"), (f / WEIGHTS).unlink()),
                           adaptools.PickleNotAllowedError, "--allow-pickle"),
}


def broken_copy(good: Path, tmp_path: Path, case: str) -> Path:
    folder = tmp_path / "input"
    shutil.copytree(good, folder)
    BROKEN[case][0](folder)
    return folder


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert result.stderr.startswith("error: ") and fragment in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_input_raises_a_typed_error(case, good, tmp_path):
    folder = broken_copy(good, tmp_path, case)
    _, error, fragment = BROKEN[case]
    with pytest.raises(error, match=re.escape(fragment)):
        adaptools.load(folder)


@pytest.mark.parametrize("case", list(BROKEN))
@pytest.mark.parametrize("command", ["info", "convert"])
def test_broken_input_is_one_error_line_and_leaves_nothing(case, command, good, tmp_path, runner):
    folder = broken_copy(good, tmp_path, case)
    before = sorted(tmp_path.iterdir())
    args = ["info", folder] if command == "info" else ["convert", folder, "--to", "peft", "-o", tmp_path / "out"]
    assert_one_line_error(run_cli(runner, *args), BROKEN[case][2])
    assert sorted(tmp_path.iterdir()) == before  # no output, no temporary folder beside it


def test_pickle_loads_when_allowed(good, tmp_path, runner):
    folder = broken_copy(good, tmp_path, "pickle_not_allowed")
    result = run_cli(runner, "convert", folder, "--to", "peft", "-o", tmp_path / "out", "--allow-pickle")
    assert result.exit_code == 0, result.stderr
    original = adaptools.load(good)
    converted = adaptools.load(tmp_path / "out")
    assert all(torch.equal(original.delta(n), converted.delta(n)) for n in original)


def test_not_a_tensor_file(tmp_path, runner):
    (tmp_path / "notes.txt").write_text("not an adapter")
    assert_one_line_error(run_cli(runner, "info", tmp_path / "notes.txt"), "not a readable safetensors file")


def test_a_truncated_kohya_file_says_so(good, tmp_path, runner):
    """`info` reads a .safetensors file's header first (is it a diffusion checkpoint?): a file cut short is one error
    line saying it is truncated."""
    kohya = tmp_path / "style.safetensors"
    adaptools.load(good).save(kohya, format="kohya")
    kohya.write_bytes(kohya.read_bytes()[:-20])
    assert_one_line_error(run_cli(runner, "info", kohya), "truncated: an interrupted download?")


@pytest.mark.parametrize("to, name", [("peft", "out"), ("kohya", "out.safetensors")])
def test_existing_output_is_refused_unless_overwrite(to, name, good, tmp_path, runner):
    target = tmp_path / name
    if to == "peft":
        target.mkdir()
        (target / "keep.txt").write_text("old output")
    else:
        target.write_text("old output")
    marker = target / "keep.txt" if to == "peft" else target
    args = ["convert", good, "--to", to, "-o", target]

    assert_one_line_error(run_cli(runner, *args), "already exists")
    assert marker.read_text() == "old output"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]

    result = run_cli(runner, *args, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert adaptools.detect_format(target) == to and not (target / "keep.txt").exists()
    assert set(adaptools.load(target).ranks.values()) == {4}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or backup left


def test_failed_write_leaves_old_output_and_no_temporary(llama_base, tmp_path, runner):
    """kohya cannot hold an embedding LoRA: the error comes while writing, inside the temporary folder."""
    folder = make_peft_adapter(llama_base, tmp_path / "emb", r=4, lora_alpha=8, target_modules=["embed_tokens"])
    target = tmp_path / "out.safetensors"
    assert_one_line_error(run_cli(runner, "convert", folder, "--to", "kohya", "-o", target), "cannot hold an embedding")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]
    target.write_text("old output")
    assert_one_line_error(run_cli(runner, "convert", folder, "--to", "kohya", "-o", target, "--overwrite"), "embedding")
    assert target.read_text() == "old output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb", "out.safetensors"]


def test_debug_shows_the_exception(tmp_path, runner):
    result = run_cli(runner, "--debug", "info", tmp_path / "missing")
    assert isinstance(result.exception, adaptools.InputNotFoundError)


def test_usage_errors_are_one_line(good, runner):
    result = run_cli(runner, "convert", good, "--to", "peft")
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_real_process_exit_status_and_stderr(tmp_path):
    cli_path = str(Path(__file__).resolve().parents[1] / "cli")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [cli_path, os.environ.get("PYTHONPATH")]))}
    missing = tmp_path / "missing"
    done = subprocess.run([sys.executable, "-m", "adaptools_cli", "info", str(missing)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr == f"error: {str(missing)!r} does not exist\n"
    assert done.stdout == ""


@pytest.mark.parametrize("where", ["same", "inside", "holds", "cwd"])
def test_output_that_overlaps_an_input_is_refused(where, good, tmp_path, runner, monkeypatch):
    """-o equal to an input, inside it, holding it, or holding the current folder would destroy what is read."""
    src = tmp_path / "work" / "adapter"
    shutil.copytree(good, src)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(src if where == "cwd" else tmp_path)
    output = {"same": src, "inside": src / "sub", "holds": tmp_path / "work", "cwd": tmp_path / "work"}[where]
    result = run_cli(runner, "rerank", src, "--rank", "2", "-o", output, "--overwrite")
    assert_one_line_error(result, "output")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_two_outputs_on_one_path_are_refused(good, tmp_path, runner):
    result = run_cli(runner, "rerank", good, "--rank", "2", "-o", tmp_path / "x", "--report", tmp_path / "x")
    assert_one_line_error(result, "the same path is given for two outputs")
    assert list(tmp_path.iterdir()) == []


def test_output_below_a_file_is_one_error_line(good, tmp_path, runner):
    (tmp_path / "file").write_text("not a folder")
    result = run_cli(runner, "convert", good, "--to", "peft", "-o", tmp_path / "file" / "sub")
    assert_one_line_error(result, "cannot write the output")


def test_base_config_that_is_not_json_is_one_error_line(good, llama_base, tmp_path, runner):
    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    (base / "config.json").write_text("{not json")
    result = run_cli(runner, "merge", base, good, "-o", tmp_path / "out")
    assert_one_line_error(result, "not valid JSON")
    assert not (tmp_path / "out").exists()
