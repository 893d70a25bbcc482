"""docs/results.md from a run directory: the validation table beside the paper's Table 3,
the paired bootstrap of SeLLa-Rec minus CoLLM (resampling users), training noise over seeds,
the gap to MF split between and within users,
the training-loss curves, and the Fig. 7 plot of cos(Proj C->L(e_i^C), e_i^L).

Every section is a function of one `Report` (the base run, its results, the other run
directories) returning Markdown lines, in the module of its subject; `write_report` joins
them. The document names no absolute path (`PathStyle`): it is committed, and the run
directories are not.
"""

from __future__ import annotations

from pathlib import Path

from sellarec.training.report.context import LABELS, Report, load_results, setting_of
from sellarec.training.report.levels import levels_section
from sellarec.training.report.losses import loss_section
from sellarec.training.report.overview import header_section, machine_line, setup_section
from sellarec.training.report.paths import PathStyle
from sellarec.training.report.seeds import seeds_section, survives
from sellarec.training.report.soft_tokens import alignment_section, scale_section
from sellarec.training.report.stats import paired_bootstrap, paired_difference
from sellarec.training.report.sweeps import sweep_section
from sellarec.training.report.validation import (
    PAPER_TABLE3_ML1M,
    bootstrap_section,
    extension_section,
    missing_section,
    ordering_section,
    paper_table_section,
    validation_section,
)

__all__ = [
    "LABELS",
    "PAPER_TABLE3_ML1M",
    "SECTIONS",
    "PathStyle",
    "Report",
    "load_results",
    "machine_line",
    "paired_bootstrap",
    "paired_difference",
    "setting_of",
    "survives",
    "write_report",
]


SECTIONS = (
    header_section,
    setup_section,
    validation_section,
    paper_table_section,
    bootstrap_section,
    extension_section,
    seeds_section,
    ordering_section,
    levels_section,
    loss_section,
    alignment_section,
    sweep_section,
    scale_section,
    missing_section,
)


def write_report(
    runs: Path,
    doc: Path,
    figures: Path,
    resamples: int = 2000,
    config: str = "training/configs/ml1m.yaml",
    sweeps: list[Path] | None = None,
    seeds: list[Path] | None = None,
) -> Path:
    """Write `doc` (and the PNGs under `figures`) from the run directory `runs`, with the
    seed runs `seeds` and the sweep runs `sweeps` beside it."""
    r = Report.of(runs, doc, figures, resamples, config, sweeps or [], seeds or [])
    lines: list[str] = []
    for section in SECTIONS:
        body = section(r)
        while body and not body[-1]:
            body = body[:-1]
        lines += [*body, ""] if body else []
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines).rstrip("\n") + "\n")
    return doc
