"""`sellarec-train`: run a variant, evaluate a bundle on a split, build the results report."""

from __future__ import annotations

import json
import logging
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from sellarec.training.config import VARIANTS, load_config, parse_sets

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and evaluate SeLLa-Rec variants.")


def setup_logging(log_file: Path | None) -> None:
    """Log to stderr and, when given, to `log_file` (appended)."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", handlers=handlers, force=True
    )


@app.command()
def run(
    variants: Annotated[list[str], typer.Argument(help=f"Variants, in order: {', '.join(VARIANTS)}")],
    config: Annotated[Path, typer.Option(help="YAML configuration")] = Path("training/configs/ml1m.yaml"),
    out: Annotated[Path, typer.Option(help="Output directory (stage caches, bundles, results)")] = Path(
        "runs/ml1m"
    ),
    stage1_budget: Annotated[int | None, typer.Option(help="Stage-1 training rows")] = None,
    stage3_budget: Annotated[int | None, typer.Option(help="Stage-3 training rows per variant")] = None,
    stage3_lr: Annotated[float | None, typer.Option(help="Stage-3 learning rate")] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Validation rows evaluated (seeded sample)")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of sampling and initialisation")] = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone spec")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
    progress: Annotated[bool, typer.Option(help="tqdm progress bars")] = True,
    evaluate: Annotated[bool, typer.Option(help="Evaluate on the validation sample")] = True,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any config value: KEY=VALUE, dotted key, YAML value (repeatable)"),
    ] = None,
) -> None:
    """Train (or reuse cached stages of) each variant, evaluate it on validation, write results."""
    from sellarec.training.pipeline import run_variant

    overrides = {
        k: v
        for k, v in {
            "stage1.budget": stage1_budget,
            "stage3.budget": stage3_budget,
            "stage3.lr": stage3_lr,
            "eval.limit": eval_limit,
            "seed": seed,
            "backbone": backbone,
            "threads": threads,
        }.items()
        if v is not None
    }
    try:
        cfg = load_config(config, {**overrides, **parse_sets(set_)})
    except (ValueError, TypeError) as e:
        raise typer.BadParameter(str(e), param_hint="--config/--set") from e
    # `kill` ends a run like Ctrl-C: half-built stage directories are removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    setup_logging(out / "train.log")
    command = shlex.join(["sellarec-train", *sys.argv[1:]])
    for name in variants:
        try:
            result = run_variant(cfg, name, out, progress=progress, command=command, evaluate=evaluate)
        except FileNotFoundError as e:  # a missing split or stage input: one line that says what to set
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        metrics = result.get("valid", {})
        typer.echo(json.dumps({"variant": name, **{k: metrics.get(k) for k in ("auc", "uauc")}}))


@app.command()
def evaluate(
    artifacts: Annotated[Path, typer.Option(help="Bundle directory")],
    data: Annotated[Path, typer.Option(help="Split in the CoLLM format (parquet)")],
    out: Annotated[Path, typer.Option(help="Metrics JSON to write")],
    limit: Annotated[int, typer.Option(help="Seeded sample of this many rows (0: all)")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the sample")] = 0,
    batch_size: Annotated[int, typer.Option(help="Rows per forward")] = 16,
    progress: Annotated[bool, typer.Option(help="tqdm progress bar")] = True,
) -> None:
    """Score a split with a bundle of any variant; write n, auc, uauc and their warm/cold parts.

    A bundle that is missing, tampered with or does not fit its backbone exits 1 with one line."""
    from sellarec.model.artifacts import ArtifactError, verify_bundle
    from sellarec.training.data import load_split, sample
    from sellarec.training.evaluate import evaluate_bundle

    setup_logging(None)
    try:
        verify_bundle(artifacts)  # every file checked before the split or the model is loaded
        frame = sample(load_split(data), limit, seed)
        result, _ = evaluate_bundle(artifacts, frame, batch_size, progress)
    except ArtifactError as err:
        typer.secho(f"sellarec-train evaluate: refusing the bundle: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from err
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    typer.echo(json.dumps(result))


@app.command()
def report(
    runs: Annotated[Path, typer.Option(help="Run directory of `sellarec-train run`")] = Path("runs/ml1m"),
    doc: Annotated[Path, typer.Option(help="Markdown to write")] = Path("docs/results.md"),
    figures: Annotated[Path, typer.Option(help="Figure directory")] = Path("docs/figures"),
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples")] = 2000,
    sweep: Annotated[
        list[Path] | None, typer.Option(help="Run directory of scripts/train/sweep.sh (repeatable)")
    ] = None,
    seeds: Annotated[
        list[Path] | None,
        typer.Option(help="Run directory of the same config with another --seed (repeatable)"),
    ] = None,
    config: Annotated[
        str, typer.Option(help="Configuration file named in the resume commands")
    ] = "training/configs/ml1m.yaml",
) -> None:
    """Build the results table (beside the paper's Table 3), the paired bootstrap, the training
    noise over seeds, the loss curves and the Fig. 7 plot from a run directory."""
    from sellarec.training.report import write_report

    typer.echo(write_report(runs, doc, figures, resamples, config, sweeps=sweep or [], seeds=seeds or []))


@app.command(name="build-data")
def build_data(
    source: Annotated[str, typer.Argument(help="ml1m or amazon-book")],
    out: Annotated[Path, typer.Option(help="Directory for {train,valid,test,items}.parquet")],
    raw: Annotated[Path | None, typer.Option(help="ML-1M: directory with ratings.dat and movies.dat")] = None,
    reviews: Annotated[Path | None, typer.Option(help="Amazon: Books_5.json.gz")] = None,
    metadata: Annotated[Path | None, typer.Option(help="Amazon: meta_Books.json.gz")] = None,
) -> None:
    """Build CoLLM-format splits from the raw MovieLens-1M or Amazon-Book 2018 files."""
    from sellarec.training.raw import build_amazon_book, build_ml1m

    if source == "ml1m" and raw is not None:
        built = build_ml1m(raw)
    elif source == "amazon-book" and reviews is not None and metadata is not None:
        built = build_amazon_book(reviews, metadata)
    else:
        raise typer.BadParameter("ml1m needs --raw; amazon-book needs --reviews and --metadata")
    built.write(out)
    typer.echo(json.dumps({k: len(v) for k, v in built.splits.items()}))
