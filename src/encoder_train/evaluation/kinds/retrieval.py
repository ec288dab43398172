"""retrieval: a BEIR-layout folder scored by exact cosine search over mean-pooled embeddings, zero-shot and, when
the task names a train_file, after a short contrastive fine-tune with in-batch negatives.

Protocol. Queries and documents are encoded by the same SentenceTransformer (mean pooling over the real tokens,
truncated at min(max_length, the model's window)); every query is compared with every document by cosine
similarity, ties broken by document id; sentence-transformers' InformationRetrievalEvaluator computes the metrics
(binary relevance: beir.py). The fine-tune (embedding_finetune.py) trains a copy of the model on train_file's rows
with MultipleNegativesRankingLoss (`loss: mnrl`: each query's positive against every other positive of the batch,
and the batch's negatives when the file has a third column; cross-entropy over cosine x scale) or its gradient-cache
form (`loss: cached_mnrl`: the same loss over a batch of train_batch_size, embedded mini_batch_size texts at a time,
so that a batch of 512 or more fits in the memory of mini_batch_size), then scores the copy.

Report keys: `ndcg@10`, `mrr@10`, `recall@100` are the task's numbers: after the fine-tune when train_file is
given, else zero-shot; with a train_file, `zero_shot/ndcg@10`, `zero_shot/mrr@10`, `zero_shot/recall@100` are the
zero-shot ones beside them. The details hold every metric the evaluator gives (accuracy@k, precision@k, map@100),
the queries scored and dropped, and the fine-tune's settings, steps, first and last loss, and which cached
fine-tune (embedding_finetune.cached_fine_tune: its folder, and whether an earlier task trained it) was scored.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from encoder_train.errors import UserError, require
from encoder_train.evaluation.beir import BeirTask, read_beir, split_file
from encoder_train.evaluation.embedding_finetune import TrainSettings, cached_fine_tune, check_settings
from encoder_train.evaluation.spec import EvalModel, Metrics, TaskConfig
from encoder_train.evaluation.textpairs import read_train_pairs

REPORTED = ("ndcg@10", "mrr@10", "recall@100")
LOSSES = ("mnrl", "cached_mnrl")


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    """The BEIR-layout folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""
    split: str = "test"
    """Which qrels file scores: qrels/<split>.tsv."""
    max_length: int = 512
    """Tokens per query or document (truncated beyond); a number at least the model's window takes all of it."""
    batch_size: int = 64
    """Texts per batch when encoding queries and documents (a speed knob: the numbers do not depend on it)."""
    train_file: Path | None = None
    """A header, then `query<TAB>positive[<TAB>negative]` rows: fine-tune on them before scoring; none: zero-shot."""
    train_max_length: int | None = None
    """Tokens per text the fine-tune reads (truncated beyond); none: max_length. Tasks that score at other lengths
    but give the same train_max_length (and train_file and settings) share one fine-tune."""
    epochs: int = 1
    """Passes over train_file."""
    learning_rate: float = 2e-5
    """The peak rate of AdamW, reached after the warmup, then decayed linearly to 0."""
    train_batch_size: int = 64
    """Pairs per optimizer step: each query's in-batch negatives are the other train_batch_size - 1 positives."""
    loss: Literal["mnrl", "cached_mnrl"] = "mnrl"
    """mnrl: MultipleNegativesRankingLoss; cached_mnrl: the same loss with a gradient cache (mini_batch_size)."""
    mini_batch_size: int = 32
    """cached_mnrl: texts embedded at once; memory follows it, not train_batch_size."""
    scale: float = 20.0
    """Cosine similarities are multiplied by this before the softmax (1 / temperature: 20 is a temperature of 0.05)."""
    warmup_ratio: float = 0.1
    """The share of the fine-tune's steps over which the learning rate rises linearly from 0."""
    seed: int = 0
    """Seeds the fine-tune: the order of the pairs, the batches, dropout."""


def check(task: TaskConfig) -> None:
    s: Settings = task.settings
    check_settings(task, ("max_length", "batch_size", "epochs", "learning_rate", "train_batch_size",
                          "mini_batch_size", "scale"), ("warmup_ratio",))
    if s.train_max_length is not None:
        check_settings(task, ("train_max_length",))
    if s.loss not in LOSSES:
        raise UserError(f"{task.suite_file}: task {task.name!r}: loss {s.loss!r} is not one of {', '.join(LOSSES)}; "
                        "pick one.")
    read_beir(s.data_dir, s.split)
    if s.train_file is not None:
        read_train_pairs(s.train_file)


