"""Hub repo ids as inputs: the real huggingface_hub client downloads from the fake Hub of hub_server.py on
127.0.0.1 (HF_ENDPOINT and a temporary HF_HOME per test), and every result equals the one of the same files
given as local folders."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from factories import make_base, make_peft_adapter, tuned_copy
from fp8_factories import make_ct_fp8_base
from huggingface_hub import ModelCard, constants
from hub_server import FakeHub
from safetensors.torch import load_file

import adaptools
from adaptools.recipe import RECIPE_NAME, folder_digest
from adaptools.sources import remote_header

TOKEN = "hf_adaptoolsReaderToken0123456789"
PICKLE_OR_STATE = (".bin", ".pt", ".pth", "trainer_state.json")


@pytest.fixture(scope="module")
def local(llama_base, tmp_path_factory) -> dict[str, Path]:
    """Local inputs: a base with tokenizer files, two commits' worth of one LoRA, a second LoRA, a kohya file
    and an adapter stored as a pickle only."""
    root = tmp_path_factory.mktemp("local")
    base = Path(shutil.copytree(llama_base, root / "base"))
    (base / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (base / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    inputs = {
        "base": base,
        "lora": make_peft_adapter(llama_base, root / "lora", seed=1, **kwargs),
        "lora_v2": make_peft_adapter(llama_base, root / "lora_v2", seed=3, **kwargs),
        "other": make_peft_adapter(llama_base, root / "other", seed=2, r=2, lora_alpha=4, target_modules=["v_proj"]),
    }
    inputs["kohya"] = root / "style.safetensors"
    adaptools.load(inputs["other"]).save(inputs["kohya"], format="kohya")
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(inputs["other"] / "adapter_config.json", pickled)
    torch.save(load_file(inputs["other"] / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    inputs["pickled"] = pickled
    inputs["tuned"] = tuned_copy(llama_base, root / "tuned")
    inputs["fp8"] = make_ct_fp8_base(root / "fp8", "block", dtype=torch.float32, hidden_size=32, intermediate_size=48)
    return inputs


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def point_client_at(monkeypatch, url: str, home: Path, token: str | None = None) -> None:
    """huggingface_hub (in this process, and in child processes through the environment) on the fake Hub, with
    the cache and login files under `home`, online, telemetry off."""
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_TOKEN_PATH", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    values = {"ENDPOINT": url, "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
              "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_TOKEN_PATH": str(home / "token"),
              "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"), "HF_HUB_OFFLINE": False,
              "HF_HUB_DISABLE_TELEMETRY": True}
    for name, value in values.items():
        monkeypatch.setattr(constants, name, value)


def go_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture()
def hub(local, monkeypatch, tmp_path):
    """The fake Hub with org/base (safetensors, a .bin copy, training states), org/lora (two commits, tag v1,
    a .bin copy, a checkpoint folder), org/other, org/kohya, org/pickled, org/private and org/gated."""
    with FakeHub(readers={TOKEN}) as server:
        junk = {"optimizer.pt": b"\x80optimizer", "scheduler.pt": b"\x80scheduler", "training_args.bin": b"\x80args",
                "trainer_state.json": b"{}", "rng_state.pth": b"\x80rng"}
        pickled_base = io.BytesIO()
        torch.save(load_file(local["base"] / "model.safetensors"), pickled_base)
        server.add_commit("org/base", {**files_of(local["base"]), **junk, "pytorch_model.bin": pickled_base.getvalue(),
                                       "original/consolidated.00.pth": b"\x80pickle"})
        lora = files_of(local["lora"])
        pickled_copy = (local["pickled"] / "adapter_model.bin").read_bytes()
        server.v1 = server.add_commit("org/lora", {**lora, **junk, "adapter_model.bin": pickled_copy,
                                                   **{f"checkpoint-10/{k}": v for k, v in lora.items()},
                                                   "checkpoint-10/optimizer.pt": b"\x80optimizer"})
        server.tag("org/lora", "v1", server.v1)
        server.v2 = server.add_commit("org/lora", files_of(local["lora_v2"]))
        server.add_commit("org/other", files_of(local["other"]))
        server.add_commit("org/kohya", {"style.safetensors": local["kohya"].read_bytes(), "README.md": b"# style\n"})
        server.add_commit("org/pickled", files_of(local["pickled"]))
        server.add_commit("org/tuned", files_of(local["tuned"]))
        server.add_commit("org/fp8", files_of(local["fp8"]))
        server.add_commit("org/private", lora, private=True)
        server.add_commit("org/gated", lora, gated=True)
        point_client_at(monkeypatch, server.url, tmp_path / "hf")
        yield server


def fetched(hub: FakeHub) -> set[str]:
    return set(hub.downloads())


def assert_same_files(a: Path, b: Path, skip: tuple[str, ...] = ("README.md", "adaptools_recipe.json")) -> None:
    fa, fb = ({k: v for k, v in files_of(p).items() if k not in skip} for p in (a, b))
    assert fa.keys() == fb.keys() and fa
    assert all(fa[name] == fb[name] for name in fa), [name for name in fa if fa[name] != fb[name]]


def assert_one_error_line(result, *expected: str) -> str:
    """Exit status 2 and one `error:` line, the last of stderr (download progress may come before it)."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert all(text in errors[0] for text in expected), errors[0]
    assert TOKEN not in result.output + result.stderr
    return errors[0]


