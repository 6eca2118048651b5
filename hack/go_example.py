"""The Go example order service (examples/go_order_service/), built for the tests and the
demo: outside the checkout, in the shared cache, by the source's hash (a rebuild only when it
changed), with the local toolchain and no module downloads (it is standard library only)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import localenv  # beside this file

SOURCE = localenv.HACK.parent / "examples" / "go_order_service"
GO = shutil.which("go") or "/usr/local/go/bin/go"
CACHE = localenv.CACHE / "go"


class GoBuildError(Exception):
    """No Go toolchain, or the example does not build."""


def binary() -> Path:
    """The built service, building it first when its source changed."""
    digest = hashlib.sha256()
    for f in sorted(SOURCE.iterdir()):
        digest.update(f.name.encode() + f.read_bytes())
    built = CACHE / f"go-order-service-{digest.hexdigest()[:12]}"
    if built.exists():
        return built
    env = {**os.environ, "GOCACHE": str(CACHE / "build"), "GOTOOLCHAIN": "local",
           "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}  # fmt: skip
    try:
        run = subprocess.run(
            [GO, "build", "-o", str(built), "."], cwd=SOURCE, env=env,
            capture_output=True, text=True, check=False, timeout=600,
        )  # fmt: skip
    except OSError as e:
        raise GoBuildError(f"cannot run {GO}: {e}") from None
    if run.returncode != 0:
        raise GoBuildError(f"go build of {SOURCE} failed:\n{run.stderr}")
    return built
