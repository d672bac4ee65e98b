"""Issue 13, outputs half: a recipe is data (replay), outputs are whole or absent (lock, stale temporaries,
--overwrite rules, long names), and cards and recipes hold no local paths. Every crafted file is made here."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from factories import make_peft_adapter
from safetensors import safe_open

import adaptools
from adaptools import atomic
from adaptools.atomic import atomic_output, staged_output
from adaptools.errors import InvalidArgumentError, OutputExistsError, OutputLockedError
from adaptools.recipe import RECIPE_KEY, RECIPE_NAME
from adaptools_cli import provenance

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def lora(llama_base, tmp_path_factory) -> Path:
    return make_peft_adapter(llama_base, tmp_path_factory.mktemp("lora") / "lora", r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"])


@pytest.fixture()
def job(lora, tmp_path) -> Path:
    """tmp_path/job with a copy of the adapter as `style` and a recorded `convert` output `out` of it."""
    root = tmp_path / "job"
    shutil.copytree(lora, root / "style")
    return root


def convert(runner, job: Path, *extra: object, target: str = "out") -> Path:
    result = run_cli(runner, "convert", job / "style", "--to", "peft", "-o", job / target, *extra)
    assert result.exit_code == 0, result.output
    return job / target


@pytest.fixture()
def pushes(monkeypatch) -> list:
    """Every Hub push attempted (by `push` or by --push-to), recorded instead of made."""
    calls: list = []
    monkeypatch.setattr(provenance, "push", lambda *a, **k: calls.append((a, k)) or "url")
    monkeypatch.setattr("adaptools_cli.commands.push.push_to_hub", lambda *a, **k: calls.append((a, k)) or "url")
    return calls


def one_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    [line] = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    assert line.startswith("error: ") and "Traceback" not in result.output
    assert all(n in line for n in needles), line
    return line


def crafted(job: Path, change) -> Path:
    """A recipe file in `job` made from out's recipe by `change(recipe)` (returns the file)."""
    recipe = json.loads((job / "out" / RECIPE_NAME).read_text())
    change(recipe)
    path = job / "crafted" / RECIPE_NAME
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(recipe))
    return path


