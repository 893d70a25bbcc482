"""Settings tried on validation (`scripts/train/sweep.sh`), each against the same variant
of the base run."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from sellarec.training.config import VARIANTS
from sellarec.training.diagnostics import token_scale
from sellarec.training.report.context import LABELS, Report, fmt, load_results, setting_of, wall_seconds
from sellarec.training.report.stats import paired_bootstrap


def sweep_section(r: Report) -> list[str]:
    return ["## Tuning on validation", "", *sweep_lines(r)] if r.sweeps else []


def sweep_lines(r: Report) -> list[str]:
    """One row per variant of each sweep run, against the same variant of the base run."""
    lines = [
        "Settings tried on validation beside the base run (`scripts/train/sweep.sh`): each row is "
        "the same variant as the base row of that name, with only the setting shown changed, on the "
        "same validation rows; the difference is a paired user-level bootstrap as above. `<Item_ID>` "
        "scale: median norm of Proj C->L(e_i^C) where stage 3 starts (stage 2's projection, for the "
        "warm-started variants) and after stage 3.",
        "",
        "| variant | setting | AUC | UAUC | AUC warm | AUC cold | AUC - base AUC [95% CI] | "
        "`<Item_ID>` scale, start -> end | wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    commands = []
    for sweep in r.sweeps:
        for name, res in load_results(sweep).items():
            base = r.results.get(name)
            if base is None:
                continue
            v = res["valid"]
            b = paired_bootstrap(res, base, r.resamples)["auc"]
            start = _item_scale(sweep, res, "stage2-align") if VARIANTS[name].warm_start else None
            end = _item_scale(sweep, res, f"bundle-{name}")
            scale = f"{'-' if start is None else f'{start:.2f}'} -> {'-' if end is None else f'{end:.2f}'}"
            lines.append(
                f"| {LABELS[name]} | `{r.paths.text(setting_of(res, base))}` | "
                + " | ".join(fmt(v.get(k)) for k in ("auc", "uauc", "auc_warm", "auc_cold"))
                + f" | {b['diff']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}] | {scale} | "
                f"{wall_seconds(res) / 60:.1f} min |"
            )
            commands.append(f"- {LABELS[name]}, `{r.paths.path(sweep)}`: `{r.paths.text(res['command'])}`")
    if not commands:
        return ["No sweep run shares a variant with the base run."]
    return [*lines, "", "Recorded invocations:", "", *commands]


def _item_scale(run: Path, result: dict, stage: str) -> float | None:
    entry = result.get("stages", {}).get(stage)
    if entry is None:
        return None
    path = run / "stages" / entry["dir"]
    name = "collab.safetensors" if stage.startswith("stage2") else "bundle/tensors.safetensors"
    if not (path / name).exists():
        return None
    return token_scale(load_file(path / name)).item
