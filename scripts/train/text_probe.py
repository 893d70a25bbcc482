"""How much the stage-1 prompt's text tells a frozen backbone about the label: a linear probe.

    python scripts/train/text_probe.py --config training/configs/ml1m.yaml --rows 2048 --out PROBE.json

Runs the stage-1 prompt (history titles and target title, no soft tokens, no LoRA) of
`--rows` seeded train rows and of the config's validation sample through the frozen
backbone, takes the final hidden state at the last prompt position (what the Yes/No rows
of the head read), and fits a logistic regression on the train rows (regularisation chosen
by 5-fold cross-validation on those rows only). Its validation AUC/UAUC bounds what a
linear read-out of these features can learn from this many rows; stage 1's LoRA (one pass,
a few hundred rows) is measured against it in docs/results.md. The zero-shot Yes/No margin
of the same forward is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from sellarec.model.backbone import load_backbone
from sellarec.model.prompts import TemplateSpec
from sellarec.model.sella import SellaRec
from sellarec.training.batches import row_prompts
from sellarec.training.config import load_config
from sellarec.training.data import Dataset, sample
from sellarec.training.evaluate import metrics


@torch.no_grad()
def features(scorer: SellaRec, frame, batch: int, progress: bool) -> np.ndarray:
    """Final hidden state (after the last norm) at the last prompt token, one row per prompt:
    the model's own plain path (`SellaRec.last_hidden`), in length-sorted batches."""
    encoded = [scorer.encoder.prompt(p) for p in row_prompts(scorer.spec, frame)]
    order = np.argsort([len(e) for e in encoded])  # little padding
    out = np.zeros((len(encoded), scorer.llm_dim), dtype=np.float32)
    for start in tqdm(range(0, len(encoded), batch), disable=not progress, desc="probe features"):
        rows = order[start : start + batch]
        out[rows] = scorer.last_hidden([encoded[r] for r in rows]).float().numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="training/configs/ml1m.yaml")
    parser.add_argument("--rows", type=int, default=2048, help="seeded train rows the probe is fitted on")
    parser.add_argument("--valid-rows", type=int, help="validation rows (default: the config's eval.limit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, help="write the numbers here as JSON")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    data = Dataset.load(cfg.data.train, cfg.data.valid, name=cfg.data.name)
    train = sample(data.train, args.rows, args.seed)
    valid = sample(data.valid, args.valid_rows or cfg.eval.limit, cfg.eval.seed)  # every variant's rows
    model, tokenizer, _ = load_backbone(cfg.backbone)
    spec = TemplateSpec(
        stage="stage1",
        domain=cfg.data.domain,
        answer_cue=cfg.prompt.answer_cue,
        history_length=cfg.prompt.history_length,
    )
    scorer = SellaRec(model, tokenizer, spec).eval()
    start = time.perf_counter()
    x_train = features(scorer, train, args.batch, not args.no_progress)
    x_valid = features(scorer, valid, args.batch, not args.no_progress)
    seconds = time.perf_counter() - start
    with torch.no_grad():  # the zero-shot score, l_yes - l_no, from the same hidden states
        zero_shot = scorer.head(torch.from_numpy(x_valid)).numpy()
    y_train = train["label"].to_numpy()
    fit = LogisticRegressionCV(Cs=10, cv=5, scoring="roc_auc", max_iter=2000)
    probe = make_pipeline(StandardScaler(), fit)
    probe.fit(x_train, y_train)
    result = {
        "config": args.config,
        "train_rows": len(train),
        "valid_rows": len(valid),
        "seed": args.seed,
        "backbone": cfg.backbone,
        "history_length": cfg.prompt.history_length,
        "forward_seconds": round(seconds, 1),
        "cv_auc_train": float(probe[-1].scores_[1].mean(axis=0).max()),
        "probe": metrics(valid, probe.predict_proba(x_valid)[:, 1]),
        "zero_shot": metrics(valid, zero_shot),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
