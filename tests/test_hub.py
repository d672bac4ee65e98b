"""Model cards, recipes, replay and Hub pushes: the real huggingface_hub client against the fake Hub of hub_server.py
on 127.0.0.1 (no network beyond loopback)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import huggingface_hub
from huggingface_hub import constants as hub_constants
import pytest
import torch
from conftest import run_cli
from factories import make_peft_adapter
from huggingface_hub import ModelCard
from hub_server import FakeHub
from safetensors import safe_open
from safetensors.torch import load_file

import adaptools
from adaptools import hub as adaptools_hub
from adaptools.card import model_card
from adaptools.atomic import atomic_output
from adaptools.recipe import RECIPE_KEY, RECIPE_NAME
from adaptools_cli.options import output_options
from adaptools_cli.provenance import provenance

TOKEN = "hf_adaptoolsTestToken0123456789"
OUTPUT_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors", RECIPE_NAME}


@pytest.fixture(scope="module")
def adapter(llama_base, tmp_path_factory) -> Path:
    """A PEFT adapter on the tiny Llama whose README.md (PEFT's card) declares license apache-2.0."""
    path = make_peft_adapter(llama_base, tmp_path_factory.mktemp("inputs") / "lora", r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"])
    card = ModelCard.load(path / "README.md")
    card.data.license = "apache-2.0"
    card.save(path / "README.md")
    return path


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    """The fake Hub, running; huggingface_hub pointed at it with HF_TOKEN=TOKEN, telemetry off, not offline."""
    with FakeHub(token=TOKEN) as server:
        monkeypatch.setattr(hub_constants, "ENDPOINT", server.url)
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT folder or a safetensors file."""
    return load_file(path / "adapter_model.safetensors" if path.is_dir() else path)


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and ta
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def assert_no_token(*texts: str) -> None:
    assert all(TOKEN not in text for text in texts)


def test_convert_writes_card_and_recipe_and_pushes(adapter, hub, runner, tmp_path):
    out = tmp_path / "converted"
    result = run_cli(runner, "convert", adapter, "--to", "peft", "-o", out, "--push-to", "org/converted")
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES

    recipe = json.loads((out / RECIPE_NAME).read_text())
    assert recipe["command"] == ["convert"] and recipe["params"]["to"] == "peft"
    [entry] = recipe["inputs"]
    assert entry["path"] == os.path.relpath(adapter, out)  # relative to the output: no local folder names
    assert entry["files"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in adapter.iterdir()}

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and card.data.license == "apache-2.0"
    assert {"adaptools", "convert"} <= set(card.data.tags)
    assert card.data.base_model is None  # the base is a local folder, not a Hub id: named in the text only
    assert f"`{Path(llama_base_of(adapter)).name}`" in card.text and entry["sha256"] in card.text
    assert str(Path(llama_base_of(adapter)).parent) not in card.text  # privacy: the base's name, not its path

    [commit] = hub.commits
    assert commit.repo_id == "org/converted" and commit.revision == "main"
    assert commit.summary == "adaptools convert: converted"
    assert commit.files == {p.name: p.read_bytes() for p in out.iterdir()}
    assert hub.repos["org/converted"].private is False and hub.unhandled == []
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in hub.requests)
    assert "pushed converted to " in result.stdout
    assert_no_token(result.stdout, result.stderr, (out / "README.md").read_text(), (out / RECIPE_NAME).read_text())


def llama_base_of(adapter: Path) -> str:
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_push_command_private_branch_message_and_pull_request(adapter, hub, runner, tmp_path):
    out = tmp_path / "out"
    assert run_cli(runner, "convert", adapter, "--to", "peft", "-o", out).exit_code == 0
    assert hub.requests == []  # no push without --push-to

    result = run_cli(runner, "push", out, "--repo-id", "org/private", "--private", "--revision", "dev",
                     "--commit-message", "first version")
    assert result.exit_code == 0, result.output
    result = run_cli(runner, "push", out, "--repo-id", "org/private", "--create-pr", "--commit-message", "proposal")
    assert result.exit_code == 0, result.output
    assert "/discussions/1" in result.stdout

    assert hub.repos["org/private"].private is True
    assert [(c.revision, c.summary) for c in hub.commits] == [("dev", "first version"), ("refs/pr/1", "proposal")]
    assert hub.repos["org/private"].pulls == ["proposal"]
    assert hub.repos["org/private"].branches["dev"] == {p.name: p.read_bytes() for p in out.iterdir()}
    assert hub.unhandled == []

    result = run_cli(runner, "push", out, "--repo-id", "org/private", "--create-pr", "--revision", "dev")
    assert result.exit_code == 2 and result.stderr.startswith("error: --create-pr")
    result = run_cli(runner, "convert", out, "--to", "peft", "-o", tmp_path / "never", "--push-to", "org/a/b")
    assert result.exit_code == 2 and "not a Hub repo id" in result.stderr and not (tmp_path / "never").exists()


def test_single_file_output_holds_its_recipe_and_pushes_alone(adapter, hub, runner, tmp_path):
    out = tmp_path / "lora.safetensors"
    result = run_cli(runner, "convert", adapter, "--to", "kohya", "-o", out, "--push-to", "org/kohya")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no card, no file beside it
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    recipe = json.loads(metadata[RECIPE_KEY])
    assert recipe["output_type"] == "file" and recipe["command"] == ["convert"]
    assert recipe["inputs"][0]["path"] == os.path.relpath(adapter, tmp_path)  # relative to the file's folder
    assert hub.commits[0].files == {out.name: out.read_bytes()}


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        ("wrong token", "refused the credentials (401)"),
        ("404", "not found"),
        ("drop", "lost the connection"),
    ],
)
def test_push_failures_are_one_error_line_and_keep_the_output(adapter, hub, runner, tmp_path, monkeypatch, failure,
                                                              expected):
    if failure == "wrong token":
        monkeypatch.setenv("HF_TOKEN", "hf_wrongTokenWrongToken0123")
    elif failure == "404":
        hub.fail(404, "/preupload/")
    else:
        hub.fail("drop", "/api/repos/create")
    out = tmp_path / "out"
    result = run_cli(runner, "convert", adapter, "--to", "peft", "-o", out, "--push-to", "org/failing")

    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and expected in line and "org/failing" in line
    written = [(out / name).read_text() for name in ("README.md", RECIPE_NAME)]
    assert_no_token(result.stdout, result.stderr, *written)
    assert all("hf_wrongTokenWrongToken0123" not in text for text in (result.stdout, result.stderr, *written))
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert adaptools.load(out).modules.keys() == adaptools.load(adapter).modules.keys()
    assert hub.commits == []


def test_replay_reproduces_and_refuses_changed_inputs(adapter, runner, tmp_path):
    source = tmp_path / "input"
    source.mkdir()
    for p in adapter.iterdir():
        (source / p.name).write_bytes(p.read_bytes())
    first, kohya = tmp_path / "first", tmp_path / "first.safetensors"
    assert run_cli(runner, "convert", source, "--to", "peft", "-o", first).exit_code == 0
    assert run_cli(runner, "convert", source, "--to", "kohya", "-o", kohya).exit_code == 0

    again = tmp_path / "again"
    result = run_cli(runner, "replay", first / RECIPE_NAME, "-o", again)
    assert result.exit_code == 0, result.output
    assert_same_tensors(first, again)
    assert (again / RECIPE_NAME).read_text() == (first / RECIPE_NAME).read_text()
    result = run_cli(runner, "replay", kohya, "-o", tmp_path / "k2.safetensors")
    assert result.exit_code == 0, result.output
    assert_same_tensors(kohya, tmp_path / "k2.safetensors")

    config = json.loads((source / "adapter_config.json").read_text())
    config["lora_alpha"] *= 2
    (source / "adapter_config.json").write_text(json.dumps(config))
    result = run_cli(runner, "replay", first, "-o", tmp_path / "changed")
    assert result.exit_code == 2 and not (tmp_path / "changed").exists()
    assert "changed since the recipe was recorded" in result.stderr and "adapter_config.json" in result.stderr
    result = run_cli(runner, "replay", first, "-o", tmp_path / "changed", "--ignore-hashes")
    assert result.exit_code == 0, result.output
    doubled = tensors(tmp_path / "changed")
    assert any(not torch.equal(doubled[k], v) for k, v in tensors(first).items())


def test_push_command_in_a_process_reads_hf_endpoint_and_hf_token(adapter, runner, tmp_path):
    out = tmp_path / "out"
    assert run_cli(runner, "convert", adapter, "--to", "peft", "-o", out).exit_code == 0
    with FakeHub(token=TOKEN) as server:
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        env.update(HF_ENDPOINT=server.url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "hf"))
        proc = subprocess.run([sys.executable, "-m", "adaptools_cli", "push", str(out), "--repo-id", "org/proc"],
                              env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert server.commits[0].files.keys() == OUTPUT_FILES
    assert_no_token(proc.stdout, proc.stderr)


def test_large_folders_use_upload_large_folder_where_the_client_has_it(adapter, hub, runner, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_cli(runner, "convert", adapter, "--to", "peft", "-o", out).exit_code == 0
    calls = []
    monkeypatch.setattr(adaptools_hub, "LARGE_FOLDER_BYTES", 1)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_large_folder", lambda self, **kw: calls.append(kw),
                        raising=False)
    url = adaptools_hub.push(out, "org/large", revision="dev")
    assert calls == [{"repo_id": "org/large", "folder_path": out, "repo_type": "model", "revision": "dev"}]
    assert url.endswith("org/large/tree/dev") and hub.commits == []
    adaptools_hub.push(out, "org/large", create_pr=True)  # upload_large_folder opens no pull request
    assert len(calls) == 1 and hub.commits[0].revision == "refs/pr/1"


def test_card_front_matter_license_and_base_model_rules():
    recipe = {"kind": "model", "operation": "merge", "command": ["merge"], "adaptools_version": "0",
              "params": {"dtype": "bfloat16", "adapters": ["/x/a"]},
              "inputs": [{"param": "adapters", "path": "/x/a", "sha256": "ab" * 32}],
              "report": [{"module": f"layers.{i}.q_proj", "rel_error": 1e-3 * i} for i in range(150)]}
    card = ModelCard(model_card(recipe, "merged", "meta-llama/Llama-3.1-8B",
                                inputs_meta=[{"license": "mit"}, {"license": "apache-2.0"}]))
    assert card.data.library_name == "transformers" and card.data.base_model == "meta-llama/Llama-3.1-8B"
    assert card.data.license is None and "different licenses (apache-2.0, mit)" in card.text
    assert "| dtype | bfloat16 |" in card.text and "layers.99.q_proj" in card.text
    assert "layers.100.q_proj" not in card.text and "First 100 of 150 modules" in card.text

    agreed = ModelCard(model_card(recipe, "merged", "/local/base", inputs_meta=[
        {"license": "other", "license_name": "llama3", "base_model": "meta-llama/Meta-Llama-3-8B"}, {},
        {"license": "other", "license_name": "llama3"}]))
    assert agreed.data.license == "other" and agreed.data.license_name == "llama3"
    assert agreed.data.base_model == "meta-llama/Meta-Llama-3-8B"


@click.group()
def toy() -> None:
    """A group holding a command that follows the provenance protocol."""


@toy.command()
@click.argument("source", type=click.Path())
@click.option("--report", "report_path", type=click.Path())
@output_options
@provenance("copy", kind="model")
def copy(source: str, report_path: str | None, output: str, overwrite: bool) -> dict:
    """Copy SOURCE into OUTPUT/a and OUTPUT/b; report one row per copy."""
    rows = []
    with atomic_output(output) as folder:
        for name in ("a", "b"):
            (folder / name).mkdir()
            (folder / name / "x.bin").write_bytes(Path(source).read_bytes())
            rows.append({"module": name, "bytes": Path(source).stat().st_size, "error": 0.25})
    Path(report_path).write_text(json.dumps(rows))
    return {"summary": rows, "base_model": "org/base", "license": "mit", "folders": [Path(output) / "a", Path(output) / "b"]}


def test_protocol_summary_base_model_license_folders_and_output_params(runner, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"abc")
    out = tmp_path / "out"
    result = runner.invoke(toy, ["copy", str(source), "--report", str(tmp_path / "report.json"), "-o", str(out)])
    assert result.exit_code == 0, result.output

    recipe = json.loads((out / RECIPE_NAME).read_text())
    assert recipe["command"] == ["copy"] and recipe["kind"] == "model" and recipe["output_params"] == ["report_path"]
    assert recipe["inputs"] == [{"param": "source", "path": "../source.bin", "sha256": hashlib.sha256(b"abc").hexdigest()}]
    assert recipe["report"] == json.loads((tmp_path / "report.json").read_text())
    assert not (out / "README.md").exists()
    for name in ("a", "b"):
        card = ModelCard.load(out / name / "README.md")
        assert card.data.library_name == "transformers" and card.data.base_model == "org/base"
        assert card.data.license == "mit" and card.data.tags == ["adaptools", "copy"]
        assert "| a | 3 | 0.25 |" in card.text and "| b | 3 | 0.25 |" in card.text


def test_combine_and_rerank_record_replay_and_push(adapter, llama_base, hub, runner, tmp_path):
    other = make_peft_adapter(llama_base, tmp_path / "other", seed=2, r=2, lora_alpha=4,
                              target_modules=["q_proj", "v_proj"])
    combined = tmp_path / "combined"
    assert run_cli(runner, "combine", adapter, other, "--weights", "0.7,0.3", "-o", combined).exit_code == 0
    result = run_cli(runner, "replay", combined, "-o", tmp_path / "combined again")
    assert result.exit_code == 0, result.output
    assert_same_tensors(combined, tmp_path / "combined again")

    reranked, report = tmp_path / "reranked", tmp_path / "report.json"
    result = run_cli(runner, "rerank", combined, "--rank", "2", "--report", report, "-o", reranked,
                     "--push-to", "org/reranked")
    assert result.exit_code == 0, result.output
    recipe = json.loads((reranked / RECIPE_NAME).read_text())
    assert [e["param"] for e in recipe["inputs"]] == ["adapter"] and recipe["output_params"] == ["report_path"]
    modules = json.loads(report.read_text())["modules"]
    assert recipe["report"] == [{"module": name, **row} for name, row in modules.items()]
    card = ModelCard.load(reranked / "README.md")
    assert {"adaptools", "rerank", "lora"} <= set(card.data.tags) and card.data.license == "apache-2.0"
    assert all(f"| {name} |" in card.text for name in modules)
    assert hub.commits[0].files == {p.name: p.read_bytes() for p in reranked.iterdir()}

    result = run_cli(runner, "replay", reranked, "-o", tmp_path / "reranked again")
    assert result.exit_code == 0, result.output
    assert len(hub.commits) == 1  # pushes are not replayed
    again = tmp_path / "reranked again"
    assert str(report) not in result.stdout  # the side file is written inside the output, under adaptools' name
    assert json.loads((again / "report.json").read_text())["modules"] == modules
    assert_same_tensors(reranked, tmp_path / "reranked again")


def test_merge_each_cards_per_model_replay_and_push(adapter, llama_base, hub, runner, tmp_path):
    import shutil

    base = Path(shutil.copytree(llama_base, tmp_path / "base"))
    ModelCard("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# base\n").save(base / "README.md")
    other = make_peft_adapter(llama_base, tmp_path / "other", seed=2, r=2, lora_alpha=4, target_modules=["v_proj"])
    merged = tmp_path / "merged"
    result = run_cli(runner, "merge", base, adapter, other, "--each", "-o", merged, "--push-to", "org/merged")
    assert result.exit_code == 0, result.output
    recipe = json.loads((merged / RECIPE_NAME).read_text())
    assert [e["param"] for e in recipe["inputs"]] == ["base", "adapters", "adapters"] and recipe["kind"] == "model"
    for name in (adapter.name, other.name):
        card = ModelCard.load(merged / name / "README.md")
        assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
        assert card.text.lstrip().startswith(f"# {name}\n")
    files = {p.relative_to(merged).as_posix(): p.read_bytes() for p in merged.rglob("*") if p.is_file()}
    assert hub.commits[0].files == files

    result = run_cli(runner, "replay", merged, "-o", tmp_path / "again")
    assert result.exit_code == 0, result.output
    for name in (adapter.name, other.name):
        first, again = (load_file(m / name / "model.safetensors") for m in (merged, tmp_path / "again"))
        assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_recipe_takes_the_sha256_of_hugging_face_cache_blobs_by_name(tmp_path, monkeypatch):
    """A file of a Hugging Face cache snapshot that links to a blob named by its sha256 (LFS) is not read again;
    other files (a git blob is named by its sha1) are hashed, and the folder digest is the same either way."""
    from adaptools import recipe

    weights, config = b"\x00weights" * 1000, b'{"model_type": "llama"}'
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes(weights)
    (plain / "config.json").write_bytes(config)
    repo = tmp_path / "hub" / "models--org--base"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for name, data, blob in [("model.safetensors", weights, hashlib.sha256(weights).hexdigest()),
                             ("config.json", config, hashlib.sha1(config).hexdigest())]:
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))
    expected = recipe.hash_input(plain)
    read = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: read.append(Path(path).name) or real_open(path, *a, **k))
    cached = recipe.hash_input(snapshot)
    assert cached["files"] == expected["files"] and cached["sha256"] == expected["sha256"]
    assert read == ["config.json"]  # the weights' blob was not read
