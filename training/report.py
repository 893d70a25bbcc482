"""docs/results.md from a run directory: the validation table beside the paper's Table 3,
the paired bootstrap of SeLLa-Rec minus CoLLM (resampling users), training noise over seeds,
the training-loss curves, and the Fig. 7 plot of cos(Proj C->L(e_i^C), e_i^L).

Every section is a function of one `Report` (the base run, its results, the other run
directories) returning Markdown lines; `write_report` joins them. The document names no
absolute path (`PathStyle`): it is committed, and the run directories are not.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score
from transformers import AutoConfig

from sellarec.model.backbone import SMOLLM2_ALIAS, cache_dir
from sellarec.training.config import VARIANTS
from sellarec.training.diagnostics import (
    TokenScale,
    cosine_sets,
    latest_stage,
    random_projection,
    token_scale,
    vocabulary_scale,
)

LABELS = {
    "mf": "MF",
    "zeroshot": "Zero-shot LLM",
    "tallrec": "TALLRec",
    "collm": "CoLLM (SeLLa-w/o)",
    "sellarec": "SeLLa-Rec",
    "sella-proj": "SeLLa-Proj",
    "sella-warm": "SeLLa-Warm",
    "sella-ui": "SeLLa-UI",
}
METRICS = ("auc", "uauc", "auc_warm", "auc_cold", "uauc_warm", "uauc_cold")

#: The paper's Table 3, ML-1M (arXiv 2504.10107; test split, Qwen2-7B): method, our variant
#: of it (None: not implemented here), AUC, UAUC.
PAPER_TABLE3_ML1M: tuple[tuple[str, str | None, float, float], ...] = (
    ("MF", "mf", 0.6473, 0.6264),
    ("LightGCN", None, 0.6139, 0.6276),
    ("SASRec", None, 0.7058, 0.6818),
    ("DIN", None, 0.7138, 0.6595),
    ("Zero-shot LLM", "zeroshot", 0.5718, 0.5145),
    ("Prompt4NR", None, 0.7191, 0.6839),
    ("TALLRec", "tallrec", 0.7268, 0.6989),
    ("CTRL(DIN)", None, 0.7155, 0.6681),
    ("PersonPrompt", None, 0.7223, 0.6991),
    ("CoLLM-MF", "collm", 0.7357, 0.7179),
    ("BinLLM", None, 0.7417, 0.7239),
    ("SeLLa-Rec", "sellarec", 0.7606, 0.7464),
)

#: The paper's value of each setting we shrink to fit a CPU budget (config key -> paper).
PAPER_SETTINGS: dict[str, str] = {
    "stage1.lr": "1e-4",
    "stage1.warmup_steps": "not stated",
    "stage1.lora_top_layers": "every layer (q_proj, v_proj)",
    "stage1.budget": "the whole train split, full epochs",
    "prompt.history_length": "10",
    "stage3.budget": "the whole train split, full epochs",
    "stage3.soft_token_scale": "free (the projection's output as is)",
}

#: Pairs compared over seeds, (better, worse) in the paper's order.
SEED_PAIRS: tuple[tuple[str, str], ...] = (
    ("sellarec", "collm"),
    ("sellarec", "mf"),
    ("collm", "mf"),
    ("collm", "tallrec"),
    ("tallrec", "mf"),
    ("tallrec", "zeroshot"),
)

#: Steps in the moving average of the loss plot.
LOSS_WINDOW = 16

_ABSOLUTE = re.compile(r"(?<![\w.~/-])/[^\s'\"`,;)]+")


@dataclass(frozen=True)
class PathStyle:
    """How the document writes a path: relative to the working directory when under it,
    else with its leading directory replaced by a placeholder (`RUNS/` for the directory
    holding the run directories, `DATA/` for the one holding the data splits), else as
    `.../<name>`. Never absolute."""

    #: (root, placeholder), most specific root first.
    roots: tuple[tuple[Path, str], ...] = ()
    #: The working directory paths are made relative to.
    cwd: Path = field(default_factory=Path.cwd)

    @classmethod
    def of(cls, runs: Path, data_dir: str | Path | None = None, cwd: Path | None = None) -> PathStyle:
        roots = [(_absolute(runs).parent, "RUNS")]
        if data_dir:
            roots.append((_absolute(data_dir), "DATA"))
        roots.sort(key=lambda r: -len(r[0].parts))
        return cls(tuple(roots), _absolute(cwd or Path.cwd()))

    def path(self, p: str | Path) -> str:
        """`p` as the document writes it."""
        if not Path(p).is_absolute():
            return str(p)
        p = _absolute(p)
        if p.is_relative_to(self.cwd):
            return str(p.relative_to(self.cwd)) if p != self.cwd else "."
        for root, name in self.roots:
            if p.is_relative_to(root):
                return str(Path(name) / p.relative_to(root))
        return f".../{p.name}"

    def text(self, s: str) -> str:
        """`s` (a recorded command line, a config value) with every absolute path in it rewritten."""
        return _ABSOLUTE.sub(lambda m: self.path(m.group(0)), s)


def _absolute(p: str | Path) -> Path:
    return Path(os.path.abspath(Path(p).expanduser()))


def machine_line(results: dict[str, dict]) -> str:
    """The CPU kernels the results were computed with (recorded by each run), or this machine's."""
    recorded = {json.dumps(r["machine"], sort_keys=True) for r in results.values() if "machine" in r}
    if recorded:
        kinds = [json.loads(m) for m in sorted(recorded)]
        return "; ".join(
            f"{m['cpus']} CPU cores, torch {m['torch']} with {m['cpu_capability']} kernels" for m in kinds
        )
    return (
        f"{os.cpu_count()} CPU cores, torch {torch.__version__} with "
        f"{torch.backends.cpu.get_cpu_capability()} kernels (the machine that wrote this report; "
        "the runs predate recording it)"
    )