def test_merge_from_repo_ids_equals_the_local_merge_fetches_only_what_it_needs_then_runs_offline(
        hub, local, runner, tmp_path, monkeypatch):
    result = run_cli(runner, "merge", "org/base", "org/lora@v1", "org/other", "-o", tmp_path / "hub",
                     "--allow-pickle")
    assert result.exit_code == 0, result.output
    assert "Fetching" in result.stderr  # huggingface_hub's own progress bars
    result = run_cli(runner, "merge", local["base"], local["lora"], local["other"], "-o", tmp_path / "local")
    assert result.exit_code == 0, result.output
    assert_same_files(tmp_path / "hub", tmp_path / "local")
    assert fetched(hub) == {
        *(f"org/base/{name}" for name in ("config.json", "generation_config.json", "tokenizer.json",
                                          "tokenizer_config.json", "model.safetensors")),
        *(f"org/{repo}/{name}" for repo in ("lora", "other")
          for name in ("adapter_config.json", "adapter_model.safetensors", "README.md")),
    }  # no pickle (--allow-pickle, but safetensors are there), no training state, nothing of sub-folders
    assert hub.unhandled == []

    go_offline(monkeypatch)
    before = len(hub.requests)
    result = run_cli(runner, "merge", "org/base", f"org/lora@{hub.v1}", "org/other", "-o", tmp_path / "offline")
    assert result.exit_code == 0, result.output
    assert len(hub.requests) == before
    assert_same_files(tmp_path / "offline", tmp_path / "local")


def test_combine_from_repo_ids_equals_the_local_combine(hub, local, runner, tmp_path):
    result = run_cli(runner, "combine", "org/lora@v1", "org/other", "--weights", "0.7,0.3", "-o", tmp_path / "hub")
    assert result.exit_code == 0, result.output
    assert run_cli(runner, "combine", local["lora"], local["other"], "--weights", "0.7,0.3",
                   "-o", tmp_path / "local").exit_code == 0
    assert_same_files(tmp_path / "hub", tmp_path / "local")


def test_revisions_pin_branches_tags_and_commits_and_a_local_path_wins(hub, local, tmp_path, monkeypatch):
    def tensors(source) -> dict[str, torch.Tensor]:
        return {name: m.B @ m.A for name, m in adaptools.load(source).items()}

    v1, v2 = tensors(local["lora"]), tensors(local["lora_v2"])
    assert any(not torch.equal(v1[k], v2[k]) for k in v1)
    for ref, expected in [("org/lora", v2), ("org/lora@main", v2), ("org/lora@v1", v1), (f"org/lora@{hub.v1}", v1),
                          (f"org/lora@{hub.v2}", v2)]:
        got = tensors(ref)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), ref
    assert adaptools.load("org/lora@v1").name == "lora"

    monkeypatch.chdir(tmp_path)
    shutil.copytree(local["other"], tmp_path / "org" / "lora")
    before = len(hub.requests)
    assert tensors("org/lora").keys() == tensors(local["other"]).keys()  # the local folder org/lora, not the repo
    assert len(hub.requests) == before


def test_api_merge_and_folders_and_files_of_a_repo(hub, local, runner, tmp_path):
    report = adaptools.merge("org/base", "org/lora/checkpoint-10@v1", out=tmp_path / "api")
    adaptools.merge(local["base"], local["lora"], out=tmp_path / "local")
    assert report.modules and load_file(tmp_path / "api" / "model.safetensors").keys()
    assert_same_files(tmp_path / "api", tmp_path / "local")
    assert not any(path.endswith(PICKLE_OR_STATE) for path in fetched(hub))  # checkpoint-10/optimizer.pt left

    result = run_cli(runner, "convert", "org/kohya/style.safetensors", "--to", "peft", "--base", "org/base",
                     "-o", tmp_path / "kohya-hub")
    assert result.exit_code == 0, result.output
    assert run_cli(runner, "convert", local["kohya"], "--to", "peft", "--base", local["base"],
                   "-o", tmp_path / "kohya-local").exit_code == 0
    assert_same_files(tmp_path / "kohya-hub", tmp_path / "kohya-local")

    before = len(hub.requests)
    result = run_cli(runner, "dora", "to-dora", "org/lora@v1", "--base", "org/base", "-o", tmp_path / "dora-hub")
    assert result.exit_code == 0, result.output
    lookups = [r.path for r in hub.requests[before:] if r.path.startswith("/api/models/org/base/")]
    assert lookups == ["/api/models/org/base/revision/main"]  # read twice (adapter names, norms), one commit
    base_entry = next(e for e in json.loads((tmp_path / "dora-hub" / RECIPE_NAME).read_text())["inputs"]
                      if e["param"] == "base")
    assert "headers" not in base_entry  # read whole in the end: hashed whole
    assert base_entry["files"]["model.safetensors"] == hashlib.sha256(
        (local["base"] / "model.safetensors").read_bytes()).hexdigest()
    assert run_cli(runner, "dora", "to-dora", local["lora"], "--base", local["base"],
                   "-o", tmp_path / "dora-local").exit_code == 0
    assert_same_files(tmp_path / "dora-hub", tmp_path / "dora-local")

    result = run_cli(runner, "spectrum", "org/lora@v1", "org/other", "--base", "org/base", "--json", "-")
    assert result.exit_code == 0, result.output
    hub_doc = json.loads(result.stdout)
    local_doc = json.loads(run_cli(runner, "spectrum", local["lora"], local["other"], "--base", local["base"],
                                   "--json", "-").stdout)
    assert [d["modules"] for d in hub_doc["adapters"]] == [d["modules"] for d in local_doc["adapters"]]


