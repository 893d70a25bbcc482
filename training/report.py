"""docs/results.md from a run directory: the validation table, the paired bootstrap of
SeLLa-Rec minus CoLLM (resampling users), and the Fig. 7 plot of cos(Proj C->L(e_i^C), e_i^L).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score
from transformers import AutoConfig

from model.backbone import resolve
from training.config import VARIANTS
from training.diagnostics import cosine_sets, latest_stage, random_projection, token_scale, vocabulary_scale

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


def paired_bootstrap(a: dict, b: dict, resamples: int, seed: int = 0) -> dict:
    """Differences a - b of AUC and UAUC with 95% percentile intervals, resampling users
    (all rows of a drawn user go in together), on the shared validation sample.

    UAUC of a resample is the mean per-user AUC over the drawn users (with multiplicity)
    that hold both classes, so per-user AUCs are computed once.
    """
    sa, sb = load_file(a["valid"]["scores"]), load_file(b["valid"]["scores"])
    if not (torch.equal(sa["uid"], sb["uid"]) and torch.equal(sa["iid"], sb["iid"])):
        raise ValueError("the variants were evaluated on different rows; pairing needs the same rows")
    uid, label = sa["uid"].numpy(), sa["label"].numpy()
    score_a, score_b = sa["scores"].numpy(), sb["scores"].numpy()
    users, inverse = np.unique(uid, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == k) for k in range(len(users))]
    per_user = np.full(len(users), np.nan)
    for k, rows in enumerate(rows_of):
        if len(np.unique(label[rows])) == 2:
            per_user[k] = roc_auc_score(label[rows], score_a[rows]) - roc_auc_score(
                label[rows], score_b[rows]
            )
    point = {
        "auc": roc_auc_score(label, score_a) - roc_auc_score(label, score_b),
        "uauc": float(np.nanmean(per_user)),
    }
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {"auc": [], "uauc": []}
    for _ in range(resamples):
        drawn = rng.integers(0, len(users), len(users))
        rows = np.concatenate([rows_of[k] for k in drawn])
        diffs["auc"].append(
            roc_auc_score(label[rows], score_a[rows]) - roc_auc_score(label[rows], score_b[rows])
        )
        both = per_user[drawn][~np.isnan(per_user[drawn])]
        diffs["uauc"].append(float(both.mean()) if len(both) else float("nan"))
    out: dict = {}
    for k, v in diffs.items():
        arr = np.asarray(v)
        out[k] = {
            "diff": float(point[k]),
            "low": float(np.percentile(arr, 2.5)),
            "high": float(np.percentile(arr, 97.5)),
            "p_le_0": float(np.mean(arr <= 0)),
        }
    return out | {"users": int(len(users)), "rows": int(len(uid)), "resamples": resamples}


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def setting_of(result: dict, base: dict) -> str:
    """The config values in which `result` differs from `base` ("key=value, ...")."""
    a, b = _flat(result["config"]), _flat(base["config"])
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return ", ".join(f"{k}={a.get(k, '-')}" for k in changed) or "(same config)"


def _item_scale(run: Path, result: dict, stage: str) -> float | None:
    entry = result.get("stages", {}).get(stage)
    if entry is None:
        return None
    path = run / "stages" / entry["dir"]
    name = "collab.safetensors" if stage.startswith("stage2") else "bundle/tensors.safetensors"
    return token_scale(load_file(path / name)).item


def sweep_lines(results: dict[str, dict], sweeps: list[Path], resamples: int) -> list[str]:
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
    for sweep in sweeps:
        for name, r in load_results(sweep).items():
            base = results.get(name)
            if base is None:
                continue
            v = r["valid"]
            b = paired_bootstrap(r, base, resamples)["auc"]
            start = _item_scale(sweep, r, "stage2-align") if VARIANTS[name].warm_start else None
            end = _item_scale(sweep, r, f"bundle-{name}")
            scale = f"{'-' if start is None else f'{start:.2f}'} -> {'-' if end is None else f'{end:.2f}'}"
            lines.append(
                f"| {LABELS[name]} | `{setting_of(r, base)}` | "
                + " | ".join(_fmt(v.get(k)) for k in ("auc", "uauc", "auc_warm", "auc_cold"))
                + f" | {b['diff']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}] | {scale} | "
                f"{_wall(r) / 60:.1f} min |"
            )
            commands.append(f"- {LABELS[name]}, `{sweep}`: `{r['command']}`")
    if not commands:
        return ["No sweep run given (`sellarec-train report --sweep DIR`)."]
    return [*lines, "", "Recorded invocations:", "", *commands]


def scale_lines(runs: Path, results: dict[str, dict], cfg: dict) -> list[str]:
    """Median norms of the spliced soft tokens per model, beside the vocabulary's (diagnostics)."""
    vocab = vocabulary_scale(resolve(cfg["backbone"]))
    rows: list[tuple[str, object]] = []
    for label, pattern in (("stage 2, with alignment (the warm start of Proj C->L)", "stage2-align-*"),):
        path = latest_stage(runs, pattern)
        if path is not None:
            rows.append((label, token_scale(load_file(path / "collab.safetensors"))))
    mf = latest_stage(runs, "stage2-mf-*")
    if mf is not None:  # CoLLM's starting point: stage-2 MF through a freshly initialised Proj C->L
        t = load_file(mf / "collab.safetensors")
        llm_dim = int(AutoConfig.from_pretrained(resolve(cfg["backbone"])).get_text_config().hidden_size)
        rand = random_projection(t["mf.items"].shape[1], llm_dim)
        rows.append(
            (
                "stage 2, without alignment, random Proj C->L",
                token_scale(t | {f"proj_c.{k}": v for k, v in rand.items()}),
            )
        )
    for name, r in results.items():
        if VARIANTS[name].stage3:
            rows.append(
                (
                    f"after stage 3, {LABELS[name]}",
                    token_scale(load_file(Path(r["bundle"]) / "tensors.safetensors")),
                )
            )
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


