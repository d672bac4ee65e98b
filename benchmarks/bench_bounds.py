"""Issue 21's small-file bombs: what reading each costs adaptools, against reading the same file's bytes with its
own library (safetensors' load_file; zipfile's member list for the .npz, whose data adaptools refuses to inflate).

Each measurement runs in a fresh child process: wall time of the read, and how much the read raised the child's peak
RSS (MB above its peak after the imports).
The files are made by tests/test_bounds.py's generators. Before the bounds (issue 21): the LoHa file took 4.2 GB and
26 s in `adaptools info`, the LoKr file the same, the .npz 3.9 GB.

    PYTHONPATH=.:cli:tests python benchmarks/bench_bounds.py
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_bounds import loha_bomb, lokr_bomb, lokr_full_bomb, npz_bomb, redos_adapter, tucker_bomb  # noqa: E402

CHILD = """
import resource, sys, time
path, how = sys.argv[1], sys.argv[2]
import torch, adaptools, zipfile
from safetensors.torch import load_file
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
outcome = "read"
if how == "reference":
    if path.endswith(".npz"):
        zipfile.ZipFile(path).infolist()
    elif path.endswith(".safetensors"):
        load_file(path)
    else:
        load_file(path + "/adapter_model.safetensors")
else:
    try:
        adaptools.load(path, scale=1.0) if path.endswith(".npz") else adaptools.load(path)
    except adaptools.AdaptoolsError:
        outcome = "refused"
seconds = time.perf_counter() - start
print(outcome, seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def measure(path: Path, how: str) -> tuple[str, float, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), how], capture_output=True, text=True, check=True)
    outcome, seconds, rss = done.stdout.split()
    return outcome, float(seconds), float(rss)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = {"LoHa rank 4096² on 16x16": loha_bomb(root / "loha.safetensors"),
                 "LoKr rank 4096² on 16x16": lokr_bomb(root / "lokr.safetensors"),
                 "LoKr full 256x256 ⊗ 256x256": lokr_full_bomb(root / "lokr-full.safetensors"),
                 "Tucker LoCon 256x256 kernel": tucker_bomb(root / "tucker.safetensors"),
                 ".npz with 1 GiB of deflated zeros": npz_bomb(root / "adapters.npz"),
                 "rank_pattern (a+)+b, module a×32": redos_adapter(root / "redos")}
        print(f"{'file':36} {'size':>9} {'adaptools':>9} {'s':>7} {'+MB':>6} {'reference s':>11} {'+MB':>6} {'ratio s':>7}")
        for label, path in files.items():
            size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.iterdir()))
            outcome, seconds, rss = measure(path, "adaptools")
            _, ref_seconds, ref_rss = measure(path, "reference")
            print(f"{label:36} {size / 1e3:7.0f}kB {outcome:>9} {seconds:7.3f} {rss:6.0f} {ref_seconds:11.3f} "
                  f"{ref_rss:6.0f} {seconds / max(ref_seconds, 1e-6):7.1f}")


if __name__ == "__main__":
    main()
