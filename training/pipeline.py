"""The stages wired together, each cached under OUT/stages/<stage>-<key> and skipped when
present (the key hashes every setting the stage depends on, upstream stages included).

`run_variant(config, "sellarec", out)` trains what the variant needs, writes its bundle to
OUT/variants/<name>-<key>/bundle, evaluates it on the seeded validation sample and writes
OUT/results/<name>.json. A demo can call it on a synthetic `Dataset`.
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
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from sellarec.model.backbone import BackboneInfo, load_tokenizer, resolve
from sellarec.model.backbone import fingerprint as backbone_fingerprint
from sellarec.model.prompts import TemplateSpec
from sellarec.training.bundles import collab_tensors, semantic_tensors, write_bundle
from sellarec.training.config import VARIANTS, RunConfig, Variant, fingerprint
from sellarec.training.data import Dataset, sample
from sellarec.training.distributed import barrier, world
from sellarec.training.evaluate import evaluate_bundle
from sellarec.training.stage1 import distill_items, train_stage1
from sellarec.training.stage2 import train_stage2
from sellarec.training.stage3 import SoftInputTables, build_scorer, train_stage3

log = logging.getLogger("sellarec.train")
DONE = "done.json"


def cached(out: Path, name: str, key: str, build: Callable[[Path], dict]) -> tuple[Path, dict]:
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


def backbone_info(spec: str) -> BackboneInfo:
    """BackboneInfo from the config alone (no weights loaded)."""
    path = resolve(spec)
    config = AutoConfig.from_pretrained(path)
    return BackboneInfo(
        spec=spec,
        fingerprint=backbone_fingerprint(path),
        hidden_size=int(config.get_text_config().hidden_size),
        model_type=str(config.model_type),
    )


def templates(cfg: RunConfig, variant: Variant) -> tuple[TemplateSpec, TemplateSpec]:
    """(stage-1 spec, stage-3 spec with the variant's slots)."""
    common = {
        "domain": cfg.data.domain,
        "answer_cue": cfg.prompt.answer_cue,
        "history_length": cfg.prompt.history_length,
    }
    return TemplateSpec(stage="stage1", **common), TemplateSpec(stage="stage3", slots=variant.slots, **common)


class Pipeline:
    """The stages of one configuration over one dataset; every stage result is cached."""

    def __init__(self, cfg: RunConfig, out: Path, data: Dataset | None = None, progress: bool = True) -> None:
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.data = data or Dataset.load(cfg.data.train, cfg.data.valid, name=cfg.data.name)
        self.data_key = fingerprint(
            cfg.data, len(self.data.train), len(self.data.valid), cfg.prompt, cfg.backbone
        )
        #: stage name -> {"dir": cache dir name, "build_seconds": wall time when it was built}.
        self.used: dict[str, dict] = {}

    def _timed(self, name: str, key: str, build: Callable[[Path], dict]) -> tuple[Path, dict]:
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
        return load_file(path / "semantic.safetensors")["semantic.items"], key

    def stage2(self, align: bool) -> tuple[dict[str, torch.Tensor], str]:
        c = self.cfg
        semantic, kd = self.distill() if align else (None, "none")
        key = fingerprint(self.data_key, kd, c.stage2, c.seed, align)
        llm_dim = int(semantic.shape[1]) if semantic is not None else None
        path, _ = self._timed(
            "stage2-align" if align else "stage2-mf",
            key,
            lambda d: train_stage2(self.data, c.stage2, semantic, llm_dim, align, c.seed, d, self.progress),
        )
        return load_file(path / "collab.safetensors"), key

    def bundle(self, variant: Variant) -> Path:
        """Train what `variant` needs and write its bundle (cached like a stage)."""
        c = self.cfg
        spec1, spec3 = templates(c, variant)
        if not variant.llm:
            collab, key = self.stage2(align=False)
            tensors = collab_tensors(self.data, collab["mf.users"], collab["mf.items"])
            build = lambda d: self._write(d, variant, tensors, collab_dim=c.stage2.collab_dim)  # noqa: E731
        elif not variant.stage3:
            adapter, key = self.stage1() if variant.lora else (None, "none")
            build = lambda d: self._write(d, variant, {}, spec=spec1, adapter=adapter)  # noqa: E731
        else:
            adapter, k1 = self.stage1()
            semantic, kd = (
                self.distill() if variant.align or "warm" in {s.value for s in variant.slots} else (None, "")
            )
            collab, k2 = self.stage2(align=variant.align)
            key = fingerprint(k1, kd, k2, c.stage3, c.seed, asdict(variant))

            def build(d: Path) -> dict:
                proj_state = (
                    {k[len("proj_c.") :]: v for k, v in collab.items() if k.startswith("proj_c.")}
                    if variant.warm_start
                    else None
                )
                scorer = build_scorer(
                    c.backbone, adapter, spec3, c.stage2.collab_dim, proj_state, c.seed,
                    c.stage3.soft_token_scale,
                )
                uses_collab = scorer.proj_c is not None
                tables = SoftInputTables(
                    collab["mf.users"] if uses_collab else None,
                    collab["mf.items"] if uses_collab else None,
                    semantic if scorer.proj_w is not None else None,
                )
                rows = sample(self.data.train, c.stage3.budget, c.seed + 3)
                metrics = train_stage3(scorer, tables, rows, c.stage3, c.seed, self.progress)
                tensors: dict[str, torch.Tensor] = {}
                if uses_collab:
                    tensors |= collab_tensors(self.data, tables.users.detach(), tables.items.detach())
                    tensors |= {f"proj_c.{k}": v for k, v in scorer.proj_c.state_dict().items()}
                if scorer.proj_w is not None:
                    tensors |= semantic_tensors(self.data, tables.semantic.detach())
                    tensors |= {f"proj_w.{k}": v for k, v in scorer.proj_w.state_dict().items()}
                self._write(d, variant, tensors, spec=spec3, adapter=adapter, collab_dim=c.stage2.collab_dim)
                return metrics

        path, _ = self._timed(f"bundle-{variant.name}", key, build)
        return path / "bundle"

    def _write(
        self,
        d: Path,
        variant: Variant,
        tensors: dict,
        spec: TemplateSpec | None = None,
        adapter: Path | None = None,
        collab_dim: int | None = None,
    ) -> dict:
        info = backbone_info(self.cfg.backbone) if spec else None
        tokenizer = load_tokenizer(self.cfg.backbone) if spec else None
        write_bundle(
            d / "bundle",
            variant.name,
            self.data,
            tensors,
            self.cfg.prompt.history_length,
            info=info,
            spec=spec,
            tokenizer=tokenizer,
            adapter=adapter,
            collab_dim=collab_dim,
            extra={"config": asdict(self.cfg)},
        )
        return {}

    def evaluate(self, variant: Variant, bundle: Path) -> dict:
        """Metrics on the seeded validation sample; scores kept for paired comparisons."""
        e = self.cfg.eval
        frame = sample(self.data.valid, e.limit, e.seed)
        key = fingerprint(str(bundle.parent.name), e.limit, e.seed, len(frame))

        def build(d: Path) -> dict:
            result, scores = evaluate_bundle(bundle, frame, e.batch_size, self.progress)
            save_file(
                {
                    "scores": torch.as_tensor(scores),
                    "uid": torch.tensor(frame["uid"].to_numpy()),
                    "iid": torch.tensor(frame["iid"].to_numpy()),
                    "label": torch.tensor(frame["label"].to_numpy()),
                    "not_cold": torch.tensor(frame["not_cold"].to_numpy()),
                },
                d / "scores.safetensors",
            )
            return result

        path, record = self._timed(f"eval-{variant.name}", key, build)
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
