"""What every section reads (`Report`: the base run, its results, the other run
directories) and the small formatting they share."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from sellarec.training.config import VARIANTS
from sellarec.training.report.paths import PathStyle, absolute
from sellarec.training.report.stats import paired_bootstrap

#: How the document names each variant.
LABELS = {
    "mf": "MF",
    "zeroshot": "Zero-shot LLM",
    "tallrec": "TALLRec",
    "collm": "CoLLM (SeLLa-w/o)",
    "sellarec": "SeLLa-Rec",
    "sella-proj": "SeLLa-Proj",
    "sella-warm": "SeLLa-Warm",
    "sella-ui": "SeLLa-UI",
    "sellarec-mf": "SeLLa-Rec as a residual on MF (extension)",
}
#: The validation metrics of the table, in its column order.
METRICS = ("auc", "uauc", "auc_warm", "auc_cold", "uauc_warm", "uauc_cold")


def fmt(x: float | None) -> str:
    """A metric as the tables print it ("null" where the run did not measure it)."""
    return "null" if x is None else f"{x:.4f}"


def plus_minus(mean: float, std: float, sign: bool = False) -> str:
    """ "mean ± std", or the mean alone where std is NaN (one seed)."""
    m = f"{mean:+.4f}" if sign else f"{mean:.4f}"
    return m if np.isnan(std) else f"{m} ± {std:.4f}"


def wall_seconds(result: dict) -> float:
    """A result's recorded wall time (0 when it recorded none)."""
    return float(result.get("wall_seconds") or 0.0)


def _resume(name: str, runs: str, config: str) -> str:
    return f"sellarec-train run {name} --config {config} --out {runs}"


def load_results(runs: Path) -> dict[str, dict]:
    """The results of the run directory `runs` per variant, those with validation metrics."""
    out = {}
    for name in VARIANTS:
        path = runs / "results" / f"{name}.json"
        if path.exists():
            result = json.loads(path.read_text())
            if "valid" in result:
                out[name] = result
    return out


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def setting_of(result: dict, base: dict, ignore: tuple[str, ...] = ()) -> str:
    """The config values in which `result` differs from `base` ("key=value, ...")."""
    a, b = _flat(result["config"]), _flat(base["config"])
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in ignore)
    return ", ".join(f"{k}={a.get(k, '-')}" for k in changed) or "(same config)"


@dataclass
class Report:
    """What the sections read: the base run, its results, the other run directories."""

    #: The base run directory (`--runs`).
    runs: Path
    #: Its results per variant (those with validation metrics).
    results: dict[str, dict]
    #: The configuration the runs recorded ({} when no result yet).
    cfg: dict
    #: The configuration file named in the resume commands.
    config: str
    #: The Markdown file written; figures are linked relative to it.
    doc: Path
    #: Where the PNGs go.
    figures: Path
    #: Bootstrap resamples.
    resamples: int
    #: Run directories of scripts/train/sweep.sh.
    sweeps: list[Path]
    #: Run directories of the same config with another seed.
    seeds: list[Path]
    #: How paths are written.
    paths: PathStyle
    _bootstraps: dict[tuple[str, str], dict] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        runs: Path,
        doc: Path,
        figures: Path,
        resamples: int,
        config: str,
        sweeps: list[Path],
        seeds: list[Path],
    ) -> Report:
        results = load_results(runs)
        cfg = next(iter(results.values()))["config"] if results else {}
        train = cfg.get("data", {}).get("train")
        paths = PathStyle.of(runs, Path(train).parent if train else None)
        return cls(runs, results, cfg, config, doc, figures, resamples, sweeps, seeds, paths)

    @cached_property
    def seed_runs(self) -> list[tuple[Path, dict[str, dict]]]:
        """(directory, results) of the base run, then of each seed run that has any (read once)."""
        runs = [(self.runs, self.results)] + [(d, load_results(d)) for d in self.seeds]
        return [(d, res) for d, res in runs if res]

    def bootstrap(self, a: str, b: str) -> dict:
        """Paired bootstrap of a minus b on the base run (computed once per pair)."""
        if (a, b) not in self._bootstraps:
            self._bootstraps[a, b] = paired_bootstrap(self.results[a], self.results[b], self.resamples)
        return self._bootstraps[a, b]

    def resume(self, name: str) -> str:
        return _resume(name, self.paths.path(self.runs), self.paths.text(self.config))

    def figure_link(self, fig: Path) -> str:
        return os.path.relpath(absolute(fig), absolute(self.doc).parent)