def test_pickle_only_adapters_need_allow_pickle(hub, local, runner):
    error = assert_one_error_line(run_cli(runner, "info", "org/pickled"), "--allow-pickle", "adapter_model.bin")
    assert "org/pickled" in error
    assert not any(path.endswith(".bin") for path in fetched(hub))
    result = run_cli(runner, "info", "org/pickled", "--allow-pickle", "--json")
    assert result.exit_code == 0, result.output
    local_info = run_cli(runner, "info", local["pickled"], "--allow-pickle", "--json").stdout
    assert json.loads(result.stdout)["modules"] == json.loads(local_info)["modules"]
    assert "org/pickled/adapter_model.bin" in fetched(hub)
    assert_one_error_line(run_cli(runner, "info", "org/lora/adapter_model.bin"), "--allow-pickle")


@pytest.mark.parametrize("where", ["HF_TOKEN", "login cache"])
def test_private_and_gated_repos_with_a_token_that_may_read_them(hub, runner, monkeypatch, where):
    if where == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    else:  # what `hf auth login` writes
        Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
        Path(constants.HF_TOKEN_PATH).write_text(TOKEN)
    for repo in ("org/private", "org/gated"):
        result = run_cli(runner, "info", repo)
        assert result.exit_code == 0, result.output
        assert TOKEN not in result.output + result.stderr
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests if "/org/" in r.path)


@pytest.mark.parametrize(("source", "token", "expected"), [
    ("org/missing", None, ("'org/missing' is not a local path", "has no repo org/missing")),
    ("no/such-folder", None, ("'no/such-folder' is not a local path", "has no repo no/such-folder")),
    ("org/lora@nope", None, ("org/lora", "has no revision 'nope'")),
    ("org/lora/nope.safetensors", None, ("has no file 'nope.safetensors'",)),
    ("org/kohya", None, ("org/kohya", "holds no adapter weights", "org/kohya/<file>.safetensors")),
    ("org/private", None, ("has no repo org/private that an anonymous request can read", "HF_TOKEN")),
    ("org/private", "hf_someoneElse0123456789", ("has no repo org/private that this token can read",)),
    ("org/gated", None, ("org/gated is a gated repo: request access at http://", "/org/gated")),
    ("org/gated", "hf_someoneElse0123456789", ("org/gated is a gated repo: request access at",)),
    ("not a path or repo", None, ("'not a path or repo' does not exist",)),
])
def test_bad_hub_inputs_are_one_error_line(hub, runner, monkeypatch, source, token, expected):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    error = assert_one_error_line(run_cli(runner, "info", source), *expected)
    assert token is None or token not in error


@pytest.mark.parametrize(("failure", "expected"), [
    ((401, "/resolve/"), "refused the credentials (401)"),
    ((403, "/resolve/"), "refused access (403)"),
    ((500, "/api/models/"), "answered 500 for org/other"),
    (("drop", "/resolve/"), "org/other"),
])
def test_hub_failures_are_one_error_line_and_leave_no_output(hub, runner, tmp_path, failure, expected):
    hub.fail(*failure)
    result = run_cli(runner, "combine", "org/other", "-o", tmp_path / "out")
    assert_one_error_line(result, expected)
    assert not (tmp_path / "out").exists()


def test_offline_without_a_cached_copy_is_one_error_line(hub, runner, monkeypatch):
    go_offline(monkeypatch)
    assert_one_error_line(run_cli(runner, "info", "org/other"), "HF_HUB_OFFLINE is set")
    assert hub.requests == []