def run(task: TaskConfig, model: EvalModel, work_dir: Path) -> Metrics:
    s: Settings = task.settings
    data = read_beir(s.data_dir, s.split)
    encoder = model.sentence_transformer(s.max_length)
    t0 = time.perf_counter()
    zero_shot = score(encoder, data, s.batch_size)
    details: dict[str, Any] = {
        "queries": len(data.queries), "documents": len(data.corpus), "qrels": str(split_file(s.data_dir, s.split)),
        "dropped_queries": {"without_qrels": data.dropped.without_qrels,
                            "without_relevant": len(data.dropped.without_relevant),
                            "without_relevant_ids": data.dropped.without_relevant[:20]},
        "max_seq_length": encoder.max_seq_length, "zero_shot": zero_shot,
        "zero_shot_seconds": round(time.perf_counter() - t0, 3),
    }
    if s.train_file is None:
        metrics: Metrics = {key: zero_shot[key] for key in REPORTED}
        return metrics | {"details": details}
    train = TrainSettings(epochs=s.epochs, learning_rate=s.learning_rate, batch_size=s.train_batch_size,
                          warmup_ratio=s.warmup_ratio, seed=s.seed, no_duplicates=True)
    loss = {"loss": s.loss, "scale": s.scale, "mini_batch_size": s.mini_batch_size if s.loss == "cached_mnrl" else None}

    def columns() -> dict[str, list]:
        pairs = read_train_pairs(s.train_file)
        return {name: [row[i] for row in pairs.rows] for i, name in enumerate(pairs.columns)}

    trainee = model.sentence_transformer(s.train_max_length or s.max_length)
    tuned = cached_fine_tune(model, trainee, s.train_file, columns, lambda m: make_loss(m, s), train, loss,
                             encoder.max_seq_length, work_dir)
    t1 = time.perf_counter()
    final = score(tuned.model, data, s.batch_size)
    details["fine_tuned"] = final
    details["fine_tune"] = {**{k: tuned.summary[k] for k in ("steps", "first_loss", "last_loss", "seconds")},
                            "pairs": tuned.summary["rows"], "columns": tuned.summary["columns"],
                            "max_seq_length": trainee.max_seq_length,
                            "settings": {**asdict(train), **loss}, "cached": str(tuned.folder),
                            "reused": tuned.reused, "scoring_seconds": round(time.perf_counter() - t1, 3)}
    metrics = {key: final[key] for key in REPORTED}
    metrics |= {f"zero_shot/{key}": zero_shot[key] for key in REPORTED}
    metrics["details"] = details
    return metrics


def make_loss(model: Any, s: Settings) -> Any:
    """The task's contrastive loss over `model` (a SentenceTransformer): cosine similarities x scale, cross-entropy
    against the query's own positive."""
    require("sentence_transformers", "eval", "the retrieval task kind")
    from sentence_transformers.sentence_transformer import losses

    if s.loss == "cached_mnrl":
        return losses.CachedMultipleNegativesRankingLoss(model, scale=s.scale, mini_batch_size=s.mini_batch_size)
    return losses.MultipleNegativesRankingLoss(model, scale=s.scale)


def score(encoder: Any, data: BeirTask, batch_size: int) -> dict[str, float]:
    """Every metric of sentence-transformers' InformationRetrievalEvaluator for exact cosine search: `ndcg@10`,
    `mrr@10`, `recall@100`, and accuracy@{1,10}, precision@{1,10,100}, recall@{1,10}, map@100."""
    require("sentence_transformers", "eval", "the retrieval task kind")
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import cos_sim

    evaluator = InformationRetrievalEvaluator(
        queries=data.queries, corpus=data.corpus, relevant_docs=data.relevant, batch_size=batch_size,
        mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1, 10], precision_recall_at_k=[1, 10, 100], map_at_k=[100],
        score_functions={"cosine": cos_sim},  # cosine whatever similarity the model's config names
        write_csv=False,
    )
    found = evaluator(encoder)
    return {key.removeprefix("cosine_"): float(value) for key, value in found.items()}
