"""The cache's build lock: one builder per artifact across checkouts, and a waiting build says
so on the terminal instead of staying silent."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

HACK = Path(__file__).resolve().parent.parent / "hack"


def test_a_build_waiting_on_the_lock_says_so_and_then_proceeds(tmp_path: Path) -> None:
    waiter = (
        "import time, localenv\n"
        "with localenv.cache_lock('build'):\n"
        "    print('inside', time.monotonic(), flush=True)\n"
    )
    with (tmp_path / "build.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            [sys.executable, "-c", waiter],
            cwd=HACK,
            env={**os.environ, "KRO_CACHE": str(tmp_path)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(3)
        assert proc.poll() is None, "the waiter must not get in while the lock is held"
        released = time.monotonic()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"waiting for another build holding {tmp_path / 'build.lock'}" in err
    assert "got" in err and "after" in err
    assert float(out.split()[1]) >= released
