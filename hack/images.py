"""Container images for the local node, built without Docker or a registry.

- the base: a Debian bookworm root filesystem with python3, made by mmdebstrap, as a local
  image (`BASE_IMAGE`); the Dockerfile's `PYTHON_IMAGE` argument names it here, and names
  the upstream `python:*-slim` image on a machine with Docker Hub;
- the project's image: `buildah bud` of the unchanged Dockerfile on that base, tagged by a
  hash of everything it is built from, so a changed source makes a new tag;
- the pod sandbox ("pause") image: one static Go program (hack/build-pause.sh).

buildah keeps its storage in the cache (`BUILDAH_ROOT`); an image reaches the kubelet by
`buildah push` to an OCI archive and `ctr images import` into containerd's `k8s.io` namespace.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from localenv import CACHE, HACK, SetupError, _atomic_build, _run_logged, cache_lock, log, timed

ROOT = HACK.parent
BASE_REVISION = "r1"  # bump when the base's package list changes
BASE_IMAGE = f"localhost/kro-python:3.11-bookworm-{BASE_REVISION}"
BASE_PACKAGES = "python3,python3-venv,python3-pip,python-is-python3,passwd,ca-certificates"
PAUSE_DIR = CACHE / "pause-r1"
PAUSE_IMAGE = "localhost/kro-pause:r1"
IMAGE_REPOSITORY = "localhost/kafka-retry-operator"
BUILDAH_ROOT = CACHE / "buildah"
LOGS = CACHE / "logs"
# The build's RUN steps fetch wheels from PyPI: they trust what this machine trusts (a bind
# mount during the build only; nothing of it is kept in a layer).
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def buildah(*args: str) -> list[str]:
    return [
        "buildah",
        f"--root={BUILDAH_ROOT / 'storage'}",
        f"--runroot={BUILDAH_ROOT / 'run'}",
        "--storage-driver=overlay",
        *args,
    ]


def _has_buildah_image(name: str) -> bool:
    cmd = buildah("inspect", "--type=image", "--format={{.FromImageID}}", name)
    return subprocess.run(cmd, capture_output=True).returncode == 0


def source_tag() -> str:
    """A tag naming the image's inputs: the Dockerfile, the base, and the files the build
    context holds (.dockerignore allow-lists pyproject.toml, README.md, workers/, operator/)."""
    digest = hashlib.sha256(BASE_IMAGE.encode())
    files = [ROOT / "Dockerfile", ROOT / ".dockerignore", ROOT / "pyproject.toml"]
    files += [ROOT / "README.md", HACK / "images.py"]  # and how it is built
    for folder in ("workers", "operator"):
        files += [
            p
            for p in sorted((ROOT / folder).rglob("*"))
            if p.is_file()
            and "__pycache__" not in p.parts
            and not any(part.endswith(".egg-info") for part in p.parts)
            and p.suffix not in (".pyc", ".pyo", ".pyd")
        ]
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return f"src-{digest.hexdigest()[:12]}"


def project_image() -> str:
    return f"{IMAGE_REPOSITORY}:{source_tag()}"


def _commit_rootfs(tar: Path, image: str, *config: str) -> None:
    """A one-layer image from a root filesystem tar (buildah `FROM scratch` + `ADD`)."""
    logfile = LOGS / "buildah.log"
    container = subprocess.run(
        buildah("from", "scratch"), capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        _run_logged(buildah("add", container, str(tar), "/"), logfile)
        _run_logged(buildah("config", *config, container), logfile)
        _run_logged(buildah("commit", "--quiet", container, image), logfile)
    finally:
        subprocess.run(buildah("rm", container), capture_output=True)


def ensure_base() -> None:
    if _has_buildah_image(BASE_IMAGE):
        return

    def build() -> None:
        tar = BUILDAH_ROOT / "base-rootfs.tar"
        tar.parent.mkdir(parents=True, exist_ok=True)
        _run_logged(
            ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={BASE_PACKAGES}",
             "bookworm", str(tar)],
            LOGS / "mmdebstrap.log",
        )  # fmt: skip
        # pip inside the build trusts the system store (which the build bind-mounts).
        _commit_rootfs(
            tar,
            BASE_IMAGE,
            f"--env=PIP_CERT={HOST_CA_BUNDLE}",
            "--env=LANG=C.UTF-8",
            "--cmd=python3",
        )
        tar.unlink()

    timed(f"base image {BASE_IMAGE} (mmdebstrap bookworm + python3)", build)


def ensure_pause() -> None:
    binary = PAUSE_DIR / "bin" / "pause"
    if not binary.exists():

        def build_pause(tmp: Path) -> None:
            _run_logged(["bash", str(HACK / "build-pause.sh"), str(tmp)], LOGS / "pause.log")

        timed("go build pause", lambda: _atomic_build(PAUSE_DIR, build_pause))
    if _has_buildah_image(PAUSE_IMAGE):
        return
    tar = PAUSE_DIR / "rootfs.tar"
    _run_logged(["tar", "-C", str(binary.parent), "-cf", str(tar), "pause"], LOGS / "pause.log")
    _commit_rootfs(tar, PAUSE_IMAGE, '--entrypoint=["/pause"]', "--user=65535:65535")


def build_project_image(image: str) -> None:
    """`buildah bud` of the Dockerfile, with the local base as its `PYTHON_IMAGE`."""
    ensure_base()

    def bud() -> None:
        _run_logged(
            buildah(
                "bud",
                # No --layers: buildah 1.28 would reuse the runtime stage's install step even
                # when the wheel it mounts from the builder stage has changed.
                "--isolation=chroot",
                "--network=host",
                f"--volume={HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro",
                f"--build-arg=PYTHON_IMAGE={BASE_IMAGE}",
                f"--tag={image}",
                f"--file={ROOT / 'Dockerfile'}",
                str(ROOT),
            ),
            LOGS / "image-build.log",
        )

    timed(f"buildah bud {image}", bud)


def containerd_has(ctr: list[str], image: str) -> bool:
    out = subprocess.run([*ctr, "images", "ls", "-q"], capture_output=True, text=True)
    return image in out.stdout.split()


def import_image(ctr: list[str], image: str) -> None:
    """buildah's image into containerd: an OCI archive, then `ctr images import`."""
    archive = BUILDAH_ROOT / f"{image.rpartition('/')[2].replace(':', '_')}.oci.tar"
    archive.unlink(missing_ok=True)
    try:
        _run_logged(buildah("push", image, f"oci-archive:{archive}:{image}"), LOGS / "buildah.log")
        _run_logged([*ctr, "images", "import", str(archive)], LOGS / "ctr-import.log")
    finally:
        archive.unlink(missing_ok=True)
    if not containerd_has(ctr, image):
        raise SetupError(f"{image} not in containerd after import; log: {LOGS / 'ctr-import.log'}")


def ensure_in_containerd(ctr: list[str], image: str, build: bool = True) -> None:
    """`image` present in containerd: imported from buildah's storage, built first if need be
    (the project image) - one builder at a time across checkouts."""
    if containerd_has(ctr, image):
        return
    with cache_lock("image"):
        if containerd_has(ctr, image):
            return
        if image == PAUSE_IMAGE:
            ensure_pause()
        elif not _has_buildah_image(image):
            if not build:
                raise SetupError(f"{image} is not built: run `make image`")
            build_project_image(image)
        log(f"importing {image} into containerd")
        import_image(ctr, image)
        if image != PAUSE_IMAGE:
            _prune_builds(keep=image)


def _prune_builds(keep: str) -> None:
    """Earlier builds of the project image leave buildah's storage (containerd keeps the
    ones imported: another checkout's pods may run them)."""
    listing = subprocess.run(
        buildah("images", "--format={{.Name}}:{{.Tag}}"), capture_output=True, text=True
    )
    old = [n for n in listing.stdout.split() if n.startswith(f"{IMAGE_REPOSITORY}:") and n != keep]
    if old:
        subprocess.run(buildah("rmi", *old), capture_output=True)
    subprocess.run(buildah("rmi", "--prune"), capture_output=True)