def _fmt(x: float | None) -> str:
    return "null" if x is None else f"{x:.4f}"


def load_results(runs: Path) -> dict[str, dict]:
    out = {}
    for name in VARIANTS:
        path = runs / "results" / f"{name}.json"
        if path.exists():
            result = json.loads(path.read_text())
            if "valid" in result:
                out[name] = result
    return out


@dataclass(frozen=True)
class _Paired:
    """Two variants' scores on the same validation rows, grouped by user."""

    label: np.ndarray
    score_a: np.ndarray
    score_b: np.ndarray
    #: Row indices of each user.
    rows_of: list[np.ndarray]
    #: Per-user AUC of a minus b (NaN for users with one class only).
    per_user: np.ndarray

    @classmethod
    def of(cls, a: dict, b: dict) -> _Paired:
        sa, sb = load_file(a["valid"]["scores"]), load_file(b["valid"]["scores"])
        if not (torch.equal(sa["uid"], sb["uid"]) and torch.equal(sa["iid"], sb["iid"])):
            raise ValueError("the variants were evaluated on different rows; pairing needs the same rows")
        uid, label = sa["uid"].numpy(), sa["label"].numpy()
        score_a, score_b = sa["scores"].numpy(), sb["scores"].numpy()
        _, inverse = np.unique(uid, return_inverse=True)
        rows_of = [np.flatnonzero(inverse == k) for k in range(int(inverse.max(initial=-1)) + 1)]
        per_user = np.full(len(rows_of), np.nan)
        for k, rows in enumerate(rows_of):
            if len(np.unique(label[rows])) == 2:
                per_user[k] = roc_auc_score(label[rows], score_a[rows]) - roc_auc_score(
                    label[rows], score_b[rows]
                )
        return cls(label, score_a, score_b, rows_of, per_user)

    def auc_diff(self, rows: np.ndarray | None = None) -> float:
        rows = np.arange(len(self.label)) if rows is None else rows
        y = self.label[rows]
        return float(roc_auc_score(y, self.score_a[rows]) - roc_auc_score(y, self.score_b[rows]))

    def point(self) -> dict[str, float]:
        """AUC and UAUC of a minus b on all the rows (UAUC over users with both classes)."""
        return {"auc": self.auc_diff(), "uauc": float(np.nanmean(self.per_user))}


def paired_difference(a: dict, b: dict) -> dict[str, float]:
    """AUC and UAUC of a minus b on the same validation rows (checked)."""
    return _Paired.of(a, b).point()


def paired_bootstrap(a: dict, b: dict, resamples: int, seed: int = 0) -> dict:
    """Differences a - b of AUC and UAUC with 95% percentile intervals, resampling users
    (all rows of a drawn user go in together), on the shared validation sample.

    UAUC of a resample is the mean per-user AUC over the drawn users (with multiplicity)
    that hold both classes, so per-user AUCs are computed once.
    """
    paired = _Paired.of(a, b)
    users = len(paired.rows_of)
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {"auc": [], "uauc": []}
    for _ in range(resamples):
        drawn = rng.integers(0, users, users)
        diffs["auc"].append(paired.auc_diff(np.concatenate([paired.rows_of[k] for k in drawn])))
        both = paired.per_user[drawn][~np.isnan(paired.per_user[drawn])]
        diffs["uauc"].append(float(both.mean()) if len(both) else float("nan"))
    point = paired.point()
    out: dict = {}
    for k, v in diffs.items():
        arr = np.asarray(v)
        out[k] = {
            "diff": point[k],
            "low": float(np.percentile(arr, 2.5)),
            "high": float(np.percentile(arr, 97.5)),
            "p_le_0": float(np.mean(arr <= 0)),
        }
    return out | {"users": users, "rows": len(paired.label), "resamples": resamples}


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


