"""`adaptools batch`: jobs files checked whole, outputs equal to the single commands' outputs, reruns skip, a bad
job fails alone, a killed worker is retried; on a local process pool, a Ray local runtime, a real `ray start
--head` cluster on 127.0.0.1, and an S3 bucket of a moto server on 127.0.0.1 (DESIGN §19)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import run_cli
from factories import make_base, make_peft_adapter

from adaptools.batch import load_jobs
from adaptools.recipe import RECIPE_NAME

ROOT = Path(__file__).resolve().parents[1]
RAY_TOKEN = secrets.token_hex(16)
"""One token for every Ray runtime and cluster of this test process: Ray reads the token once per process."""


def tree(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file below `folder`."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A jobs folder holding in/base (tiny Llama) and three PEFT adapters of it, in/a0..a2."""
    root = tmp_path_factory.mktemp("batch")
    make_base(root / "in" / "base", "llama")
    for i in range(3):
        make_peft_adapter(root / "in" / "base", root / "in" / f"a{i}", seed=i + 1, r=4, lora_alpha=8,
                          target_modules=["q_proj", "v_proj"])
    return root


def jobs_file(folder: Path, jobs: list[dict], defaults: dict | None = None, name: str = "jobs.yaml") -> Path:
    """A jobs file (YAML, or JSON by name) in `folder`."""
    import yaml

    document = {"defaults": defaults, "jobs": jobs} if defaults else {"jobs": jobs}
    path = folder / name
    path.write_text(json.dumps(document) if name.endswith(".json") else yaml.safe_dump(document), encoding="utf-8")
    return path


