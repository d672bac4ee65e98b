"""`adaptools batch` (a local process pool, and `--ray local`) against a loop of single `adaptools merge` calls:
one random fp16 base with TinyLlama-1.1B's widths × N rank-16 all-linear PEFT adapters (the 50-customer case).

    python benchmarks/bench_batch.py [--adapters 6] [--layers 2] [--rank 16] [--workers 2] [--skip-ray]

The full case is `--adapters 50 --layers 22` (a 2.2 GB base, 110 GB written per contender: about an hour here);
the default (6 adapters, 2 decoder layers: a 0.45 GB base) finishes in a few minutes on 2 loaded cores.
Every contender runs as the shell would run it (`python -m adaptools_cli ...`, so each single call pays the
interpreter and torch start), from a small launcher process that reports wall time and the peak RSS of the
largest process below it (the batch driver or one of its workers). The outputs of the three contenders are
compared byte for byte. "Base read" counts the logical reads of the base: one per single call, one per batch task
(merges sharing a base are cut into one task per worker). Everything lives in a temporary folder removed at the
end. Target: batch >= 3x faster than the loop.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench_merge import run, write_adapter, write_base

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "cli"), os.environ.get("PYTHONPATH", "")])}
CLI = [sys.executable, "-m", "adaptools_cli"]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def same_outputs(a: Path, b: Path, names: list[str]) -> bool:
    """Every output under `a` equals the one under `b`, file by file."""
    for name in names:
        files = sorted(p.relative_to(a / name) for p in (a / name).rglob("*") if p.is_file())
        if files != sorted(p.relative_to(b / name) for p in (b / name).rglob("*") if p.is_file()):
            return False
        if any((a / name / f).read_bytes() != (b / name / f).read_bytes() for f in files):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=6, help="customers (50: the full case)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (22 = TinyLlama-1.1B)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-ray", action="store_true", help="no --ray local run")
    args = parser.parse_args()
    os.environ.update(ENV)
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp, tempfile.TemporaryDirectory(prefix="r") as ray:
        root = Path(tmp)
        # a local Ray runtime: token auth with a random token (nothing written to ~/.ray), loopback only
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex(), RAY_TMPDIR=ray,
                          RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
        write_base(root / "in" / "base", args.layers)
        names = [f"c{i:03d}" for i in range(args.adapters)]
        for i, name in enumerate(names):
            write_adapter(root / "in" / name, root / "in" / "base", args.layers, args.rank, seed=i + 1)
        base_bytes = folder_bytes(root / "in" / "base")
        jobs = {"defaults": {"base": "in/base"},
                "jobs": [{"command": "merge", "adapters": [f"in/{n}"], "out": f"OUT/{n}"} for n in names]}
        print(f"base {base_bytes / 2**30:.2f} GiB ({args.layers} layers), {args.adapters} adapters of rank "
              f"{args.rank}, {args.workers} workers, {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}")
        for f in (root / "in").rglob("*"):  # into the page cache: every contender reads from memory
            if f.is_file():
                f.read_bytes()

        results = {}
        loop_wall, loop_rss = 0.0, 0
        for name in names:
            wall, rss, _, _ = run([*CLI, "merge", str(root / "in" / "base"), str(root / "in" / name), "-o",
                                   str(root / "loop" / name)])
            loop_wall, loop_rss = loop_wall + wall, max(loop_rss, rss)
        results["loop of single merges"] = (loop_wall, loop_rss, args.adapters)

        contenders = {"batch (process pool)": []}
        if not args.skip_ray:
            contenders["batch --ray local"] = ["--ray", "local"]
        for label, extra in contenders.items():
            out = label.split()[1].strip("(-") or "pool"
            spec = root / f"jobs-{out}.json"
            spec.write_text(json.dumps(jobs).replace("OUT/", f"{out}/"))
            report = root / f"report-{out}.json"
            wall, rss, _, _ = run([*CLI, "batch", str(spec), "--workers", str(args.workers), *extra,
                                   "--report", str(report)])
            rows = json.loads(report.read_text())
            assert all(r["status"] == "ok" for r in rows), rows
            assert same_outputs(root / out, root / "loop", names), f"{label}: outputs differ from the single merges'"
            results[label] = (wall, rss, min(args.workers, args.adapters))
            wall, rss, _, _ = run([*CLI, "batch", str(spec), "--workers", str(args.workers), *extra])
            results[f"  {label.split(' ', 1)[1]} rerun (skips)"] = (wall, rss, min(args.workers, args.adapters))
            shutil.rmtree(root / out)
        print(f"{'contender':<32} {'wall s':>8} {'s/job':>7} {'speed-up':>8} {'base read':>10} {'peak RSS':>9}")
        for label, (wall, rss, reads) in results.items():
            print(f"{label:<32} {wall:8.1f} {wall / args.adapters:7.2f} {loop_wall / wall:7.2f}x "
                  f"{reads * base_bytes / 2**30:8.2f} GiB {rss / 2**20:6.0f} MiB")
        print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    sys.exit(main())
