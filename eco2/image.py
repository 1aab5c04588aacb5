"""`eco2 image build`: the deploy/Dockerfile image, built with buildah, without a registry.

There is no Docker engine here and no registry may answer, so the base is made locally: a Debian
bookworm minbase with python3 and python3-venv from `mmdebstrap` (a tarball cached under
.local/image/), imported as `localhost/eco2-base:bookworm`, then `buildah bud --isolation chroot`
with `--layers`, so a rebuild with an unchanged lock reuses the dependency layer. With
`--base python:3.11-slim` (or any other) it builds on that instead where a registry answers.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

from contract.settings import REPO_ROOT, Settings

from .install import APT_PACKAGES, ensure_apt_packages

LOCAL_BASE = "localhost/eco2-base:bookworm"
IMAGE = "localhost/eco2-streams"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CA_IN_BUILD = "/run/eco2-build-ca.crt"


def version() -> str:
    return str(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"])


def tag() -> str:
    return f"{IMAGE}:{version()}"


def ensure_tools() -> None:
    """buildah and mmdebstrap from Debian (also part of `eco2 stack up`'s packages)."""
    ensure_apt_packages({t: APT_PACKAGES[t] for t in ("buildah", "mmdebstrap")})


def _buildah(*args: str) -> str:
    return subprocess.run(["buildah", *args], capture_output=True, text=True, check=True).stdout.strip()


def exists(image: str) -> bool:
    try:
        _buildah("inspect", "--type", "image", image)
    except subprocess.CalledProcessError:
        return False
    return True


def base_tar(s: Settings) -> Path:
    """The bookworm minbase tarball (about 20-100 s the first time, then cached)."""
    out = s.local_dir / "image" / "base-bookworm.tar"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.tar")
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm", str(tmp)],
            check=True,
        )
        tmp.rename(out)
    return out


def ensure_local_base(s: Settings) -> str:
    """`localhost/eco2-base:bookworm` from the tarball (buildah 1.28 has no `import`: a
    scratch container with the tarball added is committed instead)."""
    if exists(LOCAL_BASE):
        return LOCAL_BASE
    tar = base_tar(s)
    ctr = _buildah("from", "scratch")
    try:
        _buildah("add", "--quiet", ctr, str(tar), "/")
        _buildah("commit", "--quiet", ctr, LOCAL_BASE)
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)
    return LOCAL_BASE


def build(s: Settings, base: str | None = None) -> str:
    """Build the image; returns its tag. `base` None = the local bookworm base."""
    ensure_tools()
    base = base or ensure_local_base(s)
    argv = [
        "buildah", "bud", "--isolation", "chroot", "--layers", "--quiet",
        "-f", str(REPO_ROOT / "deploy" / "Dockerfile"),
        "--build-arg", f"BASE={base}", "-t", tag(),
    ]  # fmt: skip
    ca = Path(os.environ.get("PIP_CERT") or CA_BUNDLE)
    if ca.is_file():  # the host's trust store, e.g. a TLS-intercepting proxy's CA, for pip only
        argv += ["--volume", f"{ca}:{CA_IN_BUILD}:ro", "--build-arg", f"PIP_CA_FILE={CA_IN_BUILD}"]
    subprocess.run([*argv, str(REPO_ROOT)], check=True, stdout=subprocess.DEVNULL)
    return tag()
