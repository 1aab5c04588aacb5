"""Every top-level package ships: pyproject.toml installs it and the image COPYs it (a package
moved out of streams/ once would otherwise import in the checkout and fail in the pod)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOT_SHIPPED = {"tests"}


def packages() -> set[str]:
    return {p.parent.name for p in REPO.glob("*/__init__.py")} - NOT_SHIPPED


def test_pyproject_installs_every_package() -> None:
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    patterns = {p.removesuffix("*") for p in include["include"]}
    assert packages() <= patterns, packages() - patterns


def test_image_copies_every_package() -> None:
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (REPO / "deploy" / "Dockerfile").read_text(), re.M))
    assert packages() <= copied, packages() - copied


def test_the_rule_base_ships_as_package_data() -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "data/*.json" in data["catalog"] and (REPO / "catalog" / "data" / "rules.json").is_file()