def _item_scale(run: Path, result: dict, stage: str) -> float | None:
    entry = result.get("stages", {}).get(stage)
    if entry is None:
        return None
    path = run / "stages" / entry["dir"]
    name = "collab.safetensors" if stage.startswith("stage2") else "bundle/tensors.safetensors"
    if not (path / name).exists():
        return None
    return token_scale(load_file(path / name)).item


def _local_backbone(spec: str) -> str | None:
    """The backbone's directory when it is on this machine already (a report never downloads)."""
    if spec == SMOLLM2_ALIAS:
        target = cache_dir() / SMOLLM2_ALIAS
        return str(target) if (target / "config.json").exists() else None
    return spec if (Path(spec) / "config.json").exists() else None


def _bundle_tensors(result: dict) -> Path | None:
    path = Path(result.get("bundle", "")) / "tensors.safetensors"
    return path if result.get("bundle") and path.exists() else None


def _resume(name: str, runs: str, config: str) -> str:
    return f"sellarec-train run {name} --config {config} --out {runs}"


def _wall(result: dict) -> float:
    return float(result.get("wall_seconds") or 0.0)


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")


def _pm(mean: float, std: float, sign: bool = False) -> str:
    m = f"{mean:+.4f}" if sign else f"{mean:.4f}"
    return m if np.isnan(std) else f"{m} ± {std:.4f}"


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

    def bootstrap(self, a: str, b: str) -> dict:
        """Paired bootstrap of a minus b on the base run (computed once per pair)."""
        if (a, b) not in self._bootstraps:
            self._bootstraps[a, b] = paired_bootstrap(self.results[a], self.results[b], self.resamples)
        return self._bootstraps[a, b]

    def resume(self, name: str) -> str:
        return _resume(name, self.paths.path(self.runs), self.paths.text(self.config))

    def figure_link(self, fig: Path) -> str:
        return os.path.relpath(_absolute(fig), _absolute(self.doc).parent)


def header_section(r: Report) -> list[str]:
    options = "".join(f" --seeds {r.paths.path(s)}" for s in r.seeds) + "".join(
        f" --sweep {r.paths.path(s)}" for s in r.sweeps
    )
    return [
        "# SeLLa-Rec variants on MovieLens-1M: validation results",
        "",
        f"Generated by `sellarec-train report --runs {r.paths.path(r.runs)}{options}` on "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from the run directories "
        "(stage caches, bundles and scores stay there; nothing derived from ML-1M is committed). "
        "Paths: `RUNS/` is the directory holding the run directories, `DATA/` the one holding the "
        "data splits.",
        "",
    ]


def setup_section(r: Report) -> list[str]:
    if not r.cfg:
        return []
    cfg, p = r.cfg, r.paths
    workers = sorted({p.text(x["command"]) for x in r.results.values() if x.get("command")})
    return [
        "## Setup",
        "",
        f"- Backbone: `{p.text(cfg['backbone'])}` (SmolLM2-135M-Instruct, fp32, CPU), "
        "not the paper's Qwen2-7B.",
        f"- Data: the CoLLM split of ML-1M (`{p.path(cfg['data']['train'])}`, "
        f"`{p.path(cfg['data']['valid'])}`); "
        "model selection (stage-2 early stopping) on validation only; the test split was not used.",
        f"- Evaluation: one seeded sample of {cfg['eval']['limit']} validation rows "
        f"(seed {cfg['eval']['seed']}), the same rows for every variant (checked when pairing).",
        f"- Budgets: stage 1 trains on {cfg['stage1']['budget']} seeded train rows "
        f"({cfg['stage1'].get('epochs', 1)} epoch(s), batch {cfg['stage1']['batch_size']}, "
        f"lr {cfg['stage1']['lr']}); stage 3 on {cfg['stage3']['budget']} rows per variant "
        f"(batch {cfg['stage3']['batch_size']}, lr {cfg['stage3']['lr']}); stage 2 is full "
        f"(d_C {cfg['stage2']['collab_dim']}, lambda {cfg['stage2']['align_weight']}, tau "
        f"{cfg['stage2']['temperature']}, patience {cfg['stage2']['patience']}); "
        "distillation covers every item.",
        f"- Soft-token scale (`stage3.soft_token_scale`): `{cfg['stage3'].get('soft_token_scale', 'free')}`.",
        f"- Seed {cfg['seed']}; configuration `{p.text(r.config)}` "
        "(every value is also in each bundle's manifest).",
        f"- Machine: {machine_line(r.results)}; {cfg['threads']} torch thread(s) per worker; "
        f"{len(workers)} worker(s) in parallel over the shared stage caches: "
        + ", ".join(f"`{w}`" for w in workers)
        + ". Stages a worker finds cached are reused; the recorded invocation of each row says "
        "which worker built it.",
        "",
        *budget_table(cfg),
        "",
    ]


