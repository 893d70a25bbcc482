"""Training noise: the same configuration over seeds, and which differences between
variants survive both the seed spread and the bootstrap over users."""

from __future__ import annotations

from pathlib import Path

from sellarec.training.config import VARIANTS
from sellarec.training.report.context import LABELS, Report, plus_minus, setting_of
from sellarec.training.report.stats import mean_std, paired_difference

#: Pairs compared over seeds, (better, worse) in the paper's order.
SEED_PAIRS: tuple[tuple[str, str], ...] = (
    ("sellarec", "collm"),
    ("sellarec", "mf"),
    ("collm", "mf"),
    ("collm", "tallrec"),
    ("tallrec", "mf"),
    ("tallrec", "zeroshot"),
    ("sellarec-mf", "mf"),  # the extension, where it was run
    ("sellarec-mf", "sellarec"),
)


def _seed_of(results: dict[str, dict]) -> int | None:
    return next((res.get("seed") for res in results.values()), None)


def seed_means(r: Report) -> dict[str, dict[str, tuple[float, int]]]:
    """Per variant of the base run: {metric: (mean over the seeds it was run at, seeds)}."""
    runs = [res for _, res in r.seed_runs]
    out = {}
    for name in r.results:
        found = [res[name]["valid"] for res in runs if name in res]
        out[name] = {k: (mean_std([v[k] for v in found])[0], len(found)) for k in ("auc", "uauc")}
    return out


def seeds_section(r: Report) -> list[str]:
    lines = ["## Training noise (seeds)", ""]
    dirs = r.seed_runs
    runs = [res for _, res in dirs]
    names = [n for n in VARIANTS if n in r.results and sum(n in res for res in runs) >= 2]
    if not names:
        return [
            *lines,
            "No seed run given (`sellarec-train report --seeds DIR`, repeatable), or none "
            "shares a variant with the base run.",
        ]
    seeds = [_seed_of(res) for res in runs]
    lines += [
        f"The same configuration trained with seeds {', '.join(str(s) for s in seeds)} (the base run "
        f"is seed {seeds[0]}); the validation rows are the same in every run (`eval.seed`). Mean and "
        "sample standard deviation over the seeds, the base run included.",
        "",
        *_seed_config_notes(r, dirs[1:]),
        "| variant | AUC / UAUC per seed | AUC mean ± std | UAUC mean ± std | seeds |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        found = [(_seed_of(res), res[name]["valid"]) for res in runs if name in res]
        cells = "; ".join(f"seed {s}: {v['auc']:.4f} / {v['uauc']:.4f}" for s, v in found)
        auc, uauc = mean_std([v["auc"] for _, v in found]), mean_std([v["uauc"] for _, v in found])
        spread = f"{plus_minus(*auc)} | {plus_minus(*uauc)}"
        lines.append(f"| {LABELS[name]} | {cells} | {spread} | {len(found)} |")
    return lines + ["", *seed_pairs_lines(r, runs)]


def _seed_config_notes(r: Report, others: list[tuple[Path, dict[str, dict]]]) -> list[str]:
    """A warning for every seed run whose seed or config is not the base run's seed / config."""
    base = next(iter(r.results.values()))
    notes = []
    for path, res in others:
        other = next(iter(res.values()))
        diff = setting_of(other, base, ignore=("seed",))
        if other.get("seed") == base.get("seed"):
            notes.append(f"- Warning: `{r.paths.path(path)}` has the base run's seed ({base.get('seed')}).")
        if diff != "(same config)":
            notes.append(
                f"- Warning: `{r.paths.path(path)}` differs beyond the seed: `{r.paths.text(diff)}`."
            )
    return [*notes, ""] if notes else []


def seed_pairs_lines(r: Report, runs: list[dict[str, dict]]) -> list[str]:
    """Differences between variants against both noises: seeds and evaluation rows."""
    lines = [
        "Differences between variants. *Survives both* means (i) the mean over seeds of the paired "
        "difference (each seed's difference computed on the same validation rows) exceeds twice the "
        "sample standard deviation of those per-seed differences (training noise), and (ii) the 95% "
        f"paired bootstrap interval over users of the base run (seed {_seed_of(r.results)}) excludes 0 "
        "(evaluation noise), on the same side.",
        "",
        "| pair | metric | seeds | mean difference ± std | 2 × std | bootstrap 95% CI (base run) | "
        "survives both |",
        "|---|---|---|---|---|---|---|",
    ]
    for a, b in SEED_PAIRS:
        per_seed = [paired_difference(res[a], res[b]) for res in runs if a in res and b in res]
        if a not in r.results or b not in r.results or len(per_seed) < 2:
            continue
        boot = r.bootstrap(a, b)
        for k in ("auc", "uauc"):
            mean, std = mean_std([d[k] for d in per_seed])
            low, high = boot[k]["low"], boot[k]["high"]
            lines.append(
                f"| {LABELS[a]} - {LABELS[b]} | {k.upper()} | {len(per_seed)} | "
                f"{plus_minus(mean, std, sign=True)} | "
                f"{2 * std:.4f} | [{low:+.4f}, {high:+.4f}] | "
                f"{'yes' if survives(mean, std, low, high) else 'no'} |"
            )
    return lines


def survives(mean: float, std: float, low: float, high: float) -> bool:
    """The seed-and-bootstrap rule of `seed_pairs_lines`."""
    beyond_seeds = bool(abs(mean) > 2 * std)  # False for NaN (one seed)
    beyond_rows = (low > 0 and mean > 0) or (high < 0 and mean < 0)
    return beyond_seeds and beyond_rows
