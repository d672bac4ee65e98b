"""The console entry point ends the process without the interpreter's teardown (`adaptools_cli.main.quick_exit`),
yet as `sys.exit` would: the status, flushed output, exit handlers run, running threads joined, idle thread pools
shut down."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import atexit, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    atexit.register(lambda: print("handler ran", file=sys.stderr))
    ThreadPoolExecutor(2).submit(int).result()  # a pool left open: its idle workers are shut down, not waited on
    out = sys.argv.pop(1)
    def late():  # a thread still running when the command returns
        time.sleep(0.3)
        open(out, "w").write("thread done")
    threading.Thread(target=late).start()
    from adaptools_cli.main import main
    main()
""")


@pytest.mark.parametrize(("argv", "status"), [(["--version"], 0), (["merge", "no-such-base", "x", "-o", "y"], 2),
                                              (["no-such-command"], 2)])
def test_the_entry_point_exits_as_sys_exit_would(tmp_path, argv, status):
    marker = tmp_path / "marker"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(marker), *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == status
    assert done.stderr.splitlines()[-1] == "handler ran"
    assert marker.read_text() == "thread done"
    if status:
        assert done.stderr.splitlines()[-2].startswith("error: ")
    else:
        assert done.stdout.startswith("adaptools, version ")
