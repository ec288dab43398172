"""sts: semantic textual similarity, the Spearman correlation between the cosine of two sentences' mean-pooled
embeddings and their gold score, zero-shot and, when the task names a train_file, after a short fine-tune.

Files (textpairs.py): GLUE's STS-B .tsv (the columns sentence1, sentence2, score among its others) or any
tab-separated file with a 3-column header (sentence1, sentence2, score by position). sentence-transformers'
EmbeddingSimilarityEvaluator computes the correlation. The fine-tune (embedding_finetune.py) trains a copy with
CoSENTLoss: for every two pairs of a batch whose gold scores differ, the pair scored higher must have the higher
cosine (a log-sum-exp over the wrongly ordered ones, cosines x 20). It reads only the order of the scores, so a
file scored 0-5 (STS-B) and one scored 0-1 train alike, and it is the loss sentence-transformers recommends over
CosineSimilarityLoss (which regresses the cosine onto the score).

Report keys: `spearman` is the task's number (after the fine-tune when train_file is given, else zero-shot);
with a train_file, `zero_shot/spearman` is the zero-shot one beside it; the details hold Pearson's r of both and
the fine-tune's settings, steps, first and last loss, and which cached fine-tune was scored (its folder, reused or
not).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from encoder_train.errors import require
from encoder_train.evaluation.embedding_finetune import TrainSettings, cached_fine_tune, check_settings
from encoder_train.evaluation.spec import EvalModel, Metrics, TaskConfig
from encoder_train.evaluation.textpairs import ScoredPairs, read_scored_pairs


@dataclass(frozen=True)
class Settings:
    data_file: Path
    """The scored pairs: GLUE's STS-B dev.tsv, or a .tsv with the header sentence1, sentence2, score."""
    max_length: int = 128
    """Tokens per sentence (truncated beyond); a number at least the model's window takes all of it."""
    batch_size: int = 64
    """Sentences per batch when encoding (a speed knob: the numbers do not depend on it)."""
    train_file: Path | None = None
    """Scored pairs in data_file's layout: fine-tune on them (CoSENT) before scoring; none: zero-shot."""
    epochs: int = 4
    """Passes over train_file."""
    learning_rate: float = 2e-5
    """The peak rate of AdamW, reached after the warmup, then decayed linearly to 0."""
    train_batch_size: int = 16
    """Pairs per optimizer step."""
    warmup_ratio: float = 0.1
    """The share of the fine-tune's steps over which the learning rate rises linearly from 0."""
    seed: int = 0
    """Seeds the fine-tune: the order of the pairs, the batches, dropout."""


def check(task: TaskConfig) -> None:
    s: Settings = task.settings
    check_settings(task, ("max_length", "batch_size", "epochs", "learning_rate", "train_batch_size"),
                   ("warmup_ratio",))
    read_scored_pairs(s.data_file)
    if s.train_file is not None:
        read_scored_pairs(s.train_file)


def run(task: TaskConfig, model: EvalModel, work_dir: Path) -> Metrics:
    s: Settings = task.settings
    pairs = read_scored_pairs(s.data_file)
    encoder = model.sentence_transformer(s.max_length)
    zero_shot = score(encoder, pairs, s.batch_size)
    details: dict[str, Any] = {"pairs": len(pairs.scores), "max_seq_length": encoder.max_seq_length,
                               "zero_shot": zero_shot}
    if s.train_file is None:
        return {"spearman": zero_shot["spearman"], "details": details}
    train = TrainSettings(epochs=s.epochs, learning_rate=s.learning_rate, batch_size=s.train_batch_size,
                          warmup_ratio=s.warmup_ratio, seed=s.seed, no_duplicates=False)

    def columns() -> dict[str, list]:
        train_pairs = read_scored_pairs(s.train_file)
        return {"sentence1": train_pairs.sentence1, "sentence2": train_pairs.sentence2, "score": train_pairs.scores}

    tuned = cached_fine_tune(model, encoder, s.train_file, columns, make_loss, train, {"loss": "cosent"},
                             encoder.max_seq_length, work_dir)
    t1 = time.perf_counter()
    final = score(tuned.model, pairs, s.batch_size)
    details["fine_tuned"] = final
    details["fine_tune"] = {**{k: tuned.summary[k] for k in ("steps", "first_loss", "last_loss", "seconds")},
                            "pairs": tuned.summary["rows"], "settings": {**asdict(train), "loss": "cosent"},
                            "cached": str(tuned.folder), "reused": tuned.reused,
                            "scoring_seconds": round(time.perf_counter() - t1, 3)}
    return {"spearman": final["spearman"], "zero_shot/spearman": zero_shot["spearman"], "details": details}


def make_loss(model: Any) -> Any:
    require("sentence_transformers", "eval", "the sts task kind")
    from sentence_transformers.sentence_transformer import losses

    return losses.CoSENTLoss(model)


def score(encoder: Any, pairs: ScoredPairs, batch_size: int) -> dict[str, float]:
    """Spearman's and Pearson's correlation of the pairs' cosines with their scores."""
    require("sentence_transformers", "eval", "the sts task kind")
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    evaluator = EmbeddingSimilarityEvaluator(pairs.sentence1, pairs.sentence2, pairs.scores, batch_size=batch_size,
                                             similarity_fn_names=["cosine"], write_csv=False)
    found = evaluator(encoder)
    return {"spearman": float(found["spearman_cosine"]), "pearson": float(found["pearson_cosine"])}
