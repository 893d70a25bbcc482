"""No machine's paths in the repository: configs name their data relative to themselves, and a
missing split says which setting to fix and where it looked."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from sellarec.training.config import load_config
from sellarec.training.data import Dataset

ROOT = Path(__file__).resolve().parents[1]

#: Directories that only exist on some machine: workspaces, home directories, mounts.
#: `/home/sellarec` is the container image's own user (Dockerfile), part of the product.
MACHINE_PATH = re.compile(r"(?<![\w.-])/(?:work|root|Users|mnt|scratch)/|(?<![\w.-])/home/(?!sellarec\b)")


def test_shipped_configs_name_their_data_relative_to_themselves():
    configs = sorted((ROOT / "training" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
        for split in ("train", "valid"):
            value = str(data.get(split) or "")
            assert not value.startswith(("/", "~")), f"{path.name}: data.{split} = {value!r}"


def test_a_missing_split_names_the_setting_and_the_path_resolved_against_the_config(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.parquet").write_bytes(b"")
    path = tmp_path / "conf" / "run.yaml"
    path.write_text("data:\n  train: ../splits/train.parquet\n  valid: ../splits/valid.parquet\n")
    cfg = load_config(path)
    expected = str((tmp_path / "splits" / "valid.parquet").resolve())
    with pytest.raises(FileNotFoundError) as err:
        Dataset.load(cfg.data.train, cfg.data.valid)
    assert "data.valid" in str(err.value) and expected in str(err.value)
    assert "--set data.valid=PATH" in str(err.value)


def test_no_tracked_file_names_a_machine_path():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    found = []
    for name in listed.stdout.splitlines():
        file = ROOT / name
        if file == Path(__file__).resolve() or not file.is_file():
            continue
        try:
            text = file.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary files (figures, fixtures)
        found += [f"{name}:{n}" for n, line in enumerate(text.splitlines(), 1) if MACHINE_PATH.search(line)]
    assert not found, "machine paths in: " + ", ".join(found)