def _ours(cfg: dict, key: str) -> str:
    """A budget setting of ours, worded like its PAPER_SETTINGS counterpart."""
    section, name = key.split(".")
    value = cfg.get(section, {}).get(name)
    if name == "lora_top_layers":
        modules = ", ".join(cfg["stage1"].get("target_modules", []))
        return f"{'every layer' if not value else f'top {value} layers'} ({modules})"
    if name == "budget":
        rows = "the whole train split" if not value or value <= 0 else f"{value} rows"
        return f"{rows}, {cfg[section].get('epochs', 1)} epoch(s)"
    if name == "warmup_steps":
        return "none" if not value else f"{value} steps"
    return "-" if value is None else str(value)


def budget_table(cfg: dict) -> list[str]:
    """Where this run's settings depart from the paper's to fit the CPU budget."""
    lines = ["Budget choices vs the paper:", "", "| setting | here | paper |", "|---|---|---|"]
    return lines + [f"| `{k}` | {_ours(cfg, k)} | {paper} |" for k, paper in PAPER_SETTINGS.items()]


def validation_section(r: Report) -> list[str]:
    lines = [
        "## Validation table",
        "",
        "| variant | AUC | UAUC | AUC warm | AUC cold | UAUC warm | UAUC cold | n | stage-1 rows | "
        "stage-3 rows | seed | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        res = r.results.get(name)
        if res is None:
            busy = any((r.runs / "stages").glob(f".*-{name}-*"))
            lines.append(
                f"| {LABELS[name]} | {'running (background)' if busy else 'not yet run'} "
                "| | | | | | | | | | |"
            )
            continue
        v = res["valid"]
        s1 = res["budgets"]["stage1"] if name not in {"mf", "zeroshot"} else "-"
        s3 = res["budgets"]["stage3"] if VARIANTS[name].stage3 else "-"
        lines.append(
            f"| {LABELS[name]} | "
            + " | ".join(_fmt(v.get(k)) for k in METRICS)
            + f" | {v['n']} | {s1} | {s3} | {res['seed']} | {_wall(res) / 60:.1f} min |"
        )
    return lines + [
        "",
        "Wall time = build time of every cached stage the variant uses (shared stages such as stage 1 "
        "are counted in full in each row that uses them) plus its evaluation.",
        "",
        *commands_lines(r),
    ]


def commands_lines(r: Report) -> list[str]:
    """The command of every row, the stage build times and the measured throughput."""
    lines = ["Commands (each row; stages already in the run directory are reused, not retrained):", ""]
    for name, res in r.results.items():
        lines.append(
            f"- {LABELS[name]}: `{r.resume(name)}` (recorded invocation: `{r.paths.text(res['command'])}`)"
        )
    lines += ["", "Stage timings (build wall time):", ""]
    seen = set()
    for res in r.results.values():
        for s in res.get("stages", {}).values():
            if s["dir"] not in seen and s.get("build_seconds") is not None:
                seen.add(s["dir"])
                lines.append(f"- `{s['dir']}`: {s['build_seconds'] / 60:.1f} min")
    lines += ["", "Throughput measured in these runs (each worker single-threaded, beside the others):", ""]
    return lines + throughput_lines(r.runs)


def throughput_lines(runs: Path) -> list[str]:
    """Rows (or items) per second of every built stage, from its done.json."""
    out = []
    for done in sorted((runs / "stages").glob("*/done.json")):
        record = json.loads(done.read_text())
        m = record.get("metrics") or {}
        seconds = m.get("seconds")
        count = m.get("rows") or m.get("items") or m.get("n")
        if seconds and count and not record["stage"].startswith("stage2"):
            unit = "items" if "items" in m else "rows"
            stage = record["stage"]
            stage = {"bundle": "stage 3", "eval": "evaluation"}.get(stage.split("-")[0], stage)
            stage += f" ({record['stage'].split('-', 1)[1]})" if "-" in record["stage"] else ""
            out.append(
                f"- {stage}: {count} {unit} in {seconds / 60:.1f} min ({count / seconds:.2f} {unit}/s)"
            )
    return out


def paper_table_section(r: Report) -> list[str]:
    lines = [
        "## The paper's Table 3 (ML-1M) beside ours",
        "",
        "The paper (arXiv 2504.10107, Table 3) reports AUC / UAUC on the ML-1M *test* split with "
        "Qwen2-7B and full training; ours are on a validation sample, with a 135M backbone and small "
        "CPU budgets. Compare orderings, not levels (different split, backbone, budget). Methods "
        "without a variant here are `-`.",
        "",
        "| method | paper AUC | paper UAUC | our AUC (valid) | our UAUC (valid) |",
        "|---|---|---|---|---|",
    ]
    for method, name, auc, uauc in PAPER_TABLE3_ML1M:
        v = r.results[name]["valid"] if name in r.results else {}
        lines.append(
            f"| {method} | {auc:.4f} | {uauc:.4f} | {_fmt(v['auc']) if v else '-'} | "
            f"{_fmt(v['uauc']) if v else '-'} |"
        )
    return lines


def bootstrap_section(r: Report) -> list[str]:
    lines = ["## SeLLa-Rec minus CoLLM (paired bootstrap)", ""]
    if not {"sellarec", "collm"} <= r.results.keys():
        return [*lines, "Not yet available: needs both the SeLLa-Rec and the CoLLM rows."]
    b = r.bootstrap("sellarec", "collm")
    lines += [
        f"Paired bootstrap over users ({b['users']} users, {b['rows']} rows, {b['resamples']} resamples): "
        "each resample draws users with replacement and keeps all their rows; both models are scored on "
        "the same drawn rows; 95% percentile intervals.",
        "",
        "| metric | SeLLa-Rec - CoLLM | 95% CI | share of resamples <= 0 |",
        "|---|---|---|---|",
    ]
    for k in ("auc", "uauc"):
        lines.append(
            f"| {k.upper()} | {b[k]['diff']:+.4f} | [{b[k]['low']:+.4f}, {b[k]['high']:+.4f}] | "
            f"{b[k]['p_le_0']:.3f} |"
        )
    return lines


def ordering_section(r: Report) -> list[str]:
    lines = ["## Does the paper's ordering hold here?", ""]
    order = [n for n in ("sellarec", "collm", "tallrec", "mf") if n in r.results]
    if len(order) < 2:
        return [*lines, "Not enough variants measured yet."]
    aucs = {n: r.results[n]["valid"]["auc"] for n in order}
    holds = all(aucs[a] > aucs[b] for a, b in zip(order, order[1:], strict=False))
    chain = " > ".join(f"{LABELS[n]} ({aucs[n]:.4f})" for n in sorted(order, key=lambda n: -aucs[n]))
    return lines + [
        f"Measured AUC order: {chain}.",
        f"The paper's order restricted to the variants measured ({' > '.join(LABELS[n] for n in order)}) "
        f"{'holds' if holds else 'does not hold'} here.",
    ]


def _seed_of(results: dict[str, dict]) -> int | None:
    return next((res.get("seed") for res in results.values()), None)


def _seed_runs(r: Report) -> list[tuple[Path, dict[str, dict]]]:
    """(directory, results) of the base run, then of each seed run that has any."""
    runs = [(r.runs, r.results)] + [(d, load_results(d)) for d in r.seeds]
    return [(d, res) for d, res in runs if res]


def seeds_section(r: Report) -> list[str]:
    lines = ["## Training noise (seeds)", ""]
    dirs = _seed_runs(r)
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
        auc, uauc = _mean_std([v["auc"] for _, v in found]), _mean_std([v["uauc"] for _, v in found])
        lines.append(f"| {LABELS[name]} | {cells} | {_pm(*auc)} | {_pm(*uauc)} | {len(found)} |")
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
            mean, std = _mean_std([d[k] for d in per_seed])
            low, high = boot[k]["low"], boot[k]["high"]
            lines.append(
                f"| {LABELS[a]} - {LABELS[b]} | {k.upper()} | {len(per_seed)} | "
                f"{_pm(mean, std, sign=True)} | "
                f"{2 * std:.4f} | [{low:+.4f}, {high:+.4f}] | "
                f"{'yes' if survives(mean, std, low, high) else 'no'} |"
            )
    return lines


def survives(mean: float, std: float, low: float, high: float) -> bool:
    """The seed-and-bootstrap rule of `seed_pairs_lines`."""
    beyond_seeds = bool(abs(mean) > 2 * std)  # False for NaN (one seed)
    beyond_rows = (low > 0 and mean > 0) or (high < 0 and mean < 0)
    return beyond_seeds and beyond_rows


@dataclass(frozen=True)
class LossCurve:
    """The per-step training loss of one cached stage."""

    #: "stage 1" or "stage 3".
    stage: str
    #: What trained: "stage 1" or the variant's label.
    label: str
    #: The stage's cache directory name.
    name: str
    #: Training rows.
    rows: int
    #: BCE of every optimiser step.
    losses: np.ndarray
    #: BCE of the constant label-mean prediction on the same rows.
    base_rate: float

    @property
    def title(self) -> str:
        return self.stage if self.stage == self.label else f"{self.stage}, {self.label}"


def _trained_stages(results: dict[str, dict]) -> list[tuple[str, str]]:
    """(stage, cache directory) of stage 1 and of every stage-3 bundle the results use, once each."""
    found: dict[str, str] = {}
    for res in results.values():
        for stage, entry in res.get("stages", {}).items():
            variant = stage.removeprefix("bundle-")
            if stage == "stage1" or (variant != stage and variant in VARIANTS and VARIANTS[variant].stage3):
                found.setdefault(entry["dir"], stage)
    return [(stage, directory) for directory, stage in found.items()]


def _loss_curve(runs: Path, stage: str, directory: str) -> LossCurve | None:
    """The curve a stage's done.json records (None before per-step losses were recorded)."""
    done = runs / "stages" / directory / "done.json"
    m = (json.loads(done.read_text()).get("metrics") or {}) if done.exists() else {}
    if not m.get("losses") or m.get("base_rate_bce") is None:
        return None
    variant = stage.removeprefix("bundle-")
    first = stage == "stage1"
    return LossCurve(
        stage="stage 1" if first else "stage 3",
        label="stage 1" if first else LABELS.get(variant, variant),
        name=directory,
        rows=int(m.get("rows", 0)),
        losses=np.asarray(m["losses"], dtype=float),
        base_rate=float(m["base_rate_bce"]),
    )


def loss_curves(r: Report) -> tuple[list[LossCurve], list[str]]:
    """Curves of stage 1 and every stage-3 bundle of the base run; and the stage directories
    that recorded no per-step losses (built before they were recorded)."""
    curves, missing = [], []
    for stage, directory in _trained_stages(r.results):
        curve = _loss_curve(r.runs, stage, directory)
        if curve is None:
            missing.append(directory)
        else:
            curves.append(curve)
    return curves, missing


def _moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` steps (shorter at the start)."""
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


def plot_losses(curves: list[LossCurve], path: Path) -> Path | None:
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, stage in zip(axes, ("stage 1", "stage 3"), strict=True):
        for k, c in enumerate(x for x in curves if x.stage == stage):
            colour = f"C{k}"
            steps = np.arange(1, len(c.losses) + 1)
            ax.plot(steps, c.losses, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(
                steps,
                _moving_average(c.losses, LOSS_WINDOW),
                color=colour,
                linewidth=1.6,
                label=f"{c.label} ({c.rows} rows)",
            )
            ax.axhline(c.base_rate, color=colour, linestyle="--", linewidth=1.0)
        ax.set_title(stage if stage == "stage 1" else f"{stage} (all variants)")
        ax.set_xlabel("optimiser step")
        if ax.has_data():
            ax.legend(fontsize=7)
    axes[0].set_ylabel("training BCE")
    fig.suptitle(f"BCE per step (faint), moving average of {LOSS_WINDOW} steps; dashed: base-rate BCE")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_section(r: Report) -> list[str]:
    lines = ["## Training loss", ""]
    curves, missing = loss_curves(r)
    fig = plot_losses(curves, r.figures / "training_loss_ml1m.png")
    if fig is not None:
        lines += [
            f"![training loss]({r.figure_link(fig)})",
            "",
            "BCE of each optimiser step (faint) and its moving average over "
            f"{LOSS_WINDOW} steps, against the base-rate BCE (dashed, same colour): the loss of "
            "predicting the label mean for every row, which a model that learned from the rows must "
            "fall below. Quarters are of the optimiser steps.",
            "",
            "| stage | rows | steps | first-quarter mean | last-quarter mean | base-rate BCE | "
            "last quarter - base |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in curves:
            q = max(1, len(c.losses) // 4)
            first, last = float(c.losses[:q].mean()), float(c.losses[-q:].mean())
            lines.append(
                f"| {c.title} (`{c.name}`) | {c.rows} | {len(c.losses)} | {first:.4f} | {last:.4f} | "
                f"{c.base_rate:.4f} | {last - c.base_rate:+.4f} |"
            )
    else:
        lines.append("No per-step losses recorded in this run's stage 1 or stage-3 caches.")
    if missing:
        lines += [
            "",
            "Built before per-step losses were recorded: " + ", ".join(f"`{m}`" for m in missing) + ".",
        ]
    return lines


def plot_fig7(sets: dict[str, np.ndarray], path: Path) -> Path | None:
    if not sets:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    low = min(float(v.min()) for v in sets.values())
    high = max(float(v.max()) for v in sets.values())
    bins = np.linspace(low - 0.02, high + 0.02, 81)
    for label, values in sets.items():
        ax.hist(
            values,
            bins=bins,
            density=True,
            histtype="step",
            linewidth=1.6,
            label=f"{label} (mean {values.mean():.3f})",
        )
    ax.set_xlabel("cosine similarity of Proj C->L(MF item embedding) and semantic item embedding")
    ax.set_ylabel("density")
    ax.set_title("ML-1M items with training rows (cf. paper Fig. 7)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _compared_items(r: Report) -> tuple[np.ndarray, str]:
    """The item ids Fig. 7 compares, and how the text names them: those with training rows,
    or every item of the distilled table when the train split is not on this machine."""

    train = r.cfg.get("data", {}).get("train")
    if train and Path(train).exists():
        return np.unique(pd.read_parquet(train, columns=["iid"])["iid"]), "the items with training rows"
    distill = latest_stage(r.runs, "distill-*")
    table = distill / "semantic.safetensors" if distill is not None else None
    if table is None or not table.exists():
        return np.array([], dtype=np.int64), "no items"
    with safe_open(str(table), framework="pt") as f:
        count = f.get_slice("semantic.items").get_shape()[0]
    return np.arange(count), "every item (the train split is not on this machine)"


def alignment_section(r: Report) -> list[str]:
    lines = ["## Alignment of collaborative and semantic item embeddings (cf. Fig. 7)", ""]
    with_bundles = {n: res for n, res in r.results.items() if _bundle_tensors(res) is not None}
    items, which = _compared_items(r) if r.cfg else (np.array([], dtype=np.int64), "no items")
    sets = cosine_sets(r.runs, with_bundles, items) if len(items) else {}
    fig = plot_fig7({k: v for k, v in sets.items() if v.size}, r.figures / "fig7_cosine_ml1m.png")
    if fig is None:
        return [*lines, "Not yet available (needs the distillation and stage-2 caches)."]
    lines += [
        f"![cosine similarity]({r.figure_link(fig)})",
        "",
        f"Cosine similarity between Proj C->L(e_i^C) and the distilled e_i^L over {which}:",
        "",
    ]
    return lines + [
        f"- {k}: mean {v.mean():.3f}, median {np.median(v):.3f}" for k, v in sets.items() if v.size
    ]


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
                + " | ".join(_fmt(v.get(k)) for k in ("auc", "uauc", "auc_warm", "auc_cold"))
                + f" | {b['diff']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}] | {scale} | "
                f"{_wall(res) / 60:.1f} min |"
            )
            commands.append(f"- {LABELS[name]}, `{r.paths.path(sweep)}`: `{r.paths.text(res['command'])}`")
    if not commands:
        return ["No sweep run shares a variant with the base run."]
    return [*lines, "", "Recorded invocations:", "", *commands]


def scale_section(r: Report) -> list[str]:
    return [
        "## Soft-token scale",
        "",
        *(scale_lines(r.runs, r.results, r.cfg) if r.cfg else ["Not yet available."]),
    ]


def _stage2_scale_rows(runs: Path, backbone: str | None) -> list[tuple[str, TokenScale]]:
    """Where stage 3 starts: stage 2's aligned projection, and MF through a random one
    (CoLLM's start; needs the backbone's hidden size, so only when the backbone is here)."""
    rows = []
    align = latest_stage(runs, "stage2-align-*")
    if align is not None and (align / "collab.safetensors").exists():
        scale = token_scale(load_file(align / "collab.safetensors"))
        rows.append(("stage 2, with alignment (the warm start of Proj C->L)", scale))
    mf = latest_stage(runs, "stage2-mf-*")
    if mf is not None and backbone and (mf / "collab.safetensors").exists():
        t = load_file(mf / "collab.safetensors")
        llm_dim = int(AutoConfig.from_pretrained(backbone).get_text_config().hidden_size)
        rand = random_projection(t["mf.items"].shape[1], llm_dim)
        scale = token_scale(t | {f"proj_c.{k}": v for k, v in rand.items()})
        rows.append(("stage 2, without alignment, random Proj C->L", scale))
    return rows


def scale_lines(runs: Path, results: dict[str, dict], cfg: dict) -> list[str]:
    """Median norms of the spliced soft tokens per model, beside the vocabulary's (diagnostics).

    The backbone is read only when it is on this machine already; otherwise its scale is
    "unknown" and the random-projection row is left out.
    """
    backbone = _local_backbone(cfg["backbone"])
    vocab = vocabulary_scale(backbone) if backbone else None
    rows = _stage2_scale_rows(runs, backbone)
    for name, res in results.items():
        tensors = _bundle_tensors(res)
        if VARIANTS[name].stage3 and tensors is not None:
            rows.append((f"after stage 3, {LABELS[name]}", token_scale(load_file(tensors))))
    if not rows:
        return ["Not yet available (needs the stage-2 or stage-3 caches)."]
    out = [
        "Median L2 norm of each vector spliced into the prompt in place of a placeholder's input "
        f"embedding, over every user or item of the tables. The backbone's own token embeddings have a "
        f"median norm of {'unknown' if vocab is None else f'{vocab:.2f}'}.",
        "",
        "| model | `<User_ID>` | `<Item_ID>` | `<Warm_ID>` |",
        "|---|---|---|---|",
    ]
    for label, t in rows:
        cells = [("-" if v is None else f"{v:.2f}") for v in (t.user, t.item, t.warm)]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def missing_section(r: Report) -> list[str]:
    missing = [n for n in VARIANTS if n not in r.results]
    if not missing:
        return []
    return [
        "## Not yet run",
        "",
        "These rows had not finished when this document was generated. The background job keeps "
        "going; to resume (cached stages are skipped) and refresh this document:",
        "",
        "```",
        *[r.resume(n) for n in missing],
        f"sellarec-train report --runs {r.paths.path(r.runs)}",
        "```",
    ]


