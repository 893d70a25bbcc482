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

    python scripts/train/text_probe.py --config training/configs/ml1m.yaml --with-mf --out PROBE.json

`--with-mf` asks what the text adds to the MF that stage 3 is fed. It fits stage 2's plain MF
on the train split less the stage-3 rows (as `stage3.held_out_mf` does), fits the probe on
those stage-3 rows (where the MF's logits are out of sample, as on new rows), and reports on
the validation rows: the MF alone, the text alone, and the two stacked (a logistic regression
on the MF logit and the probe's out-of-fold text score), with the paired bootstrap of the last
against the MF. (The MF logit beside all 576 standardised features under one L2 penalty was
tried first: the penalty CV chose left it below the MF alone, even on its own train rows.) That
is a best case for a linear read-out of the two inputs an LLM row has beyond the soft tokens'
own geometry: a SeLLa-Rec row above it would have to read more from the text than a fitted
read-out of the frozen backbone finds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from sellarec.model.backbone import load_backbone
from sellarec.model.bundle import MF_ITEMS, MF_USERS
from sellarec.model.prompts import TemplateSpec
from sellarec.model.sella import SellaRec
from sellarec.training.assembly import STAGE3_SEED_OFFSET, held_out
from sellarec.training.batches import row_prompts
from sellarec.training.config import load_config, parse_sets
from sellarec.training.data import Dataset, sample
from sellarec.training.evaluate import metrics
from sellarec.training.report.stats import paired_bootstrap_scores
from sellarec.training.stage2 import train_stage2


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


def row_ids(frame) -> torch.Tensor:
    """[n, 3] (uid, iid, timestamp) of each row: what a features file is checked against."""
    ids = frame[["uid", "iid", "timestamp"]].to_numpy()
    return torch.as_tensor(np.ascontiguousarray(ids, dtype=np.int64))


def held_out_mf_logits(cfg, data: Dataset, frames, progress: bool) -> list[np.ndarray]:
    """Stage 2's plain MF fit without the stage-3 rows; its logit on each frame's rows."""
    with tempfile.TemporaryDirectory() as tmp:
        train_stage2(held_out(cfg, data), cfg.stage2, None, None, False, cfg.seed, Path(tmp), progress)
        tables = load_file(Path(tmp) / "collab.safetensors")
    users, items = tables[MF_USERS], tables[MF_ITEMS]
    return [
        (users[torch.as_tensor(f["uid"].to_numpy())] * items[torch.as_tensor(f["iid"].to_numpy())])
        .sum(-1)
        .numpy()
        for f in frames
    ]


def fitted(x_train: np.ndarray, y_train: np.ndarray):
    """Standardised L2 logistic regression, its strength chosen by 5-fold CV AUC on the train rows."""
    fit = LogisticRegressionCV(Cs=10, cv=5, scoring="roc_auc", max_iter=2000)
    return make_pipeline(StandardScaler(), fit).fit(x_train, y_train)


def cv_auc(probe) -> float:
    return float(probe[-1].scores_[1].mean(axis=0).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="training/configs/ml1m.yaml")
    parser.add_argument("--rows", type=int, default=2048, help="seeded train rows the probe is fitted on")
    parser.add_argument("--valid-rows", type=int, help="validation rows (default: the config's eval.limit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, help="write the numbers here as JSON")
    parser.add_argument("--with-mf", action="store_true", help="the text beside the held-out MF (see above)")
    parser.add_argument("--features", type=Path, help="features (safetensors): written, or read if there")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, parse_sets(args.set))
    data = Dataset.load(cfg.data.train, cfg.data.valid, name=cfg.data.name)
    if args.with_mf:  # the stage-3 rows, which the held-out MF never saw
        train = sample(data.train, cfg.stage3.budget, cfg.seed + STAGE3_SEED_OFFSET)
    else:
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
    splits = (("train", train), ("valid", valid))
    if args.features and args.features.exists():  # this script's own earlier forward of the same rows
        cached = load_file(args.features)
        if any(not torch.equal(cached[f"{name}.rows"], row_ids(f)) for name, f in splits):
            raise SystemExit(f"{args.features} holds other rows; delete it or name another file")
        x_train, x_valid = cached["train"].numpy(), cached["valid"].numpy()
    else:
        x_train = features(scorer, train, args.batch, not args.no_progress)
        x_valid = features(scorer, valid, args.batch, not args.no_progress)
        if args.features:
            rows = {f"{name}.rows": row_ids(f) for name, f in splits}
            save_file(
                {"train": torch.from_numpy(x_train), "valid": torch.from_numpy(x_valid)} | rows, args.features
            )
    seconds = time.perf_counter() - start
    with torch.no_grad():  # the zero-shot score, l_yes - l_no, from the same hidden states
        zero_shot = scorer.head(torch.from_numpy(x_valid)).numpy()
    y_train = train["label"].to_numpy()
    probe = fitted(x_train, y_train)
    result = {
        "config": args.config,
        "sets": args.set,
        "train_rows": len(train),
        "valid_rows": len(valid),
        "seed": cfg.seed if args.with_mf else args.seed,
        "backbone": cfg.backbone,
        "history_length": cfg.prompt.history_length,
        "forward_seconds": round(seconds, 1),
        "cv_auc_train": cv_auc(probe),
        "probe": metrics(valid, probe.predict_proba(x_valid)[:, 1]),
        "zero_shot": metrics(valid, zero_shot),
    }
    if args.with_mf:
        mf_train, mf_valid = held_out_mf_logits(cfg, data, [train, valid], not args.no_progress)
        text_oof = cross_val_predict(
            make_pipeline(StandardScaler(), LogisticRegression(C=probe[-1].C_[0], max_iter=2000)),
            x_train,
            y_train,
            cv=5,
            method="decision_function",
        )
        both = fitted(np.column_stack([mf_train, text_oof]), y_train)
        both_valid = both.decision_function(np.column_stack([mf_valid, probe.decision_function(x_valid)]))
        result["mf_held_out"] = metrics(valid, mf_valid)
        result["mf_held_out_train_auc"] = metrics(train, mf_train)["auc"]
        result["mf_and_text"] = metrics(valid, both_valid)
        result["mf_and_text_cv_auc_train"] = cv_auc(both)
        result["mf_and_text_weights"] = [float(w) for w in both[-1].coef_[0]]
        result["mf_and_text_minus_mf"] = paired_bootstrap_scores(
            valid["uid"].to_numpy(), valid["label"].to_numpy(), both_valid, mf_valid, 2000
        )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