def tree(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


# --------------------------------------------------------------------------- replay runs any command


def test_recipe_naming_push_is_refused_and_pushes_nothing(job, runner, pushes, tmp_path):
    convert(runner, job)
    private = tmp_path / "private"
    private.mkdir()
    (private / "secret.txt").write_text("diary")
    recipe = crafted(job, lambda r: r.update(command=["push"], inputs=[],
                                             params={"path": str(private), "repo_id": "someone/else"}))
    one_error(run_cli(runner, "replay", recipe, "-o", tmp_path / "x"), "'push'", "replay does not run", "convert")
    assert pushes == [] and not (tmp_path / "x").exists()


def test_recipe_that_replays_itself_is_refused(job, runner, tmp_path):
    convert(runner, job)
    path = job / "crafted" / RECIPE_NAME
    recipe = crafted(job, lambda r: r.update(command=["replay"], params={"recipe": str(path), "output": "y"},
                                             inputs=[]))
    one_error(run_cli(runner, "replay", recipe, "-o", tmp_path / "x"), "'replay'", "replay does not run")
    for command in (["dora"], ["rm", "-rf"], ["info"]):
        recipe = crafted(job, lambda r: r.update(command=command))
        one_error(run_cli(runner, "replay", recipe, "-o", tmp_path / "x"), "command")
    assert not (tmp_path / "x").exists()


def test_widening_flags_come_only_from_the_replay_command_line(job, runner, pushes, tmp_path):
    convert(runner, job)
    (tmp_path / "x").mkdir()
    recipe = crafted(job, lambda r: r["params"].update(push_to="evil/repo", allow_pickle=True, overwrite=True,
                                                       private=True, output=str(tmp_path / "elsewhere")))
    result = run_cli(runner, "replay", recipe, "-o", tmp_path / "x")
    one_error(result, "already exists")  # the recipe's overwrite is not used
    assert not (tmp_path / "elsewhere").exists() and list((tmp_path / "x").iterdir()) == []
    result = run_cli(runner, "replay", recipe, "-o", tmp_path / "y")
    assert result.exit_code == 0, result.output
    assert pushes == [] and not (tmp_path / "elsewhere").exists()
    for name in ("push_to", "allow_pickle", "overwrite", "private", "output"):
        assert f"the recipe sets {name!r}; ignored" in result.stderr
    assert "--allow-pickle" not in result.stdout and "--push-to" not in result.stdout
    result = run_cli(runner, "replay", recipe, "-o", tmp_path / "y", "--overwrite", "--push-to", "me/mine")
    assert result.exit_code == 0, result.output
    [(args, _)] = pushes
    assert args[1] == "me/mine"


def test_pickle_only_with_allow_pickle_on_the_replay_line(job, runner, tmp_path):
    state = {k: v for k, v in safe_open_all(job / "style" / "adapter_model.safetensors").items()}
    (job / "style" / "adapter_model.safetensors").unlink()
    torch.save(state, job / "style" / "adapter_model.bin")
    convert(runner, job, "--allow-pickle")
    recipe = json.loads((job / "out" / RECIPE_NAME).read_text())
    assert "allow_pickle" not in recipe["params"]  # a permission, not a parameter: never recorded
    one_error(run_cli(runner, "replay", job / "out", "-o", tmp_path / "x"), "--allow-pickle")
    assert not (tmp_path / "x").exists()
    result = run_cli(runner, "replay", job / "out", "-o", tmp_path / "x", "--allow-pickle")
    assert result.exit_code == 0, result.output


def safe_open_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_side_files_land_inside_the_output_under_adaptools_names(job, runner, tmp_path):
    result = run_cli(runner, "rerank", job / "style", "--rank", "2", "--report", tmp_path / "mine.json",
                     "-o", job / "out")
    assert result.exit_code == 0, result.output
    recipe = json.loads((job / "out" / RECIPE_NAME).read_text())
    assert "report_path" not in recipe["params"] and recipe["output_params"] == ["report_path"]
    victim = tmp_path / "victim.json"
    victim.write_text("keep")
    evil = crafted(job, lambda r: r["params"].update(report_path=str(victim)))
    result = run_cli(runner, "replay", evil, "-o", tmp_path / "again")
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "keep"
    assert (tmp_path / "again" / "report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "job", "mine.json", "victim.json"]


@pytest.mark.parametrize("change, needles", [
    (lambda r: r["inputs"][0].pop("sha256"), ["'sha256'"]),
    (lambda r: r["inputs"][0].update(sha256=5), ["'sha256'"]),
    (lambda r: r["inputs"][0].update(path=["a"]), ["'path'"]),
    (lambda r: r["inputs"][0].update(files=["x"]), ["'files'"]),
    (lambda r: r.update(inputs={"adapter": "x"}), ["'inputs'"]),
    (lambda r: r.update(params=[1]), ["'params'"]),
    (lambda r: r.update(command="convert"), ["'command'"]),
    (lambda r: r.update(output_type="symlink"), ["'output_type'"]),
    (lambda r: r["params"].update(adapter="../../home/user/private-lora"), ["not among the recipe's inputs"]),
    (lambda r: r["inputs"].append({**r["inputs"][0], "param": "to"}), ["not an input of the command"]),
    (lambda r: r["params"].update(to="--push-to=evil/repo"), ["'to'", "--push-to=evil/repo"]),
    (lambda r: r["params"].update(to=["peft", "kohya"]), ["'to'"]),
    (lambda r: r["params"].update(shell="rm -rf ~"), ["shell"]),
    (lambda r: r.update(adaptools_recipe=2), ["version"]),
])
def test_malformed_recipes_are_one_error_line(change, needles, job, runner, tmp_path):
    convert(runner, job)
    recipe = crafted(job, change)
    one_error(run_cli(runner, "replay", recipe, "-o", tmp_path / "x"), *needles)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("text, needle", [("[" * 5000 + "]" * 5000, "nested"), ('{"adaptools_recipe": NaN}', "NaN"),
                                          ("\xff\xfe", "UTF-8"), ("[]", "object"), ("", "not valid JSON"),
                                          ('{"adaptools_recipe": 1}', "needs")])
def test_unparsable_recipes_are_one_error_line(text, needle, runner, tmp_path):
    path = tmp_path / "r.json"
    path.write_bytes(text.encode("latin-1"))
    one_error(run_cli(runner, "replay", path, "-o", tmp_path / "x"), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_embedded_recipe_is_read_with_the_same_rules(job, runner, tmp_path):
    result = run_cli(runner, "convert", job / "style", "--to", "kohya", "-o", job / "lora.safetensors")
    assert result.exit_code == 0, result.output
    state = safe_open_all(job / "lora.safetensors")
    from safetensors.torch import save_file

    for text, needle in [("[" * 100 + "]" * 100, "nested"), ("[1]", "JSON object")]:
        save_file(state, str(tmp_path / "bad.safetensors"), metadata={RECIPE_KEY: text})
        one_error(run_cli(runner, "replay", tmp_path / "bad.safetensors", "-o", tmp_path / "x"), needle)
    save_file(state, str(tmp_path / "bad.safetensors"), metadata={"format": "pt"})
    one_error(run_cli(runner, "replay", tmp_path / "bad.safetensors", "-o", tmp_path / "x"), "holds no adaptools recipe")
    assert not (tmp_path / "x").exists()


def test_values_are_type_checked_and_never_read_as_options(llama_base, job, runner, pushes, tmp_path):
    result = run_cli(runner, "rerank", job / "style", "--rank", "2", "-o", job / "out")
    assert result.exit_code == 0, result.output
    for value, needle in [("2; rm -rf ~", "'rank'"), (True, "'rank'"), ({"x": 1}, "'rank'")]:
        recipe = crafted(job, lambda r: r["params"].update(rank=value))
        one_error(run_cli(runner, "replay", recipe, "-o", tmp_path / "x"), needle)
    recipe = crafted(job, lambda r: r["params"].update(device="--push-to=evil/repo"))
    result = run_cli(runner, "replay", recipe, "-o", tmp_path / "x")
    assert "--device=--push-to=evil/repo" in result.stdout  # one token: the device's value
    assert result.exit_code == 2 and pushes == [] and not (tmp_path / "x").exists()


def test_relative_inputs_follow_the_recipe(job, runner, tmp_path, monkeypatch):
    out = convert(runner, job)
    recipe = json.loads((out / RECIPE_NAME).read_text())
    assert recipe["inputs"][0]["path"] == "../style" and recipe["params"]["adapter"] == "../style"
    moved = tmp_path / "elsewhere" / "job"
    shutil.copytree(job, moved)
    monkeypatch.chdir(tmp_path)
    result = run_cli(runner, "replay", moved / "out", "-o", moved / "again")
    assert result.exit_code == 0, result.output
    assert (moved / "again" / RECIPE_NAME).read_text() == (out / RECIPE_NAME).read_text()
    shutil.rmtree(moved / "style")
    one_error(run_cli(runner, "replay", moved / "out", "-o", moved / "third"), "does not exist")


# --------------------------------------------------------------------------- atomic outputs


def test_card_and_recipe_are_in_the_staging_before_the_rename(job, runner, monkeypatch):
    seen = {}
    commit = atomic.Staging.commit

    def spy(self, overwrite):
        seen[self.target.name] = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else "file"
        assert not self.target.exists()
        commit(self, overwrite)

    monkeypatch.setattr(atomic.Staging, "commit", spy)
    convert(runner, job)
    assert seen == {"out": ["README.md", "adapter_config.json", "adapter_model.safetensors", RECIPE_NAME]}


def test_a_failing_card_leaves_nothing(job, runner, monkeypatch):
    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(provenance, "write_card", fail)
    one_error(run_cli(runner, "convert", job / "style", "--to", "peft", "-o", job / "out"), "No space left")
    assert sorted(p.name for p in job.iterdir()) == ["style"]


def test_single_file_output_and_its_recipe_appear_together(job, runner, monkeypatch):
    def fail(*_):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("adaptools.recipe.embed_recipe", fail)
    target = job / "lora.safetensors"
    one_error(run_cli(runner, "convert", job / "style", "--to", "kohya", "-o", target), "Input/output error")
    assert sorted(p.name for p in job.iterdir()) == ["style"]
    monkeypatch.undo()
    result = run_cli(runner, "convert", job / "style", "--to", "kohya", "-o", target)
    assert result.exit_code == 0, result.output
    with safe_open(str(target), framework="pt") as f:
        assert json.loads(f.metadata()[RECIPE_KEY])["output_type"] == "file"
    assert len(adaptools.load(target)) == len(adaptools.load(job / "style"))
    assert sorted(p.name for p in job.iterdir()) == ["lora.safetensors", "style"]


def hold_lock(target: Path) -> subprocess.Popen:
    """Another process holding the lock of `target` (as a running adaptools would)."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True); "
            "time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(atomic.lock_path(target))], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_second_run_for_a_locked_target_fails_before_any_work(job, llama_base, lora, runner, monkeypatch):
    target = job / "merged"
    live = job / ".merged.abcdefgh.tmp"
    live.mkdir()  # the live run's temporary folder: not stale
    holder = hold_lock(target)
    loads = []
    monkeypatch.setattr(adaptools, "load", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(adaptools, "merge", lambda *a, **k: loads.append(a))
    try:
        line = one_error(run_cli(runner, "merge", llama_base, lora, "-o", target), "being written by another",
                         f"pid {holder.pid}")
        with pytest.raises(OutputLockedError):
            with atomic_output(target):
                pass
        with pytest.raises(OutputLockedError):
            atomic.check_output(target)  # what adaptools.merge checks first, before reading anything
    finally:
        holder.kill()
        holder.wait()
    assert loads == [] and live.is_dir() and not target.exists() and "merged" in line


def test_stale_temporaries_of_dead_runs_are_removed_and_nothing_else(job, runner):
    stale = [job / ".out.abcdefgh.tmp", job / ".out.x1_2y3z4.tmp"]
    for folder in stale:
        (folder / "out").mkdir(parents=True)
        (folder / "out" / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    atomic.lock_path(job / "out").write_text("999999\n")  # a dead run's lock file: nobody holds it
    keep = [job / ".out.old", job / ".out.short.tmp", job / ".out.abcdefgh.tmp.txt", job / ".out2.abcdefgh.tmp",
            job / ".out.ABCDEFGH.tmp"]
    for path in keep:
        path.mkdir() if path.suffix == ".tmp" else path.write_text("the user's")
    elsewhere = job / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("keep")
    (job / ".out.zzzzzzzz.tmp").symlink_to(elsewhere, target_is_directory=True)
    convert(runner, job)
    assert not any(p.exists() for p in stale) and not atomic.lock_path(job / "out").exists()
    assert all(p.exists() for p in keep) and (elsewhere / "precious").read_text() == "keep"
    assert (job / ".out.zzzzzzzz.tmp").is_symlink()


def test_a_file_of_the_users_where_the_lock_goes_is_left_alone(job, runner):
    lock = atomic.lock_path(job / "out")
    lock.write_text("my notes\n")
    one_error(run_cli(runner, "convert", job / "style", "--to", "peft", "-o", job / "out"), "in the way")
    assert lock.read_text() == "my notes\n" and sorted(p.name for p in job.iterdir()) == [lock.name, "style"]
    lock.unlink()
    lock.symlink_to(job / "style" / "adapter_config.json")
    one_error(run_cli(runner, "convert", job / "style", "--to", "peft", "-o", job / "out"), "cannot write the output")
    assert lock.is_symlink() and not (job / "out").exists()


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_overwrite_replaces_a_symlink_itself(kind, job, runner):
    real = job / ("real" if kind == "folder" else "real.safetensors")
    if kind == "folder":
        real.mkdir()
        (real / "precious").write_text("keep")
    else:
        real.write_text("keep")
    target = job / ("out" if kind == "folder" else "out.safetensors")
    target.symlink_to(real)
    (job / f".{target.name}.old").write_text("the user's own backup")
    before = tree(real) if kind == "folder" else real.read_text()
    args = ["convert", job / "style", "--to", "peft" if kind == "folder" else "kohya", "-o", target]
    one_error(run_cli(runner, *args), "already exists")
    result = run_cli(runner, *args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not target.is_symlink() and adaptools.load(target)
    assert (tree(real) if kind == "folder" else real.read_text()) == before
    assert (job / f".{target.name}.old").read_text() == "the user's own backup"
    assert sorted(p.name for p in job.iterdir()) == sorted([f".{target.name}.old", real.name, "style", target.name])


def test_overwrite_of_a_folder_keeps_nothing_of_the_old_one(job, runner):
    out = convert(runner, job)
    (out / "stale-extra.bin").write_text("old")
    convert(runner, job, "--overwrite")
    assert "stale-extra.bin" not in {p.name for p in out.iterdir()}
    assert sorted(p.name for p in job.iterdir()) == ["out", "style"]


@pytest.mark.parametrize("name", ["a" * 230 + ".safetensors", "é" * 121])  # 242 bytes: NAME_MAX counts bytes
def test_over_long_names_are_refused_before_any_work(name, job, runner, monkeypatch):
    loads = []
    monkeypatch.setattr(adaptools, "load", lambda *a, **k: loads.append(a))
    to = "kohya" if name.endswith(".safetensors") else "peft"
    one_error(run_cli(runner, "convert", job / "style", "--to", to, "-o", job / name), "too long")
    assert loads == [] and sorted(p.name for p in job.iterdir()) == ["style"]
    with pytest.raises(InvalidArgumentError, match="too long"):
        atomic.check_output(job / name)


def test_staging_api(tmp_path):
    """atomic_output inside staged_output writes into the staging; a side file below the target too."""
    target = tmp_path / "out"
    with staged_output(target) as staging:
        with atomic_output(target) as folder:
            (folder / "weights").write_text("w")
        with atomic_output(target / "report.json", is_file=True) as side:
            side.write_text("{}")
        assert not target.exists() and atomic.lock_path(target).exists()
        assert folder == staging.path and side == staging.path / "report.json"
        with pytest.raises(InvalidArgumentError):
            staging.claim(True)
    assert sorted(p.name for p in target.iterdir()) == ["report.json", "weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(OutputExistsError):
        with staged_output(target):
            pass


# --------------------------------------------------------------------------- privacy


def strings(value: object):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


def test_cards_and_recipes_hold_no_local_paths(llama_base, job, runner):
    """The base folder is recorded absolute in the input's adapter_config.json (as PEFT writes it)."""
    result = run_cli(runner, "combine", job / "style", job / "style", "--weights", "0.5,0.5", "--base", llama_base,
                     "-o", job / "out")
    assert result.exit_code == 0, result.output
    recipe_text = (job / "out" / RECIPE_NAME).read_text()
    card = (job / "out" / "README.md").read_text()
    recipe = json.loads(recipe_text)
    assert not [s for s in strings(recipe) if s.startswith("/") or os.path.isabs(s)]
    assert recipe["params"]["base"] == os.path.relpath(llama_base, job / "out")
    for local in (str(job), str(llama_base), str(Path.home())):
        assert local not in recipe_text and local not in card
    assert f"`{llama_base.name}`" in card


def test_an_adaptools_output_is_a_base_like_any_other(llama_base, lora, runner, tmp_path):
    """A merged model (with its own recipe and card) merged into again: its recipe and card are not copied as this
    output's, which gets its own (found by the demo: the copied recipe blocked the new one)."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli(runner, "merge", llama_base, lora, "-o", first).exit_code == 0
    result = run_cli(runner, "merge", first, lora, "-o", second)
    assert result.exit_code == 0, result.output
    recipe = json.loads((second / RECIPE_NAME).read_text())
    assert [entry["path"] for entry in recipe["inputs"]] == ["../first", os.path.relpath(lora, second)]
    assert (second / "README.md").read_text() != (first / "README.md").read_text()
