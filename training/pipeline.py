"""The stages wired together, each cached under OUT/stages/<stage>-<key> and skipped when
present (the key hashes every setting the stage depends on, upstream stages included).

`run_variant(config, "sellarec", out)` trains what the variant needs, writes its bundle to
OUT/stages/bundle-<name>-<key>/bundle, evaluates it on the seeded validation sample and
writes OUT/results/<name>.json. A demo can call it on a synthetic `Dataset`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from sellarec.model.bundle import SEMANTIC_ITEMS
from sellarec.model.prompts import Slot, TemplateSpec
from sellarec.training import assembly
from sellarec.training.config import VARIANTS, RunConfig, Variant, fingerprint
from sellarec.training.data import Dataset, sample
from sellarec.training.distributed import barrier, world
from sellarec.training.stage1 import distill_items, train_stage1
from sellarec.training.stage2 import train_stage2

log = logging.getLogger("sellarec.train")
DONE = "done.json"
#: Builds a stage into a staging directory and returns the metrics it records.
Build = Callable[[Path], dict]


def cached(out: Path, name: str, key: str, build: Build) -> tuple[Path, dict]:
    """Run `build(staging_dir)` unless OUT/stages/name-key/done.json exists; atomic rename."""
    final = out / "stages" / f"{name}-{key}"
    w = world()
    if (final / DONE).exists():
        record = json.loads((final / DONE).read_text())
        log.info("%s: cached at %s (skipped)", name, final)
        return final, record
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        start = time.perf_counter()
        metrics = build(staging)
        record = {"stage": name, "key": key, "metrics": metrics, "build_seconds": time.perf_counter() - start}
        (staging / DONE).write_text(json.dumps(record, indent=2))
        if w.main:  # under torchrun every process builds; the first one keeps the result
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        else:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier(w)
    return final, record


def templates(cfg: RunConfig, variant: Variant) -> tuple[TemplateSpec, TemplateSpec]:
    """(stage-1 spec, stage-3 spec with the variant's slots)."""
    common = {
        "domain": cfg.data.domain,
        "answer_cue": cfg.prompt.answer_cue,
        "history_length": cfg.prompt.history_length,
    }
    return TemplateSpec(stage="stage1", **common), TemplateSpec(stage="stage3", slots=variant.slots, **common)


class Pipeline:
    """The stage graph of one configuration over one dataset: each stage's cache key and the
    stages it needs; what a variant's bundle is made of lives in `assembly`."""

    def __init__(self, cfg: RunConfig, out: Path, data: Dataset | None = None, progress: bool = True) -> None:
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.data = data or Dataset.load(cfg.data.train, cfg.data.valid, name=cfg.data.name)
        self.data_key = fingerprint(
            cfg.data, len(self.data.train), len(self.data.valid), cfg.prompt, cfg.backbone
        )
        #: stage name -> {"dir": cache dir name, "build_seconds": wall time when it was built}.
        self.used: dict[str, dict] = {}

    def _timed(self, name: str, key: str, build: Build) -> tuple[Path, dict]:
        path, record = cached(self.out, name, key, build)
        self.used[name] = {"dir": path.name, "build_seconds": record.get("build_seconds")}
        return path, record

    def stage1(self) -> tuple[Path, str]:
        c = self.cfg
        key = fingerprint(self.data_key, c.stage1, c.seed)
        spec1, _ = templates(c, VARIANTS["tallrec"])
        rows = sample(self.data.train, c.stage1.budget, c.seed)
        path, _ = self._timed(
            "stage1", key, lambda d: train_stage1(c.backbone, spec1, rows, c.stage1, c.seed, d, self.progress)
        )
        return path / "adapter", key

    def distill(self) -> tuple[torch.Tensor, str]:
        adapter, k1 = self.stage1()
        key = fingerprint(k1, self.cfg.distill)
        spec1, _ = templates(self.cfg, VARIANTS["tallrec"])
        path, _ = self._timed(
            "distill",
            key,
            lambda d: distill_items(
                self.cfg.backbone,
                adapter,
                spec1,
                self.data.items.titles,
                self.cfg.distill.batch_size,
                d,
                self.progress,
            ),
        )
        return load_file(path / "semantic.safetensors")[SEMANTIC_ITEMS], key

    def stage2(self, align: bool, holdout: bool = False) -> tuple[dict[str, torch.Tensor], str]:
        """MF (+ alignment); `holdout`: fit without the stage-3 rows (`assembly.held_out`)."""
        c = self.cfg
        semantic, kd = self.distill() if align else (None, "none")
        data, extra = (self.data, ())
        if holdout:
            data, extra = assembly.held_out(c, self.data), ("holdout", c.stage3.budget)
        key = fingerprint(self.data_key, kd, c.stage2, c.seed, align, *extra)
        llm_dim = int(semantic.shape[1]) if semantic is not None else None
        path, _ = self._timed(
            ("stage2-align" if align else "stage2-mf") + ("-holdout" if holdout else ""),
            key,
            lambda d: train_stage2(data, c.stage2, semantic, llm_dim, align, c.seed, d, self.progress),
        )
        return load_file(path / "collab.safetensors"), key

    def bundle(self, variant: Variant) -> Path:
        """Train what `variant` needs and write its bundle (cached like a stage)."""
        if not variant.llm:
            key, build = self._mf_bundle(variant)
        elif not variant.stage3:
            key, build = self._text_bundle(variant)
        else:
            key, build = self._stage3_bundle(variant)
        path, _ = self._timed(f"bundle-{variant.name}", key, build)
        return path / "bundle"

    def _mf_bundle(self, variant: Variant) -> tuple[str, Build]:
        collab, key = self.stage2(align=False)
        return key, lambda d: assembly.mf_bundle(d, self.cfg, self.data, variant, collab)

    def _text_bundle(self, variant: Variant) -> tuple[str, Build]:
        spec1, _ = templates(self.cfg, variant)
        adapter, key = self.stage1() if variant.lora else (None, "none")
        return key, lambda d: assembly.text_bundle(d, self.cfg, self.data, variant, spec1, adapter)

    def _stage3_bundle(self, variant: Variant) -> tuple[str, Build]:
        c = self.cfg
        _, spec3 = templates(c, variant)
        adapter, k1 = self.stage1()
        semantic, kd = self.distill() if variant.align or Slot.WARM in variant.slots else (None, "")
        collab, k2 = self.stage2(align=variant.align, holdout=variant.mf_residual or c.stage3.held_out_mf)
        key = fingerprint(k1, kd, k2, c.stage3, c.seed, asdict(variant))
        return key, lambda d: assembly.stage3_bundle(
            d, c, self.data, variant, spec3, adapter, collab, semantic, self.progress
        )

    def evaluate(self, variant: Variant, bundle: Path) -> dict:
        """Metrics on the seeded validation sample; scores kept for paired comparisons."""
        e = self.cfg.eval
        frame = sample(self.data.valid, e.limit, e.seed)
        key = fingerprint(str(bundle.parent.name), e.limit, e.seed, len(frame))
        path, record = self._timed(
            f"eval-{variant.name}",
            key,
            lambda d: assembly.evaluation(d, bundle, frame, e.batch_size, self.progress),
        )
        return record["metrics"] | {"scores": str(path / "scores.safetensors")}


def machine() -> dict:
    """What the numbers depend on beyond the config: stage 3 is sensitive to float rounding,
    which differs between CPU kernels (AVX2 vs AVX-512), so results record the kernels used."""
    return {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def run_variant(
    cfg: RunConfig,
    variant: str,
    out: str | Path,
    data: Dataset | None = None,
    progress: bool = True,
    command: str = "",
    evaluate: bool = True,
) -> dict:
    """Train (or reuse) everything `variant` needs, evaluate it, write OUT/results/<variant>.json."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    pipe = Pipeline(cfg, Path(out), data, progress)
    bundle = pipe.bundle(VARIANTS[variant])
    result: dict = {
        "variant": variant,
        "bundle": str(bundle),
        "command": command,
        "config": asdict(cfg),
        "budgets": {"stage1": cfg.stage1.budget, "stage3": cfg.stage3.budget, "eval_limit": cfg.eval.limit},
        "seed": cfg.seed,
        "machine": machine(),
    }
    if evaluate:
        result["valid"] = pipe.evaluate(VARIANTS[variant], bundle)
    result["stages"] = pipe.used
    result["wall_seconds"] = sum(s["build_seconds"] or 0.0 for s in pipe.used.values())
    result["wall_seconds_this_call"] = time.perf_counter() - start
    if world().main:
        results = Path(out) / "results"
        results.mkdir(parents=True, exist_ok=True)
        (results / f"{variant}.json").write_text(json.dumps(result, indent=2, default=str))
    return result
