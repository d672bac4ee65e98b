"""kill -9 at several moments of a merge and of an adapter write: the target is absent or complete (weights,
recipe, card), and the next run for that target leaves no temporary folder or lock behind.

The runs are forked from one driver process that imported adaptools once (a fresh interpreter per run would
spend seconds importing torch); each child runs the CLI exactly as `adaptools ...` does and is SIGKILLed by
this test when the moment it waits for is seen on disk (lock taken, temporary folder made, first shard written,
recipe staged) or after a delay.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli
from factories import make_base, make_peft_adapter
from safetensors import safe_open

from adaptools.recipe import RECIPE_KEY, RECIPE_NAME

DRIVER = r"""
import json, os, sys
from adaptools_cli.main import cli
print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        try:
            cli.main(args=json.loads(line), prog_name="adaptools")
        except SystemExit as exc:
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        os._exit(0)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


@pytest.fixture(scope="module")
def driver():
    cli_path = str(Path(__file__).resolve().parents[1] / "cli")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [cli_path, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline() == "ready\n"
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A sharded base of ~20 MB (a merge of it takes a fraction of a second to a second) and a LoRA on it."""
    root = tmp_path_factory.mktemp("kill")
    base = make_base(root / "base", "llama", hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                     vocab_size=1024, max_shard_size="3MB")
    lora = make_peft_adapter(base, root / "lora", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])
    return base, lora


def staged(target: Path) -> list[Path]:
    return [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.") and p.name.endswith(".tmp")]


MOMENTS = {
    "lock": lambda t: (t.parent / f".{t.name}.lock").exists(),
    "staging": lambda t: bool(staged(t)),
    "shard": lambda t: any(any(d.rglob("*.safetensors")) for d in staged(t)),
    "recipe": lambda t: any(any(d.rglob(RECIPE_NAME)) for d in staged(t)),
    "delay": None,
}


def run_and_kill(driver, args: list[str], target: Path, moment: str, delay: float = 0.3) -> bool:
    """Start `adaptools ARGS` in a forked child, SIGKILL it at `moment`; True when it was killed while running."""
    driver.stdin.write(json.dumps(args) + "\n")
    driver.stdin.flush()
    pid = int(driver.stdout.readline())
    seen, deadline = MOMENTS[moment], time.monotonic() + (delay if moment == "delay" else 30)
    while time.monotonic() < deadline and not (seen and seen(target)):
        time.sleep(0.0005)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    status = int(driver.stdout.readline())
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def assert_complete_model(target: Path) -> None:
    names = {p.name for p in target.iterdir()}
    assert {"config.json", RECIPE_NAME, "README.md", "model.safetensors.index.json"} <= names, names
    index = json.loads((target / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        with safe_open(str(target / shard), framework="pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
    assert json.loads((target / RECIPE_NAME).read_text())["command"] == ["merge"]


def assert_clean(target: Path) -> None:
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")] == []


def test_killed_merge_leaves_the_target_absent_or_complete(driver, inputs, runner, tmp_path):
    base, lora = inputs
    target = tmp_path / "merged"
    args = ["merge", str(base), str(lora), "-o", str(target), "--overwrite"]
    stale_seen = 0
    for moment in ("lock", "staging", "shard", "recipe", "delay"):
        killed = run_and_kill(driver, args, target, moment)
        if target.exists():
            assert_complete_model(target)
        stale_seen += killed and bool(staged(target))
    assert stale_seen  # at least one kill landed mid-write and left a temporary folder for the next run
    result = run_cli(runner, *args)
    assert result.exit_code == 0, result.output
    assert_complete_model(target)
    assert_clean(target)


def test_killed_adapter_write_leaves_the_file_absent_or_whole(driver, inputs, runner, tmp_path):
    _, lora = inputs
    target = tmp_path / "lora.safetensors"
    args = ["convert", str(lora), "--to", "kohya", "-o", str(target), "--overwrite"]
    for moment in ("lock", "staging", "delay"):
        run_and_kill(driver, args, target, moment, delay=0.05)
        if target.exists():
            with safe_open(str(target), framework="pt") as f:
                assert json.loads(f.metadata()[RECIPE_KEY])["command"] == ["convert"] and list(f.keys())
    result = run_cli(runner, *args)
    assert result.exit_code == 0, result.output
    assert_clean(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]
