"""The lock files (eco2/lock.py, `make lock`) agree with pyproject.toml and are what is installed."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from eco2.lock import DEV_LOCK, LOCK, PYPROJECT, applicable, pins, problems


def test_both_locks_agree_with_pyproject() -> None:
    assert problems(PYPROJECT, DEV_LOCK, ("dev",)) == []
    assert problems(PYPROJECT, LOCK) == []


def test_the_runtime_lock_has_the_dev_locks_versions_and_no_dev_tools() -> None:
    dev, run = set(pins(DEV_LOCK)), set(pins(LOCK))
    assert run < dev
    assert not {"pytest", "mypy", "ruff", "playwright"} & {p.name for p in run}


def test_a_changed_or_unrelocked_pyproject_is_caught(tmp_path: Path) -> None:
    text = PYPROJECT.read_text()
    added = tmp_path / "pyproject.toml"
    added.write_text(
        text.replace("dependencies = [\n", 'dependencies = [\n  "left-pad-nonexistent>=1",\n', 1)
    )
    found = problems(added, LOCK)
    assert any("make lock" in p for p in found) and any("left-pad-nonexistent" in p for p in found)
    narrowed = tmp_path / "narrowed.toml"  # a range the pinned version falls outside of
    narrowed.write_text(text.replace('"pyyaml>=6.0"', '"pyyaml>=6.0,<6.0.1"'))
    assert any("pyyaml" in p and "outside" in p for p in problems(narrowed, LOCK))


def test_the_virtualenv_holds_exactly_the_dev_locks_versions() -> None:
    """`make install` installs from the lock (a plain `pip install -e .[dev]` would drift)."""
    wrong = {}
    for name, version in applicable(DEV_LOCK).items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "missing"
        if installed != version:
            wrong[name] = (version, installed)
    assert wrong == {}
