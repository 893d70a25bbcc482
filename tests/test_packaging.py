"""The installed layout: every package folder installs under the one `sellarec` namespace."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed_under_the_namespace():
    cfg = _config()
    on_disk = set()
    for name, folder in cfg["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([name, *rel.parts]))
    listed = set(cfg["packages"]) - {"sellarec.training.configs"}  # data only (the YAML configs)
    assert on_disk == listed


def test_nothing_installs_outside_the_namespace():
    cfg = _config()
    assert all(p.startswith("sellarec.") for p in cfg["packages"])
    assert all(k.startswith("sellarec.") for k in cfg["package-dir"])


def test_the_entry_points_name_namespaced_modules():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts and all(target.startswith("sellarec.") for target in scripts.values())