def single(runner, folder: Path, argv: list[str]) -> None:
    """Run one adaptools command from `folder` (relative paths as a user in that folder types them)."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = run_cli(runner, *argv)
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output


MERGES = [
    {"adapters": ["in/a0"], "out": "out/m0"},
    {"adapters": ["in/a1"], "weights": "0.5", "out": "out/m1"},
    {"adapters": ["in/a0", "in/a1"], "weights": "0.7,0.3", "dtype": "fp16", "out": "out/m01"},
]


def merge_argv(job: dict, out: str) -> list[str]:
    argv = ["merge", "in/base", *job["adapters"], "-o", out]
    return argv + [f"--{k}={v}" for k, v in job.items() if k in ("weights", "dtype")]


# --------------------------------------------------------------------------- the jobs file


@pytest.mark.parametrize("jobs, defaults, expected", [
    ([{"command": "merge", "adapters": ["in/a0"]}], {"base": "in/base"}, "job 0: key 'out'"),
    ([{"command": "mrege", "base": "in/base", "adapters": ["in/a0"], "out": "x"}], None, "job 0: key 'command'"),
    ([{"command": "push", "path": "in/a0", "out": "x"}], None, "job 0: key 'command'"),
    ([{"command": "merge", "base": "in/base", "adapters": ["in/a0"], "out": "x"},
      {"command": "merge", "base": "in/base", "adapters": ["in/a1"], "dtpye": "fp16", "out": "y"}], None,
     "job 1: key 'dtpye'"),
    ([{"command": "merge", "base": "in/base", "adapters": ["in/a0"], "dtype": "fp12", "out": "x"}], None,
     "job 0: parameter 'dtype'"),
    ([{"command": "merge", "base": "in/base", "adapters": ["in/a0"], "out": "x"},
      {"command": "rerank", "adapter": "in/a0", "rank": 2, "out": "sub/../x"}], None, "job 1: key 'out'"),
    ([{"command": "rerank", "adapter": "in/a0", "rank": 2, "out": "../x"}], None, "job 0: key 'out'"),
    ([{"command": "rerank", "adapter": "in/a0", "rank": 2, "out": "/tmp/x"}], None, "job 0: key 'out'"),
    ([{"command": "rerank", "adapter": "in/a0", "rank": 2, "overwrite": True, "out": "x"}], None,
     "job 0: key 'overwrite'"),
    ([{"command": ["dora", "to-lora"], "out": "x"}], None, "job 0: Missing argument"),
    ([{"command": "rerank", "adapter": "nope://b/a", "rank": 2, "out": "x"}], None, "job 0: key 'adapter'"),
    ([{"command": "rerank", "adapter": "s3://b/..", "rank": 2, "out": "x"}], None, "job 0: key 'adapter'"),
    ([{"command": "rerank", "adapter": "in/a0", "rank": 2, "out": "x"}], {"rnak": 2}, "defaults: key 'rnak'"),
    ([{"command": "rerank", "adapter": "in/a0", "rank": 2, "out": "x"},
      {"command": "rerank", "adapter": "in/a1", "rank": 2, "out": "./x"}], None, "job 1: key 'out'"),
    ([{"command": "rerank", "adapter": "in/a0", "rank": 2, "out": "x"},
      {"command": "rerank", "adapter": "in/a1", "rank": 2, "out": "x/y"}], None, "job 1: key 'out'"),
])
def test_bad_jobs_file_does_nothing(work, runner, tmp_path, jobs, defaults, expected):
    folder = tmp_path / "jobs"
    shutil.copytree(work / "in", folder / "in", symlinks=True)
    before = sorted(folder.rglob("*"))
    path = jobs_file(folder, jobs, defaults, name="jobs.json" if defaults else "jobs.yaml")
    result = run_cli(runner, "batch", path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert sorted(folder.rglob("*")) == sorted([*before, path])


def test_jobs_file_forms(work, tmp_path):
    """A one-word command as a string, defaults applied only where the command takes them, out as written."""
    path = jobs_file(tmp_path, [{"command": "merge", "adapters": ["a"], "out": "o/m"},
                                {"command": ["dora", "to-lora"], "adapter": "d", "out": "s3://b/p/d"}],
                     defaults={"base": "b"})
    merge, to_lora = load_jobs(path)
    assert merge.command == ("merge",) and to_lora.command == ("dora", "to-lora")
    assert merge.target == tmp_path / "o" / "m" and to_lora.remote and to_lora.target.name == "d"
    assert merge.defaults == {"base": "b"}


# --------------------------------------------------------------------------- pool engine and object storage


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the module, and the environment s3fs reads: one endpoint for every test,
    since the pool's fork server keeps the environment it started with."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_EC2_METADATA_DISABLED": "true"}.items():
            patch.setenv(key, value)
        yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def s3(s3_server):
    """The moto server emptied (its buckets live in this process) with the bucket `outputs`; an s3fs on it."""
    import s3fs

    urllib.request.urlopen(urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST")).close()
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("outputs")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


def test_pool_batch_equals_single_commands_and_reruns_skip(work, runner, tmp_path, s3):
    folder = tmp_path / "jobs"
    shutil.copytree(work / "in", folder / "in", symlinks=True)
    jobs = [{"command": "merge", **job} for job in MERGES]
    jobs += [{"command": "rerank", "adapter": "in/a2", "rank": 2, "out": "out/r2"},
             {"command": "merge", "adapters": ["in/missing"], "out": "out/bad"},
             {"command": "merge", "adapters": ["in/a2"], "out": "s3://outputs/models/m2"},
             {"command": "rerank", "adapter": "in/a1", "rank": 2, "out": "s3://outputs/lora/r1"},
             {"command": "combine", "adapters": ["in/a0", "in/a1"], "weights": "0.5,0.5", "out": "out/c01"},
             {"command": "convert", "adapter": "in/a2", "to": "kohya", "out": "out/k2.safetensors"}]
    path = jobs_file(folder, jobs, defaults={"base": "in/base"})
    report = tmp_path / "report.json"
    result = run_cli(runner, "batch", path, "--workers", "2", "--report", report)
    assert result.exit_code == 1, result.output
    rows = json.loads(report.read_text())
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "ok", "failed", "ok", "ok", "ok", "ok"]
    assert "in/missing" in rows[4]["error"] and "\n" not in rows[4]["error"]
    assert not (folder / "out" / "bad").exists() and not list((folder / "out").glob(".*"))

    expected = tmp_path / "single"
    shutil.copytree(work / "in", expected / "in", symlinks=True)
    for job in MERGES:
        single(runner, expected, merge_argv(job, job["out"]))
        assert tree(folder / job["out"]) == tree(expected / job["out"]), job["out"]
    single(runner, expected, ["rerank", "in/a2", "--rank=2", "--base=in/base", "-o", "out/r2"])
    single(runner, expected, ["combine", "in/a0", "in/a1", "--weights=0.5,0.5", "--base=in/base", "-o", "out/c01"])
    single(runner, expected, ["convert", "in/a2", "--to=kohya", "--base=in/base", "-o", "out/k2.safetensors"])
    for name in ("r2", "c01"):
        assert tree(folder / "out" / name) == tree(expected / "out" / name), name
    assert (folder / "out" / "k2.safetensors").read_bytes() == (expected / "out" / "k2.safetensors").read_bytes()

    # object-store outputs: every file uploaded, the same bytes as written by the command from the same depth
    # below the jobs folder (the recipe records inputs relative to the output: ../../in/base)
    single(runner, expected, merge_argv({"adapters": ["in/a2"]}, "x/y/m2"))
    single(runner, expected, ["rerank", "in/a1", "--rank=2", "--base=in/base", "-o", "x/y/r1"])
    for name, prefix in (("m2", "models"), ("r1", "lora")):
        local = tree(expected / "x" / "y" / name)
        s3.invalidate_cache()
        remote = {f.split(f"{prefix}/{name}/", 1)[1]: s3.cat_file(f) for f in s3.find(f"outputs/{prefix}/{name}")}
        assert remote == local, name
    assert not [p for p in (folder / ".adaptools-batch").rglob("*") if p.is_file()]  # local copies removed

    # a rerun: the bad job fails again, everything else is skipped and nothing is rewritten
    before = mtimes(folder / "out")
    s3_before = {f: s3.info(f)["LastModified"] for f in s3.find("outputs")}
    result = run_cli(runner, "batch", path, "--workers", "2", "--report", report)
    assert [r["status"] for r in json.loads(report.read_text())] == ["skipped"] * 4 + ["failed"] + ["skipped"] * 4
    assert mtimes(folder / "out") == before
    s3.invalidate_cache()
    assert {f: s3.info(f)["LastModified"] for f in s3.find("outputs")} == s3_before

    # an upload cut short (leftovers without the recipe object) is redone; its worker, killed while it writes,
    # breaks the pool: the task runs again on a new one
    s3.rm_file(f"outputs/lora/r1/{RECIPE_NAME}")
    killer, killed = kill_writer(load_jobs(path)[6].target)
    result = run_cli(runner, "batch", path, "--workers", "1", "--report", report)
    killer.join(timeout=5)
    statuses = [r["status"] for r in json.loads(report.read_text())]
    assert killed and statuses[5:] == ["skipped", "ok", "skipped", "skipped"]
    s3.invalidate_cache()
    assert {f.split("lora/r1/", 1)[1]: s3.cat_file(f) for f in s3.find("outputs/lora/r1")} == tree(
        expected / "x" / "y" / "r1")


def test_object_store_inputs(work, runner, tmp_path, s3):
    """Inputs given as s3:// folders (a base, an adapter) are fetched into the jobs folder's cache and give what the
    command gives on that copy, and the weights of the same job on local inputs; a rerun skips without fetching
    again; a missing object fails alone; a changed object is fetched again and its job redone."""
    s3.mkdir("inputs")
    for name in ("base", "a0"):
        for file in (work / "in" / name).rglob("*"):
            if file.is_file():
                s3.put_file(str(file), f"inputs/{name}/{file.relative_to(work / 'in' / name).as_posix()}")
    folder = tmp_path / "jobs"
    shutil.copytree(work / "in", folder / "in", symlinks=True)
    path = jobs_file(folder, [{"base": "s3://inputs/base", "adapters": ["in/a1"], "out": "out/m1"},
                              {"base": "in/base", "adapters": ["s3://inputs/a0/"], "out": "out/m0"},
                              {"base": "in/base", "adapters": ["s3://inputs/missing"], "out": "out/bad"}],
                     defaults={"command": "merge"})
    report = tmp_path / "report.json"
    result = run_cli(runner, "batch", path, "--workers", "2", "--report", report)
    rows = json.loads(report.read_text())
    assert result.exit_code == 1 and [r["status"] for r in rows] == ["ok", "ok", "failed"], result.output
    assert rows[2]["error"] == "input 's3://inputs/missing' does not exist"

    base, a0 = (load_jobs(path)[i].params for i in (0, 1))
    from adaptools.batch.inputs import input_copy
    copies = {url: input_copy(folder, url) for url in (base["base"], a0["adapters"][0])}
    assert [tree(c) for c in copies.values()] == [tree(work / "in" / "base"), tree(work / "in" / "a0")]
    single(runner, folder, ["merge", str(copies["s3://inputs/base"].relative_to(folder)), "in/a1", "-o", "same/m1"])
    single(runner, folder, ["merge", "in/base", str(copies["s3://inputs/a0/"].relative_to(folder)), "-o", "same/m0"])
    expected = tmp_path / "single"
    shutil.copytree(work / "in", expected / "in", symlinks=True)
    for name, adapter in (("m1", "in/a1"), ("m0", "in/a0")):
        assert tree(folder / "out" / name) == tree(folder / "same" / name), name  # recipe and card included
        single(runner, expected, ["merge", "in/base", adapter, "-o", f"out/{name}"])
        batch_files, local_files = tree(folder / "out" / name), tree(expected / "out" / name)
        assert batch_files.keys() == local_files.keys()
        assert {k: v for k, v in batch_files.items() if k not in (RECIPE_NAME, "README.md")} == {
            k: v for k, v in local_files.items() if k not in (RECIPE_NAME, "README.md")}
        shas = [[(e["param"], e["sha256"]) for e in json.loads(files[RECIPE_NAME])["inputs"]]
                for files in (batch_files, local_files)]
        assert shas[0] == shas[1]

    # a rerun lists the objects, finds their ETags unchanged and skips without fetching or writing
    cache = mtimes(folder / ".adaptools-batch" / "inputs")
    before = mtimes(folder / "out")
    run_cli(runner, "batch", path, "--workers", "2", "--report", report)
    assert [r["status"] for r in json.loads(report.read_text())] == ["skipped", "skipped", "failed"]
    assert mtimes(folder / ".adaptools-batch" / "inputs") == cache and mtimes(folder / "out") == before

    # a changed object is fetched again: its output no longer records the job (not skipped, kept unless
    # --overwrite), and with --overwrite the job is redone on the new bytes
    s3.put_file(str(work / "in" / "a2" / "adapter_model.safetensors"), "inputs/a0/adapter_model.safetensors")
    run_cli(runner, "batch", path, "--workers", "2", "--report", report)
    rows = json.loads(report.read_text())
    assert [r["status"] for r in rows] == ["skipped", "failed", "failed"] and "already exists" in rows[1]["error"]
    run_cli(runner, "batch", path, "--workers", "2", "--overwrite", "--report", report)
    assert [r["status"] for r in json.loads(report.read_text())] == ["ok", "ok", "failed"]
    single(runner, expected, ["merge", "in/base", "in/a2", "-o", "out/m2"])
    assert (folder / "out" / "m0" / "model.safetensors").read_bytes() == (
        expected / "out" / "m2" / "model.safetensors").read_bytes()


# --------------------------------------------------------------------------- Ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_env(monkeypatch):
    """Token auth with a random token (nothing written to ~/.ray), loopback only, a short private temp dir; set
    before Ray is imported (Ray reads the auth mode at import and the token once per process)."""
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "cli"), os.environ.get("PYTHONPATH", "")])}
    temp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # unix socket paths must stay short
    env["RAY_TMPDIR"] = str(temp)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    pytest.importorskip("ray")
    yield env
    for _ in range(3):  # Ray's exiting processes may still write logs there for a moment
        shutil.rmtree(temp, ignore_errors=True)
        time.sleep(1)


def test_ray_local_batch_equals_single_commands(work, runner, tmp_path, ray_env):
    folder = tmp_path / "jobs"
    shutil.copytree(work / "in", folder / "in", symlinks=True)
    path = jobs_file(folder, [{"command": "merge", **job} for job in MERGES[:2]], defaults={"base": "in/base"})
    result = run_cli(runner, "batch", path, "--ray", "local", "--workers", "2")
    assert result.exit_code == 0, result.output
    expected = tmp_path / "single"
    shutil.copytree(work / "in", expected / "in", symlinks=True)
    for job in MERGES[:2]:
        single(runner, expected, merge_argv(job, job["out"]))
        assert tree(folder / job["out"]) == tree(expected / job["out"])


def session_pids(sid: int) -> list[int]:
    """Processes of the session `sid` (a `ray start` and every daemon it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture()
def ray_cluster(ray_env, tmp_path):
    """`ray start --head` on 127.0.0.1 (2 CPUs, free ports, a private temp dir) in its own session; its address.
    Stopped by killing that session's processes by pid (never `ray stop`: it kills every Ray on the machine)."""
    port = free_port()
    temp = Path(ray_env["RAY_TMPDIR"])
    ports = {f"--{name}": str(free_port()) for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port", "ray-client-server-port")}
    argv = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
            f"--port={port}", f"--temp-dir={temp}", "--num-cpus=2", "--object-store-memory=80000000",
            "--include-dashboard=false", "--disable-usage-stats",
            *[f"{k}={v}" for k, v in ports.items()]]
    process = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=os.environ.copy())
    out, _ = process.communicate(timeout=120)
    try:
        assert process.returncode == 0, out.decode()[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        for _ in range(2):
            for pid in session_pids(process.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.5)


def kill_writer(target: Path) -> tuple[threading.Thread, list[int]]:
    """A thread that SIGKILLs the first process seen holding the lock of `target` (the pid in `.NAME.lock`)."""
    killed: list[int] = []

    def watch() -> None:
        lock = target.with_name(f".{target.name}.lock")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                time.sleep(0.005)
                continue
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, killed


def test_ray_cluster_retries_a_killed_worker(work, runner, tmp_path, ray_cluster):
    """A merge worker SIGKILLed while it writes (its pid read from the output's lock) is retried; the output is
    whole and equal to the single merge's; a bad job fails alone; a rerun skips everything."""
    folder = tmp_path / "jobs"
    shutil.copytree(work / "in", folder / "in", symlinks=True)
    jobs = [{"command": "merge", **MERGES[0]}, {"command": "merge", "adapters": ["in/base"], "out": "out/bad"}]
    path = jobs_file(folder, jobs, defaults={"base": "in/base"})
    killer, killed = kill_writer(folder / "out" / "m0")
    report = tmp_path / "report.json"
    result = run_cli(runner, "batch", path, "--ray", ray_cluster, "--retries", "2", "--report", report)
    killer.join(timeout=5)
    assert report.exists(), (result.output, result.exception)
    rows = json.loads(report.read_text())
    assert killed and result.exit_code == 1, result.output
    assert [r["status"] for r in rows] == ["ok", "failed"], rows
    expected = tmp_path / "single"
    shutil.copytree(work / "in", expected / "in", symlinks=True)
    single(runner, expected, merge_argv(MERGES[0], "out/m0"))
    assert tree(folder / "out" / "m0") == tree(expected / "out" / "m0")
    assert not list((folder / "out").glob(".m0.*"))

    before = mtimes(folder / "out")
    result = run_cli(runner, "batch", path, "--ray", ray_cluster, "--report", report)
    assert [r["status"] for r in json.loads(report.read_text())] == ["skipped", "failed"]
    assert mtimes(folder / "out") == before
