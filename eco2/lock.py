"""`make lock` (`python -m eco2.lock`): the hash-pinned lock files, from pyproject.toml, with uv.

`make lock-upgrade` moves every pin to the newest version the ranges allow.

- `requirements-dev.lock`: runtime + dev extras; what `make install` and CI install.
- `requirements.lock`: runtime only, constrained to the dev lock's pins (same versions); what the
  image installs.

Both resolve for every platform (`--universal`) on Python 3.11 with a hash for every file, so a
clean clone installs exactly what was tested (`pip install --require-hashes`). The first line
after uv's header records a digest of the dependency sections of pyproject.toml: a test fails
when pyproject's dependencies change and the lock was not refreshed. Standard library only: it
runs before the virtualenv holds the project's dependencies.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
PYTHON = "3.11"
DIGEST_PREFIX = "# pyproject-dependencies-sha256: "


def dependency_sections(pyproject: Path = PYPROJECT) -> dict[str, object]:
    """What the lock is made from: requires-python, dependencies and optional dependencies."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return {
        "requires-python": project.get("requires-python", ""),
        "dependencies": sorted(project.get("dependencies", [])),
        "optional-dependencies": {k: sorted(v) for k, v in project.get("optional-dependencies", {}).items()},
    }


def digest(pyproject: Path = PYPROJECT) -> str:
    return hashlib.sha256(json.dumps(dependency_sections(pyproject), sort_keys=True).encode()).hexdigest()


def recorded_digest(lock: Path) -> str | None:
    for line in lock.read_text().splitlines():
        if line.startswith(DIGEST_PREFIX):
            return line.removeprefix(DIGEST_PREFIX).strip()
    return None


def _compile(out: Path, *extra: str) -> None:
    argv = [
        sys.executable, "-m", "uv", "pip", "compile", "pyproject.toml",
        "--universal", "--python-version", PYTHON, "--generate-hashes", "--quiet",
        "--custom-compile-command", "make lock", "--output-file", out.name, *extra,
    ]  # fmt: skip
    subprocess.run(argv, cwd=ROOT, check=True)
    lines = out.read_text().splitlines(keepends=True)
    header = 0
    while header < len(lines) and lines[header].startswith("#"):
        header += 1
    lines.insert(header, f"{DIGEST_PREFIX}{digest()}\n")
    out.write_text("".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Re-resolve both locks from pyproject.toml. Pins already in the lock are kept where the
    ranges still allow them (a new dependency does not upgrade everything); `--upgrade` takes the
    newest versions the ranges allow."""
    args = sys.argv[1:] if argv is None else argv
    if "--check" in args:  # `make install`: refuse a stale lock (it would miss new dependencies)
        stale = [lock.name for lock in (DEV_LOCK, LOCK) if recorded_digest(lock) != digest()]
        if stale:
            sys.exit(f"{', '.join(stale)}: older than pyproject.toml's dependencies; run `make lock`")
        return
    upgrade = ["--upgrade"] if "--upgrade" in args else []
    _compile(DEV_LOCK, "--extra", "dev", *upgrade)
    _compile(LOCK, "--constraint", DEV_LOCK.name, *upgrade)
    print(f"wrote {DEV_LOCK.name} and {LOCK.name} (digest {digest()[:12]})")


if __name__ == "__main__":
    main()


# --- checks (tests/test_lock.py) --------------------------------------------------------------


class Pin(NamedTuple):
    name: str
    version: str
    marker: str  # environment marker ("" = everywhere): a universal lock may pin two versions
    hashes: int


def pins(lock: Path) -> list[Pin]:
    """Every requirement of a lock file, in order."""
    out: list[Pin] = []
    for block in re.split(r"\n(?=\S)", lock.read_text()):
        head = block.splitlines()[0]
        if not head or head.startswith("#"):
            continue
        spec, _, marker = head.rstrip(" \\").partition(";")
        name, _, version = spec.partition("==")
        out.append(Pin(norm(name.split("[")[0]), version.strip(), marker.strip(), block.count("--hash=")))
    return out


def applicable(lock: Path) -> dict[str, str]:
    """name -> version that this interpreter and platform install from `lock`."""
    from packaging.markers import Marker

    return {p.name: p.version for p in pins(lock) if not p.marker or Marker(p.marker).evaluate()}


def norm(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def problems(pyproject: Path = PYPROJECT, lock: Path = LOCK, extras: tuple[str, ...] = ()) -> list[str]:
    """Where `lock` disagrees with `pyproject` (empty when it is up to date)."""
    from packaging.requirements import Requirement

    out: list[str] = []
    if recorded_digest(lock) != digest(pyproject):
        out.append(f"{lock.name}: pyproject.toml's dependencies changed since it was made: run `make lock`")
    sections = dependency_sections(pyproject)
    wanted = list(sections["dependencies"])  # type: ignore[call-overload]
    for extra in extras:
        wanted += sections["optional-dependencies"].get(extra, [])  # type: ignore[attr-defined]
    pinned = applicable(lock)
    for text in wanted:
        req = Requirement(text)
        name = norm(req.name)
        if req.marker is not None and not req.marker.evaluate():
            continue
        if name not in pinned:
            out.append(f"{lock.name}: {req.name} is not pinned")
        elif not req.specifier.contains(pinned[name], prereleases=True):
            out.append(f"{lock.name}: {req.name}=={pinned[name]} is outside {req.specifier}")
    out += [f"{lock.name}: {p.name}=={p.version} has no hash" for p in pins(lock) if not p.hashes]
    return out