def test_a_process_reads_hf_endpoint_hf_home_hf_hub_cache_hf_token_and_hf_hub_offline(hub, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_OFFLINE")}
    env.update(HF_HUB_CACHE=str(tmp_path / "cache"), HF_TOKEN=TOKEN)

    def info(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "adaptools_cli", "info", "org/private", "--json"],
                              env={**env, **extra}, capture_output=True, text=True, timeout=120)

    online = info()
    assert online.returncode == 0, online.stderr
    assert (tmp_path / "cache" / "models--org--private").is_dir() and TOKEN not in online.stdout + online.stderr
    before = len(hub.requests)
    offline = info(HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert len(hub.requests) == before and offline.stdout == online.stdout


def test_extract_from_repo_ids_equals_the_local_extract_and_names_the_base_by_repo_id(hub, local, runner, tmp_path):
    result = run_cli(runner, "extract", "org/base", "org/tuned@main", "--rank", "4", "-o", tmp_path / "hub")
    assert result.exit_code == 0, result.output
    assert run_cli(runner, "extract", local["base"], local["tuned"], "--rank", "4", "-o", tmp_path / "local").exit_code == 0
    weights = "adapter_model.safetensors"
    assert (tmp_path / "hub" / weights).read_bytes() == (tmp_path / "local" / weights).read_bytes()
    assert json.loads((tmp_path / "hub" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/base"
    assert not any(path.endswith((".bin", ".pt", ".pth")) for path in fetched(hub))
    recipe = json.loads((tmp_path / "hub" / "adaptools_recipe.json").read_text())
    assert {entry.get("repo_id") for entry in recipe["inputs"]} == {"org/base", "org/tuned"}


def test_fp8_base_from_a_repo_id_merges_and_extracts_as_the_local_one(hub, local, runner, tmp_path):
    """A compressed-tensors FP8 base by repo id: merge (kept FP8; org/lora at main is lora_v2) and extract equal
    the local runs."""
    for command, args in (("merge", ["org/lora"]), ("extract", ["org/tuned", "--rank", "4"])):
        result = run_cli(runner, command, "org/fp8", *args, "-o", tmp_path / f"hub-{command}")
        assert result.exit_code == 0, result.output
        local_args = [local["lora_v2"]] if command == "merge" else [local["tuned"], "--rank", "4"]
        assert run_cli(runner, command, local["fp8"], *local_args, "-o", tmp_path / f"local-{command}").exit_code == 0
        assert_same_files(tmp_path / f"hub-{command}", tmp_path / f"local-{command}",
                          skip=("README.md", "adaptools_recipe.json", "adapter_config.json"))


def test_quantize_from_a_repo_id_equals_the_local_quantize(hub, local, runner, tmp_path):
    result = run_cli(runner, "quantize", "org/base@main", "-o", tmp_path / "hub")
    assert result.exit_code == 0, result.output
    assert run_cli(runner, "quantize", local["base"], "-o", tmp_path / "local").exit_code == 0
    assert_same_files(tmp_path / "hub", tmp_path / "local")


def test_recipes_and_cards_name_hub_inputs_by_repo_id_and_commit_and_replay_anywhere(hub, local, runner, tmp_path,
                                                                                     monkeypatch):
    out = tmp_path / "merged"
    result = run_cli(runner, "merge", "org/base", "org/lora@v1", "-o", out)
    assert result.exit_code == 0, result.output
    base_sha = hub.repos["org/base"].refs["main"]
    text = (out / RECIPE_NAME).read_text()
    recipe = json.loads(text)
    assert recipe["params"]["base"] == f"org/base@{base_sha}"
    assert recipe["params"]["adapters"] == [f"org/lora@{hub.v1}"]
    base_entry, lora_entry = recipe["inputs"]
    assert base_entry["repo_id"] == "org/base" and base_entry["revision"] == base_sha
    assert base_entry["path"] == f"org/base@{base_sha}"  # the pinned ref, no local path
    assert base_entry["files"] == {name: hashlib.sha256((local["base"] / name).read_bytes()).hexdigest()
                                   for name in files_of(local["base"])}
    assert lora_entry["repo_id"] == "org/lora" and lora_entry["revision"] == hub.v1
    assert set(lora_entry["files"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert str(tmp_path / "hf") not in text  # the cache's paths are nobody else's
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/base"
    assert f"org/lora@{hub.v1[:12]} (Hub, 3 files)" in card.text

    hub.add_commit("org/lora", files_of(local["other"]))  # main moves on: the recipe still names commit v1
    point_client_at(monkeypatch, hub.url, tmp_path / "elsewhere")  # another machine: an empty cache
    result = run_cli(runner, "replay", out, "-o", tmp_path / "again")
    assert result.exit_code == 0, result.output
    assert_same_files(tmp_path / "again", out)
    assert json.loads((tmp_path / "again" / RECIPE_NAME).read_text()) == recipe
    assert (tmp_path / "elsewhere" / "hub" / "models--org--lora").is_dir()

    lora_blob = next((tmp_path / "elsewhere" / "hub" / "models--org--lora" / "snapshots").glob("*/adapter_config.json"))
    lora_blob.resolve().write_text("{}")  # the cached copy no longer matches the recipe
    result = run_cli(runner, "replay", out, "-o", tmp_path / "changed")
    assert_one_error_line(result, "org/lora@", "changed since the recipe was recorded", "adapter_config.json")


@pytest.mark.parametrize(("change", "expected"), [
    (lambda e: e.update(revision="main"), "a commit sha"),
    (lambda e: e.update(repo_id="org/../../etc"), "is not a Hub repo id"),
    (lambda e: e.update(path="org/lora@" + e["revision"]), "is not a Hub repo id"),
    (lambda e: e["files"].update({"../../token": "0" * 64}), "'files' must name the repo files"),
    (lambda e: e.update(files={}), "'files' must name the repo files"),
    (lambda e: e.update(headers=["model.safetensors"]), "'headers' must list files of 'files'"),
])
def test_hub_inputs_of_a_recipe_are_checked_before_anything_is_fetched(hub, runner, tmp_path, change, expected):
    out = tmp_path / "blend"
    assert run_cli(runner, "combine", "org/other", "-o", out).exit_code == 0
    recipe = json.loads((out / RECIPE_NAME).read_text())
    change(recipe["inputs"][0])
    (tmp_path / "tampered.json").write_text(json.dumps(recipe))
    before = len(hub.requests)
    assert_one_error_line(run_cli(runner, "replay", tmp_path / "tampered.json", "-o", tmp_path / "again"), expected)
    assert len(hub.requests) == before and not (tmp_path / "again").exists()


def test_a_sharded_base_fetches_the_shards_its_index_names_and_nothing_else(hub, local, runner, tmp_path):
    sharded = make_base(tmp_path / "sharded", "llama", max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    hub.add_commit("org/sharded", {**files_of(sharded), "consolidated.safetensors": b"\0" * 64})
    result = run_cli(runner, "merge", "org/sharded", "org/lora@v1", "-o", tmp_path / "hub")
    assert result.exit_code == 0, result.output
    assert run_cli(runner, "merge", sharded, local["lora"], "-o", tmp_path / "local").exit_code == 0
    assert_same_files(tmp_path / "hub", tmp_path / "local")
    weights = sorted(p.removeprefix("org/sharded/") for p in fetched(hub) if p.startswith("org/sharded/")
                     and p.endswith(".safetensors"))
    assert weights == shards  # not consolidated.safetensors, which the index does not name


def test_an_index_naming_paths_outside_the_repo_fetches_nothing_of_them(hub, local, runner, tmp_path):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../../../outside.safetensors",
                                            "lm_head.weight": "/etc/passwd"}}
    hub.add_commit("org/hostile", {"config.json": (local["base"] / "config.json").read_bytes(),
                                   "model.safetensors.index.json": json.dumps(index).encode(),
                                   "model.safetensors": (local["base"] / "model.safetensors").read_bytes()})
    result = run_cli(runner, "merge", "org/hostile", "org/other", "-o", tmp_path / "out")
    assert_one_error_line(result, "org/hostile", "holds no safetensors weights")
    assert fetched(hub) - {f"org/other/{n}" for n in ("adapter_config.json", "adapter_model.safetensors", "README.md")} \
        == {"org/hostile/config.json", "org/hostile/model.safetensors.index.json"}
    assert not (tmp_path / "out").exists() and not (tmp_path / "outside.safetensors").exists()


def test_gguf_files_and_split_parts_from_a_repo(hub, local, tmp_path):
    """ORG/NAME/FILE.gguf is a GGUF base; a split file's named part brings every part."""
    from gguf_factories import llama_gguf, requantized

    made = tmp_path / "made"
    made.mkdir()
    single = llama_gguf(local["base"], made / "model.Q8_0.gguf")
    requantized(None, single, made / "split.gguf", {}, split_max_tensors=8)
    parts = sorted(made.glob("split-*.gguf"))
    assert len(parts) > 1
    hub.add_commit("org/gguf", {"model.Q8_0.gguf": single.read_bytes(), "README.md": b"# gguf\n",
                                **{f"parts/{p.name}": p.read_bytes() for p in parts}})
    adaptools.merge("org/gguf/model.Q8_0.gguf", local["lora"], out=tmp_path / "hub.gguf")
    adaptools.merge(single, local["lora"], out=tmp_path / "local.gguf")
    assert (tmp_path / "hub.gguf").read_bytes() == (tmp_path / "local.gguf").read_bytes()
    assert not any(path.endswith(".gguf") and "parts/" in path for path in fetched(hub))
    adaptools.merge(f"org/gguf/parts/{parts[-1].name}", local["lora"], out=tmp_path / "hub" / "split")
    adaptools.merge(parts[0], local["lora"], out=tmp_path / "local" / "split")
    assert_same_files(tmp_path / "hub" / "split", tmp_path / "local" / "split")


# --------------------------------------------------------------------------- a base read for its names only


def header_size(path: Path) -> int:
    """8 + N: the bytes of a safetensors file before its tensor data."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def assert_headers_only(hub: FakeHub, repo: str, weights: dict[str, Path]) -> None:
    """No weight file of `repo` was downloaded: each was served its 8 + N header bytes at most, and the Hub cache
    holds none of them."""
    assert not [p for p in fetched(hub) if p.startswith(f"{repo}/") and p.endswith(".safetensors")]
    for name, local_file in weights.items():
        assert 0 < hub.bytes_served(f"{repo}/{name}") <= header_size(local_file), name
    cache = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    assert not [p for p in cache.rglob("*.safetensors")]
    assert sum(p.stat().st_size for p in (cache / "blobs").glob("*")) < min(p.stat().st_size for p in weights.values())


def test_a_hub_base_used_for_kohya_names_costs_its_headers_and_replays_so(hub, local, runner, tmp_path, monkeypatch):
    """`convert --base ORG/NAME` maps kohya names as the local base does from the repo's config and safetensors
    header (HTTP Range requests); the recipe names the base by commit with its header's sha256, and a replay on
    another machine fetches the header again, never the weights."""
    out = tmp_path / "hub"
    result = run_cli(runner, "convert", local["kohya"], "--to", "peft", "--base", "org/base", "-o", out)
    assert result.exit_code == 0, result.output
    assert run_cli(runner, "convert", local["kohya"], "--to", "peft", "--base", local["base"],
                   "-o", tmp_path / "local").exit_code == 0
    assert_same_files(out, tmp_path / "local")
    weights = local["base"] / "model.safetensors"
    assert_headers_only(hub, "org/base", {"model.safetensors": weights})
    assert {p for p in fetched(hub) if p.startswith("org/base/")} == {"org/base/config.json"}

    entry = next(e for e in json.loads((out / RECIPE_NAME).read_text())["inputs"] if e["param"] == "base")
    assert entry["headers"] == ["model.safetensors"]
    header = weights.read_bytes()[:header_size(weights)]
    assert entry["files"] == {"config.json": hashlib.sha256((local["base"] / "config.json").read_bytes()).hexdigest(),
                              "model.safetensors": hashlib.sha256(header).hexdigest()}

    point_client_at(monkeypatch, hub.url, tmp_path / "elsewhere")  # another machine: empty caches
    remote_header.cache_clear()
    hub.served.clear()
    result = run_cli(runner, "replay", out, "-o", tmp_path / "again")
    assert result.exit_code == 0, result.output
    assert_same_files(tmp_path / "again", out)
    assert_headers_only(hub, "org/base", {"model.safetensors": weights})

    recipe = json.loads((out / RECIPE_NAME).read_text())
    tampered = next(e for e in recipe["inputs"] if e["param"] == "base")
    tampered["files"]["model.safetensors"] = "0" * 64
    tampered["sha256"] = folder_digest(tampered["files"])
    (out / "tampered.json").write_text(json.dumps(recipe))  # beside the output: the same relative input paths
    result = run_cli(runner, "replay", out / "tampered.json", "-o", tmp_path / "changed")
    assert_one_error_line(result, "changed since the recipe was recorded", "model.safetensors")

    point_client_at(monkeypatch, hub.url, tmp_path / "third")
    remote_header.cache_clear()
    go_offline(monkeypatch)
    result = run_cli(runner, "convert", local["kohya"], "--to", "peft", "--base", "org/base", "-o", tmp_path / "off")
    assert_one_error_line(result, "HF_HUB_OFFLINE")


def test_a_sharded_hub_base_costs_the_headers_of_its_shards_and_a_cached_one_none(hub, local, runner, tmp_path,
                                                                                 monkeypatch):
    sharded = make_base(tmp_path / "sharded", "llama", max_shard_size="40KB")
    shards = {p.name: p for p in sharded.glob("*.safetensors")}
    assert len(shards) > 1
    hub.add_commit("org/sharded", files_of(sharded))
    kohya = adaptools.load(local["kohya"], base="org/sharded")
    assert kohya.modules.keys() == adaptools.load(local["kohya"], base=sharded).modules.keys()
    assert_headers_only(hub, "org/sharded", shards)

    assert adaptools.merge("org/sharded", local["other"], out=tmp_path / "merged").modules  # now cached whole
    remote_header.cache_clear()
    go_offline(monkeypatch)
    before = len(hub.requests)
    assert adaptools.load(local["kohya"], base="org/sharded").modules.keys() == kohya.modules.keys()
    assert len(hub.requests) == before


def test_a_server_without_byte_ranges_is_one_error_line_not_a_download(hub, local, runner, tmp_path):
    hub.ranges = False
    result = run_cli(runner, "convert", local["kohya"], "--to", "peft", "--base", "org/base", "-o", tmp_path / "out")
    assert_one_error_line(result, "byte range", "org/base/model.safetensors")
    assert not (tmp_path / "out").exists()
    assert not [p for p in Path(constants.HF_HUB_CACHE).rglob("*.safetensors")]


@pytest.mark.parametrize("layout", ["single file", "pipeline"])
def test_kohya_sd_names_map_through_a_hub_single_file_or_pipeline_from_their_headers(hub, runner, tmp_path, layout):
    """kohya SD1 names map through the diffusion name maps of a single-file checkpoint (ORG/NAME/file.safetensors)
    or a pipeline repo (component folders) on the Hub as through the local copy, from headers alone."""
    import test_diffusion_merge as dm
    from diffusion_fixtures import write_single_file

    if layout == "single file":
        base, _ = write_single_file(tmp_path / "sd" / "sd15.safetensors", "sd1")
        hub.add_commit("org/sd", {"sd15.safetensors": base.read_bytes(), "README.md": b"# sd15\n"})
        ref, local_base, weights = "org/sd/sd15.safetensors", base, {"sd15.safetensors": base}
    else:
        dm.save_pipeline(tmp_path / "pipe", "sd1")
        hub.add_commit("org/sd", files_of(tmp_path / "pipe"))
        ref, local_base = "org/sd", tmp_path / "pipe"
        weights = {p.relative_to(local_base).as_posix(): p for p in local_base.rglob("*.safetensors")}
    lora = dm.kohya_lora(tmp_path / "lora.safetensors", dm.SD1_LORA, seed=30)
    result = run_cli(runner, "convert", lora, "--to", "diffusers", "--base", ref, "-o", tmp_path / "hub.safetensors")
    assert result.exit_code == 0, result.output
    assert run_cli(runner, "convert", lora, "--to", "diffusers", "--base", local_base,
                   "-o", tmp_path / "local.safetensors").exit_code == 0
    assert load_file(tmp_path / "hub.safetensors").keys() == load_file(tmp_path / "local.safetensors").keys()
    assert all(torch.equal(a, b) for a, b in zip(load_file(tmp_path / "hub.safetensors").values(),
                                                 load_file(tmp_path / "local.safetensors").values()))
    assert_headers_only(hub, "org/sd", weights)


HOSTILE_HEADERS = [
    (struct.pack("<Q", 400_000_000) + b"{}", 8, "exceeds the format's limit of 100,000,000 bytes"),
    (struct.pack("<Q", 2) + b"{}" + b"\0" * 64, 10, "the tensors cover 0 bytes of data, but the file holds 64"),
    (struct.pack("<Q", 9) + b'{"a": [1}' + b"\0" * 64, 17, "model.safetensors"),
]
"""Hostile safetensors files: (bytes, the bytes one fetch of the header takes, what the error says)."""


@pytest.mark.parametrize(("weights", "served", "expected"), HOSTILE_HEADERS, ids=["length", "data", "json"])
def test_hostile_headers_of_a_hub_base_are_bounded_before_reading(hub, local, runner, tmp_path, weights, served,
                                                                  expected):
    """A header fetched by range is validated as a local one: its length is checked before it is asked for."""
    hub.add_commit("org/hostile", {"config.json": (local["base"] / "config.json").read_bytes(),
                                   "model.safetensors": weights})
    result = run_cli(runner, "convert", local["kohya"], "--to", "peft", "--base", "org/hostile", "-o", tmp_path / "o")
    assert_one_error_line(result, "org/hostile/model.safetensors", expected)
    assert hub.bytes_served("org/hostile/model.safetensors") == served and not (tmp_path / "o").exists()


def test_convert_to_gguf_names_a_hub_base_from_its_config_and_header(hub, local, runner, tmp_path):
    result = run_cli(runner, "convert", local["lora"], "--to", "gguf", "--base", "org/base", "-o", tmp_path / "h.gguf")
    assert result.exit_code == 0, result.output
    assert run_cli(runner, "convert", local["lora"], "--to", "gguf", "--base", local["base"],
                   "-o", tmp_path / "l.gguf").exit_code == 0
    from gguf import GGUFReader

    hub_file, local_file = (GGUFReader(tmp_path / name).tensors for name in ("h.gguf", "l.gguf"))  # recipes differ
    assert [(t.name, t.data.tobytes()) for t in hub_file] == [(t.name, t.data.tobytes()) for t in local_file]
    assert_headers_only(hub, "org/base", {"model.safetensors": local["base"] / "model.safetensors"})


def test_a_hub_gguf_base_used_for_names_costs_its_header(hub, local, runner, tmp_path, monkeypatch):
    """`convert --to gguf --base ORG/NAME/FILE.gguf` (and a split file's part) reads the GGUF header by HTTP Range
    requests growing 4x, validated as a local file's, and writes what the local base gives; no GGUF file is
    downloaded (the first range made small, as these files are: 64 bytes instead of 256 KiB)."""
    from gguf_factories import llama_gguf, requantized

    from adaptools import sources
    from adaptools.checkpoints.gguf_file import read_header

    monkeypatch.setattr(sources, "GGUF_FIRST_BYTES", 64)
    sources.remote_gguf_header.cache_clear()

    made = tmp_path / "made"
    made.mkdir()
    single = llama_gguf(local["base"], made / "model.Q8_0.gguf")
    requantized(None, single, made / "split.gguf", {}, split_max_tensors=8)
    parts = sorted(made.glob("split-*.gguf"))
    files = {"model.Q8_0.gguf": single, **{f"parts/{p.name}": p for p in parts}}
    hub.add_commit("org/gguf-names", {name: path.read_bytes() for name, path in files.items()})
    from gguf import GGUFReader

    for i, (ref, base) in enumerate([("org/gguf-names/model.Q8_0.gguf", single),
                                     (f"org/gguf-names/parts/{parts[-1].name}", parts[0])]):
        result = run_cli(runner, "convert", local["lora"], "--to", "gguf", "--base", ref, "-o", tmp_path / f"h{i}.gguf")
        assert result.exit_code == 0, result.output
        assert run_cli(runner, "convert", local["lora"], "--to", "gguf", "--base", base,
                       "-o", tmp_path / f"l{i}.gguf").exit_code == 0
        hub_file, local_file = (GGUFReader(tmp_path / f"{side}{i}.gguf").tensors for side in "hl")
        assert [(t.name, t.data.tobytes()) for t in hub_file] == [(t.name, t.data.tobytes()) for t in local_file]
    def assert_headers_only(names: list[str]) -> None:
        assert not [p for p in fetched(hub) if p.endswith(".gguf")]
        for name in names:
            header = read_header(files[name])
            served = hub.bytes_served(f"org/gguf-names/{name}")
            assert header.data_start <= served <= 4 * header.data_start < header.size, name

    assert_headers_only(list(files))
    cache = Path(constants.HF_HUB_CACHE) / "models--org--gguf-names"
    assert not list(cache.rglob("*.gguf"))

    point_client_at(monkeypatch, hub.url, tmp_path / "elsewhere")  # replay on another machine: headers again
    sources.remote_gguf_header.cache_clear()
    hub.served.clear()
    result = run_cli(runner, "replay", tmp_path / "h1.gguf", "-o", tmp_path / "again.gguf")
    assert result.exit_code == 0, result.output
    again, first = (GGUFReader(tmp_path / name).tensors for name in ("again.gguf", "h1.gguf"))
    assert [(t.name, t.data.tobytes()) for t in again] == [(t.name, t.data.tobytes()) for t in first]
    assert_headers_only([f"parts/{p.name}" for p in parts])


def test_a_hostile_hub_gguf_header_is_one_error_line(hub, local, runner, tmp_path):
    """A GGUF header on the Hub whose counts cannot fit its file is refused from its first bytes, as a local one."""
    import struct

    hostile = b"GGUF" + struct.pack("<IQQ", 3, 2**40, 2**40) + bytes(4096)
    hub.add_commit("org/gguf-hostile", {"model.gguf": hostile})
    result = run_cli(runner, "convert", local["lora"], "--to", "gguf", "--base", "org/gguf-hostile/model.gguf",
                     "-o", tmp_path / "o.gguf")
    assert_one_error_line(result, "is not a valid GGUF file", "counts")
    assert not (tmp_path / "o.gguf").exists() and not [p for p in fetched(hub) if p.endswith(".gguf")]


def test_a_hub_gguf_header_past_the_cap_is_refused_before_it_is_fetched(hub, local, runner, tmp_path, monkeypatch):
    """A GGUF header longer than MAX_GGUF_HEADER_BYTES (made 1 KiB here) is refused once a field asks for more, with
    no more than the cap fetched."""
    import struct

    from adaptools import sources

    monkeypatch.setattr(sources, "MAX_GGUF_HEADER_BYTES", 1024)
    monkeypatch.setattr(sources, "GGUF_FIRST_BYTES", 64)
    sources.remote_gguf_header.cache_clear()
    key = b"general.name"
    long = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, 4000)
    hub.add_commit("org/gguf-long", {"model.gguf": long + b"x" * 4000})
    result = run_cli(runner, "convert", local["lora"], "--to", "gguf", "--base", "org/gguf-long/model.gguf",
                     "-o", tmp_path / "o.gguf")
    assert_one_error_line(result, "goes on past 1,024 bytes")
    assert hub.bytes_served("org/gguf-long/model.gguf") <= 1024 and not (tmp_path / "o.gguf").exists()


# --------------------------------------------------------------------------- info of a Hub checkpoint: headers only


def add_components(pipe: Path) -> dict[str, Path]:
    """Beside a saved pipeline's models: a `vae/` of one weight file and a `text_encoder_3/` of two shards and
    their index (components no adapter merges into, which `info` lists too); the pipeline's weight files."""
    from safetensors.torch import save_file

    (pipe / "vae").mkdir()
    save_file({"decoder.conv_in.weight": torch.randn(64, 8, 3, 3)}, str(pipe / "vae" / "diffusion_pytorch_model.safetensors"))
    (pipe / "vae" / "config.json").write_text("{}")
    (pipe / "text_encoder_3").mkdir()
    shards = {"model-00001-of-00002.safetensors": {"shared.weight": torch.randn(128, 64, dtype=torch.bfloat16)},
              "model-00002-of-00002.safetensors": {"encoder.final_layer_norm.weight": torch.ones(4096)}}
    for name, tensors in shards.items():
        save_file(tensors, str(pipe / "text_encoder_3" / name))
    weight_map = {key: name for name, tensors in shards.items() for key in tensors}
    (pipe / "text_encoder_3" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return {p.relative_to(pipe).as_posix(): p for p in pipe.rglob("*.safetensors")}


@pytest.mark.parametrize("layout", ["single file", "pipeline", "gguf"])
def test_info_of_a_hub_checkpoint_reads_its_headers_and_equals_the_local_info(hub, local, runner, tmp_path,
                                                                             monkeypatch, layout):
    """`info ORG/NAME/file.safetensors` (a single-file checkpoint), `info ORG/NAME` (a pipeline repo, with
    components no adapter touches, one of them sharded) and `info ORG/NAME/file.gguf` print what `info` of the
    local files prints, text and JSON, from the repo's small files and the weights' headers (HTTP Range requests):
    no weight file is downloaded."""
    from diffusion_fixtures import write_single_file

    from adaptools import sources

    if layout == "single file":
        base, _ = write_single_file(tmp_path / "sd" / "sdxl.safetensors", "sdxl", torch.float16)
        hub.add_commit("org/ckpt", {"sdxl.safetensors": base.read_bytes(), "README.md": b"# sdxl\n"})
        ref, local_base, weights = "org/ckpt/sdxl.safetensors", base, {"sdxl.safetensors": base}
    elif layout == "pipeline":
        import test_diffusion_merge as dm

        dm.save_pipeline(tmp_path / "pipe", "sd1")
        weights = add_components(tmp_path / "pipe")
        hub.add_commit("org/ckpt", files_of(tmp_path / "pipe"))
        ref, local_base = "org/ckpt", tmp_path / "pipe"
    else:
        from gguf_factories import llama_gguf

        monkeypatch.setattr(sources, "GGUF_FIRST_BYTES", 64)  # as small as the file's header (256 KiB by default)
        sources.remote_gguf_header.cache_clear()
        local_base = llama_gguf(local["base"], tmp_path / "model.Q8_0.gguf")
        hub.add_commit("org/ckpt", {"model.Q8_0.gguf": local_base.read_bytes()})
        ref, weights = "org/ckpt/model.Q8_0.gguf", {}
    for options in ((), ("--json",)):
        result = run_cli(runner, "info", ref, *options)
        assert result.exit_code == 0, result.output
        mine = run_cli(runner, "info", local_base, *options)
        assert mine.exit_code == 0 and result.stdout == mine.stdout, (result.stdout, mine.stdout)
    summary = json.loads(result.stdout)
    if layout == "gguf":
        from adaptools.checkpoints.gguf_file import read_header

        assert summary["format"] == "gguf"
        header = read_header(local_base)
        assert not [p for p in fetched(hub) if p.endswith(".gguf")]
        assert header.data_start <= hub.bytes_served("org/ckpt/model.Q8_0.gguf") <= 4 * header.data_start < header.size
        return
    assert summary["family"] == ("sdxl" if layout == "single file" else "sd1")
    if layout == "pipeline":
        assert {"unet", "text_encoder", "vae", "text_encoder_3"} <= summary["components"].keys()
    assert_headers_only(hub, "org/ckpt", weights)


@pytest.mark.parametrize("command", ["info", "convert --base"])
@pytest.mark.parametrize(("weights", "served", "expected"), HOSTILE_HEADERS, ids=["length", "data", "json"])
def test_a_hostile_header_of_a_hub_file_is_fetched_once_and_is_one_error_line(hub, local, runner, tmp_path, command,
                                                                              weights, served, expected):
    """A Hub .safetensors file named by the ref (`info`, a base read for its names) whose header is not valid: the
    error surfaces from the first read of the header (one fetch: the bytes served are those of one), one line."""
    remote_header.cache_clear()  # kept for the process: the same bytes at the same commit in another test case
    hub.add_commit("org/hostile-file", {"model.safetensors": weights})
    ref = "org/hostile-file/model.safetensors"
    args = ["info", ref] if command == "info" else ["convert", local["kohya"], "--to", "peft", "--base", ref,
                                                     "-o", tmp_path / "o"]
    assert_one_error_line(run_cli(runner, *args), ref, expected)
    assert hub.bytes_served(ref) == served and not (tmp_path / "o").exists()
    assert not [p for p in Path(constants.HF_HUB_CACHE).rglob("*.safetensors")]