def _resume(name: str, runs: Path, config: str) -> str:
    return f"sellarec-train run {name} --config {config} --out {runs}"


def _wall(result: dict) -> float:
    return float(result.get("wall_seconds") or 0.0)


def write_report(
    runs: Path,
    doc: Path,
    figures: Path,
    resamples: int = 2000,
    config: str = "training/configs/ml1m.yaml",
    sweeps: list[Path] | None = None,
) -> Path:
    """Write `doc` (and the Fig. 7 PNG under `figures`) from the run directory `runs`."""
    import pandas as pd

    results = load_results(runs)
    any_result = next(iter(results.values()), None)
    cfg = any_result["config"] if any_result else {}
    trained = (
        np.unique(pd.read_parquet(cfg["data"]["train"], columns=["iid"])["iid"]) if cfg else np.array([])
    )
    workers = sorted({r["command"] for r in results.values() if r.get("command")})
    lines = ["# SeLLa-Rec variants on MovieLens-1M: validation results", ""]
    lines += [
        f"Generated by `sellarec-train report --runs {runs}"
        + "".join(f" --sweep {s}" for s in sweeps or [])
        + f"` on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from the run directories "
        "(stage caches, bundles and scores stay there; nothing derived from ML-1M is committed).",
        "",
    ]
    if cfg:
        lines += [
            "## Setup",
            "",
            f"- Backbone: `{cfg['backbone']}` (SmolLM2-135M-Instruct, fp32, CPU), not the paper's Qwen2-7B.",
            f"- Data: the CoLLM split of ML-1M (`{cfg['data']['train']}`, `{cfg['data']['valid']}`); "
            "model selection (stage-2 early stopping) on validation only; the test split was not used.",
            f"- Evaluation: one seeded sample of {cfg['eval']['limit']} validation rows "
            f"(seed {cfg['eval']['seed']}), "
            "the same rows for every variant (checked when pairing).",
            f"- Budgets: stage 1 trains on {cfg['stage1']['budget']} seeded train rows (1 epoch, batch "
            f"{cfg['stage1']['batch_size']}, lr {cfg['stage1']['lr']}); stage 3 on "
            f"{cfg['stage3']['budget']} rows per variant (batch {cfg['stage3']['batch_size']}, "
            f"lr {cfg['stage3']['lr']}); stage 2 is full "
            f"(d_C {cfg['stage2']['collab_dim']}, lambda {cfg['stage2']['align_weight']}, tau "
            f"{cfg['stage2']['temperature']}, patience {cfg['stage2']['patience']}); "
            "distillation covers every item.",
            f"- Seed {cfg['seed']}; configuration `{config}` "
            "(every value is also in each bundle's manifest).",
            f"- Machine: {machine_line(results)}; {cfg['threads']} torch thread(s) per worker; "
            f"{len(workers)} worker(s) in parallel over the shared stage caches: "
            + ", ".join(f"`{w}`" for w in workers)
            + ". Stages a worker finds cached are reused; the recorded invocation of each row says "
            "which worker built it.",
            "",
        ]
    lines += [
        "## Validation table",
        "",
        "| variant | AUC | UAUC | AUC warm | AUC cold | UAUC warm | UAUC cold | n | stage-1 rows | "
        "stage-3 rows | seed | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    missing = []
    for name in VARIANTS:
        r = results.get(name)
        if r is None:
            missing.append(name)
            busy = any((runs / "stages").glob(f".*-{name}-*"))
            state = "running (background)" if busy else "not yet run"
            lines.append(f"| {LABELS[name]} | {state} | | | | | | | | | | |")
            continue
        v = r["valid"]
        uses_s1 = name not in {"mf", "zeroshot"}
        uses_s3 = VARIANTS[name].stage3
        lines.append(
            f"| {LABELS[name]} | " + " | ".join(_fmt(v.get(k)) for k in METRICS) + f" | {v['n']} | "
            f"{r['budgets']['stage1'] if uses_s1 else '-'} | {r['budgets']['stage3'] if uses_s3 else '-'} | "
            f"{r['seed']} | {_wall(r) / 60:.1f} min |"
        )
    lines += [
        "",
        "Wall time = build time of every cached stage the variant uses (shared stages such as stage 1 "
        "are counted in full in each row that uses them) plus its evaluation.",
        "",
        "Commands (each row; stages already in the run directory are reused, not retrained):",
        "",
    ]
    for name, r in results.items():
        lines.append(
            f"- {LABELS[name]}: `{_resume(name, runs, config)}` (recorded invocation: `{r['command']}`)"
        )
    lines += ["", "Stage timings (build wall time):", ""]
    seen = set()
    for r in results.values():
        for s in r.get("stages", {}).values():
            if s["dir"] not in seen and s.get("build_seconds") is not None:
                seen.add(s["dir"])
                lines.append(f"- `{s['dir']}`: {s['build_seconds'] / 60:.1f} min")
    lines += ["", "Throughput measured in these runs (each worker single-threaded, beside the others):", ""]
    lines += throughput_lines(runs)
    lines += [
        "",
        "## The paper's Table 3 (ML-1M), for context",
        "",
        "The paper (arXiv 2504.10107, Table 3) reports AUC/UAUC on the ML-1M *test* split with Qwen2-7B and "
        "full training. I do not have its exact figures at hand in this workplace (no network access), so "
        "they are not copied here rather than risk inventing them; the claim this document checks is the "
        "ordering the paper reports: SeLLa-Rec > BinLLM > CoLLM > TALLRec > MF. BinLLM is not implemented "
        "here. Our numbers are on validation, with a 135M backbone and small CPU budgets, so only orderings "
        "are comparable, not levels.",
        "",
    ]
    lines += ["## SeLLa-Rec minus CoLLM (paired bootstrap)", ""]
    if "sellarec" in results and "collm" in results:
        b = paired_bootstrap(results["sellarec"], results["collm"], resamples)
        lines += [
            f"Paired bootstrap over users ({b['users']} users, {b['rows']} rows, "
            f"{b['resamples']} resamples): "
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
    else:
        lines.append("Not yet available: needs both the SeLLa-Rec and the CoLLM rows.")
    lines += ["", "## Does the paper's ordering hold here?", ""]
    order = [n for n in ("sellarec", "collm", "tallrec", "mf") if n in results]
    aucs = {n: results[n]["valid"]["auc"] for n in order}
    if len(order) >= 2:
        holds = all(aucs[a] > aucs[b] for a, b in zip(order, order[1:], strict=False))
        chain = " > ".join(f"{LABELS[n]} ({aucs[n]:.4f})" for n in sorted(order, key=lambda n: -aucs[n]))
        lines += [
            f"Measured AUC order: {chain}.",
            f"The paper's order restricted to the variants measured ({' > '.join(LABELS[n] for n in order)}) "
            f"{'holds' if holds else 'does not hold'} here.",
        ]
    else:
        lines.append("Not enough variants measured yet.")
    lines += ["", "## Alignment of collaborative and semantic item embeddings (cf. Fig. 7)", ""]
    sets = cosine_sets(runs, results, trained) if cfg else {}
    fig = plot_fig7(sets, figures / "fig7_cosine_ml1m.png")
    if fig is not None:
        rel = Path("figures") / fig.name
        lines += [
            f"![cosine similarity]({rel})",
            "",
            "Cosine similarity between Proj C->L(e_i^C) and the distilled e_i^L over the items with "
            "training rows:",
            "",
        ]
        for label, values in sets.items():
            lines.append(f"- {label}: mean {values.mean():.3f}, median {np.median(values):.3f}")
    else:
        lines.append("Not yet available (needs the distillation and stage-2 caches).")
    if sweeps:
        lines += ["", "## Tuning on validation", ""]
        lines += sweep_lines(results, sweeps, resamples)
    lines += ["", "## Soft-token scale", ""]
    lines += scale_lines(runs, results, cfg) if cfg else ["Not yet available."]
    if missing:
        lines += [
            "",
            "## Not yet run",
            "",
            "These rows had not finished when this document was generated. The background job keeps "
            "going; to resume (cached stages are skipped) and refresh this document:",
            "",
            "```",
        ]
        lines += [_resume(n, runs, config) for n in missing]
        lines += [f"sellarec-train report --runs {runs}", "```"]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n")
    return doc
