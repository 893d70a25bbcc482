"""The validation results: the table with its commands, timings and throughput, the
paper's Table 3 beside it, SeLLa-Rec minus CoLLM, the measured ordering, the LLM + MF
extension, and the variants not yet run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from sellarec.training.config import VARIANTS
from sellarec.training.report.context import LABELS, METRICS, Report, fmt, wall_seconds
from sellarec.training.report.seeds import seed_means
from sellarec.training.report.stats import paired_bootstrap

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


#: The paper's variants: the validation table's rows (an extension has its own section).
PAPER_VARIANTS = tuple(n for n, v in VARIANTS.items() if not v.mf_residual)


def validation_section(r: Report) -> list[str]:
    lines = [
        "## Validation table",
        "",
        "| variant | AUC | UAUC | AUC warm | AUC cold | UAUC warm | UAUC cold | n | stage-1 rows | "
        "stage-3 rows | seed | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in PAPER_VARIANTS:
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
            + " | ".join(fmt(v.get(k)) for k in METRICS)
            + f" | {v['n']} | {s1} | {s3} | {res['seed']} | {wall_seconds(res) / 60:.1f} min |"
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
            f"| {method} | {auc:.4f} | {uauc:.4f} | {fmt(v['auc']) if v else '-'} | "
            f"{fmt(v['uauc']) if v else '-'} |"
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


#: The issue's bar: this chain strictly, on each metric's mean over seeds...
BAR_CHAIN: tuple[str, ...] = ("sellarec", "collm", "tallrec", "zeroshot")
#: ...and SeLLa-Rec at least MF; the moonshot is SeLLa-Rec ahead of MF by this much AUC.
MOONSHOT_AUC = 0.01


def ordering_section(r: Report) -> list[str]:
    lines = ["## Does the paper's ordering hold here?", ""]
    order = [n for n in ("sellarec", "collm", "tallrec", "mf") if n in r.results]
    if len(order) < 2:
        return [*lines, "Not enough variants measured yet."]
    aucs = {n: r.results[n]["valid"]["auc"] for n in order}
    holds = all(aucs[a] > aucs[b] for a, b in zip(order, order[1:], strict=False))
    chain = " > ".join(f"{LABELS[n]} ({aucs[n]:.4f})" for n in sorted(order, key=lambda n: -aucs[n]))
    return lines + [
        f"Measured AUC order (base run): {chain}.",
        f"The paper's order restricted to the variants measured ({' > '.join(LABELS[n] for n in order)}) "
        f"{'holds' if holds else 'does not hold'} here.",
        "",
        *bar_lines(r),
    ]


def bar_lines(r: Report) -> list[str]:
    """The bar on means over seeds: the chain of `BAR_CHAIN` and SeLLa-Rec >= MF, per metric."""
    means = seed_means(r)
    chain = [n for n in BAR_CHAIN if n in means]
    shown = [n for n in (*BAR_CHAIN, "mf") if n in means]
    chain_label = " > ".join(LABELS[n] for n in chain)
    lines = [
        f"The bar, on each variant's mean over the seeds it was run at (seed count in brackets; base "
        f"run and `--seeds` runs): {chain_label}, and {LABELS['sellarec']} >= {LABELS['mf']}, on AUC "
        "and on UAUC. Variants not measured are left out of the chain.",
        "",
        "| metric | "
        + " | ".join(LABELS[n] for n in shown)
        + f" | {chain_label} | {LABELS['sellarec']} >= {LABELS['mf']} |",
        "|---|" + "---|" * (len(shown) + 2),
    ]
    gap = (
        {k: means["sellarec"][k][0] - means["mf"][k][0] for k in ("auc", "uauc")}
        if "sellarec" in means and "mf" in means
        else {}
    )
    for k in ("auc", "uauc"):
        cells = [f"{means[n][k][0]:.4f} ({means[n][k][1]})" for n in shown]
        breaks = [
            f"{LABELS[a]} <= {LABELS[b]}"
            for a, b in zip(chain, chain[1:], strict=False)
            if not means[a][k][0] > means[b][k][0]
        ]
        held = "fails: " + ", ".join(breaks) if breaks else ("holds" if len(chain) >= 2 else "-")
        vs_mf = f"{'holds' if gap[k] >= 0 else 'fails'} ({gap[k]:+.4f})" if gap else "-"
        lines.append(f"| {k.upper()} | " + " | ".join(cells) + f" | {held} | {vs_mf} |")
    if gap:
        lines += [
            "",
            f"Moonshot ({LABELS['sellarec']} ahead of {LABELS['mf']} by {MOONSHOT_AUC} AUC or more on the "
            f"mean): {'reached' if gap['auc'] >= MOONSHOT_AUC else 'not reached'} ({gap['auc']:+.4f}).",
        ]
    return lines


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
    """LLM logit + MF logit: the residual-on-MF extension, computed from the saved scores of
    the paper variants (nothing trained for it), and trained as one (`sellarec-mf`)."""
    rows = [(f"{LABELS[n]} + MF, summed after training", _blend(r, n)) for n in ("collm", "sellarec")]
    trained = [n for n, v in VARIANTS.items() if v.mf_residual and n in r.results]
    rows = [(label, b) for label, b in rows if b is not None] + [(LABELS[n], r.results[n]) for n in trained]
    if not rows or "mf" not in r.results:
        return []
    from sellarec.training.evaluate import metrics

    out = [
        "## Extension, not a paper variant: LLM logit + MF logit",
        "",
        "The score is the variant's P(Yes) logit plus the MF dot product of the same row (both are "
        "BCE-trained logits of the same label; nothing is fitted, so nothing is tuned on validation). "
        "It reads the LLM as a residual on the MF it is fed. Summed after training: computed from the "
        "saved scores of the rows above, not served. Trained as a residual (`sellarec-mf`): SeLLa-Rec "
        "whose stage 3 already adds the MF dot product to the logit in its loss, a bundle the service "
        "serves.",
        "",
        "| model | AUC | UAUC | AUC warm | AUC cold | minus MF: AUC [95% CI] | minus MF: UAUC [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, blend in rows:
        t = load_file(blend["valid"]["scores"])
        frame = pd.DataFrame({k: t[k].numpy() for k in ("uid", "label", "not_cold")})
        m = metrics(frame, t["scores"].numpy())
        b = paired_bootstrap(blend, r.results["mf"], r.resamples)
        ci = {k: f"{b[k]['diff']:+.4f} [{b[k]['low']:+.4f}, {b[k]['high']:+.4f}]" for k in ("auc", "uauc")}
        out.append(
            f"| {label} | "
            + " | ".join(fmt(m.get(k)) for k in ("auc", "uauc", "auc_warm", "auc_cold"))
            + f" | {ci['auc']} | {ci['uauc']} |"
        )
    return out


def missing_section(r: Report) -> list[str]:
    missing = [n for n in PAPER_VARIANTS if n not in r.results]  # an extension is run by choice
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