def _blend(r: Report, name: str) -> dict | None:
    """A pseudo-result whose scores are `name`'s LLM logit plus MF's logit, row by row."""
    if name not in r.results or "mf" not in r.results:
        return None
    llm, mf = load_file(r.results[name]["valid"]["scores"]), load_file(r.results["mf"]["valid"]["scores"])
    if not (torch.equal(llm["uid"], mf["uid"]) and torch.equal(llm["iid"], mf["iid"])):
        return None
    path = r.runs / "extensions" / f"{name}+mf.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(llm | {"scores": llm["scores"] + mf["scores"]}, str(path))
    return {"valid": {"scores": str(path)}}


def extension_section(r: Report) -> list[str]:
    """LLM logit + MF logit: the residual-on-MF extension, computed from the saved scores."""
    rows = [(n, _blend(r, n)) for n in ("collm", "sellarec")]
    rows = [(n, b) for n, b in rows if b is not None]
    if not rows:
        return []
    from sellarec.training.evaluate import metrics

    out = [
        "## Extension, not a paper variant: LLM logit + MF logit",
        "",
        "The score is the variant's P(Yes) logit plus the MF dot product of the same row (both are "
        "BCE-trained logits of the same label; nothing is fitted, so nothing is tuned on validation). "
        "It reads the LLM as a residual on the MF it is fed. Computed from the saved scores of the "
        "rows above; the service does not serve it.",
        "",
        "| model | AUC | UAUC | AUC warm | AUC cold | minus MF: AUC [95% CI] | minus MF: UAUC [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, blend in rows:
        t = load_file(blend["valid"]["scores"])
        frame = pd.DataFrame({k: t[k].numpy() for k in ("uid", "label", "not_cold")})
        m = metrics(frame, t["scores"].numpy())
        b = paired_bootstrap(blend, r.results["mf"], r.resamples)
        ci = {k: f"{b[k]['diff']:+.4f} [{b[k]['low']:+.4f}, {b[k]['high']:+.4f}]" for k in ("auc", "uauc")}
        out.append(
            f"| {LABELS[name]} + MF | "
            + " | ".join(_fmt(m.get(k)) for k in ("auc", "uauc", "auc_warm", "auc_cold"))
            + f" | {ci['auc']} | {ci['uauc']} |"
        )
    return out


SECTIONS = (
    header_section,
    setup_section,
    validation_section,
    paper_table_section,
    bootstrap_section,
    extension_section,
    seeds_section,
    ordering_section,
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
