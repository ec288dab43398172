"""finetune(source, task, settings): set up -> fit, once per seed. Plain code, no callbacks.

For each seed: the pretrained encoder plus a new head (classifier.py), AdamW with RoBERTa's fine-tuning
betas and weight-decay groups (optimizers/adamw.py), a learning rate that warms up over `warmup_ratio` of the steps and
decays linearly to zero, `epochs` passes over the training examples in a seeded random order. After every
epoch the validation files are scored with the task's metrics; the best epoch by the task's score on the
first validation file is the one kept, as a checkpoint and as the seed's result. Fine-tuning on small tasks
is noisy, so `num_seeds` runs report the mean and the spread over seeds. Losses: cross-entropy, or for
regression the mean squared error, with the head's output starting at the mean training label.

Batches: rows right-padded to the longest of the batch. Training batches come from a shuffled order in which
runs of 50 batches are sorted by length (little padding, still random batches); evaluation reads the
examples longest first and puts the predictions back in file order.

Output, under `output_dir`:

    seed_<s>/checkpoint_XXXXXXXX.pt   the best epoch's model (the step in the name), written atomically
    seed_<s>/metrics.jsonl            training records every `log_interval` steps, one record per epoch's scores
    seed_<s>/predictions_<test>.tsv   with a test file: `index<TAB>prediction` from the best epoch
    results.json                      what the last printed line says

A fine-tuned checkpoint holds what any checkpoint holds (`model`, `dims`, `tokenizer`, `step`; the `model` is
the whole MaskedLM, so `evaluate`, `fill-mask` and `export` read it too) and, for the classifier:
`classifier` (the head's weights), `task` (family, pooling, labels, text columns, metrics, max_length),
`finetune` (the settings and seed), `metrics` and `epoch` (the best epoch's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from encoder_train import checkpoint, devices
from encoder_train.batch import MaskSpec
from encoder_train.config import TrainingConfig
from encoder_train.errors import UserError
from encoder_train.families import family_of
from encoder_train.finetune.classifier import SequenceClassifier
from encoder_train.finetune.metrics import METRICS, score
from encoder_train.finetune.tasks import Labels, Split, Task
from encoder_train.model import MaskedLM, ModelDims
from encoder_train.optimizers import build_optimizer
from encoder_train.schedule import build_scheduler, lr_factor
from encoder_train.seeds import derive_seed
from encoder_train.state import host_copy
from encoder_train.step import MetricsWindow, apply_update
from encoder_train.tokenizer import special_tokens
from encoder_train.tracking import Tracker, TrackerSettings


@dataclass(frozen=True)
class FinetuneSettings:
    """The fine-tuning hyper-parameters. Defaults: RoBERTa's GLUE recipe (fairseq), 3 epochs, with the learning rate
    searched for; glue.py sets each GLUE task's own for base-size models."""

    learning_rate: float | None = None
    """Peak learning rate, reached after warmup, then decayed linearly to zero. None: chosen by a short search on
    the training examples (`search_learning_rate`): the right rate differs by 100x between a briefly pretrained
    small model and RoBERTa-large, and a wrong one gives a majority-class classifier."""
    batch_size: int = 32
    """Examples per optimizer step."""
    epochs: int = 3
    """Passes over the training examples; the best of them on the validation file is kept."""
    warmup_ratio: float = 0.06
    """Share of the steps over which the learning rate rises from 0 (RoBERTa: 6%)."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay (RoBERTa's fine-tuning: 0.1); biases and LayerNorms get none."""
    max_length: int = 512
    """Tokens per example with <s> and </s>; longer texts are cut (a pair: the longer text first). At most the
    model's positions."""
    gradient_clip: float = 1.0
    """Clip the gradient's global L2 norm to this; 0 disables clipping."""
    dropout: float | None = None
    """Dropout in the classification head; None: the model's own dropout."""
    pooling: str = "cls"
    """ModernBERT's head: "cls" or "mean" pooling; RoBERTa's head always reads <s>."""
    precision: str = "bf16"
    """bf16 autocast with fp32 weights, or fp32."""
    seed: int = 0
    """The first seed: it seeds the head's initialisation, dropout and the order of the examples."""
    num_seeds: int = 1
    """Runs with seeds seed, seed + 1, ...; the results give their mean and standard deviation."""
    log_interval: int = 10
    """Steps between records in metrics.jsonl and progress updates."""
    progress: str = "auto"
    """A progress bar ("bar"), one plain line per log_interval ("lines"), or "auto": the bar on a terminal."""

    def __post_init__(self) -> None:
        numbers = {"warmup_ratio": (self.warmup_ratio, 0.0, True),
                   "weight_decay": (self.weight_decay, 0.0, True), "gradient_clip": (self.gradient_clip, 0.0, True)}
        if self.learning_rate is not None:
            numbers["learning_rate"] = (self.learning_rate, 0.0, False)
        for name, (value, low, may_equal) in numbers.items():
            if not math.isfinite(value) or value < low or (value == low and not may_equal):
                raise UserError(f"--{name} {value} must be a finite number {'at least' if may_equal else 'above'} "
                                f"{low:g}; pass another value.")
        if self.warmup_ratio > 1:
            raise UserError(f"--warmup_ratio {self.warmup_ratio} is a share of the steps; pass a value from 0 to 1.")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise UserError(f"--dropout {self.dropout} must be at least 0 and below 1; pass another value.")
        if self.max_length < 8:
            raise UserError(f"--max_length {self.max_length} leaves no room for text; pass 8 or more (e.g. 128).")
        if self.pooling not in ("cls", "mean"):
            raise UserError(f"--pooling {self.pooling!r} is not cls or mean; pass one of them.")
        if self.progress not in ("auto", "bar", "lines"):
            raise UserError(f"--progress {self.progress!r} is not auto, bar or lines; pass one of them.")
        if self.precision not in ("bf16", "fp32"):
            raise UserError(f"--precision {self.precision!r} is not bf16 or fp32; pass one of them.")


# ---- what fine-tuning starts from ---------------------------------------------------------------------------


@dataclass
class Source:
    """A pretrained encoder: MaskedLM weights, its shape and tokenizer; `origin` names where it came from."""

    weights: dict[str, torch.Tensor]
    dims: ModelDims
    tokenizer: Tokenizer
    spec: MaskSpec
    origin: str


def source_from_checkpoint(path: str | Path) -> Source:
    from encoder_train.state import load_trained

    trained = load_trained(path, torch.device("cpu"), flag="--checkpoint")
    return Source(trained.model.state_dict(), trained.model.dims, trained.tokenizer, trained.spec, str(path))


def source_from_hf(directory: str | Path) -> Source:
    """A Hugging Face masked-LM folder (an `encoder-train export`, or a released RoBERTa-style model)."""
    from encoder_train.hf import import_hf

    folder = import_hf(directory)
    special = special_tokens(folder.tokenizer, directory)
    spec = MaskSpec(special.pad, special.mask, special.all_ids, folder.tokenizer.get_vocab_size(), 0.15)
    return Source(folder.state_dict, folder.dims, folder.tokenizer, spec, str(directory))


def untrained(source: Source, seed: int) -> Source:
    """The same model before any training: initialised from `seed` (as training's step 0 with that seed)."""
    torch.manual_seed(seed)
    return dataclasses.replace(source, weights=MaskedLM(source.dims).state_dict(),
                               origin=f"{source.origin} (untrained: initialised from seed {seed})")


# ---- examples -> token ids -----------------------------------------------------------------------------------


@dataclass
class Encoded:
    """A split as token ids: <s> A </s> or RoBERTa's pair <s> A </s></s> B </s>, cut to max_length."""

    split: Split
    ids: list[list[int]]
    labels: torch.Tensor | None  # (N,) int64 class ids or float32 numbers
    cut: int = 0  # examples whose texts were longer than max_length

    def __len__(self) -> int:
        return len(self.ids)


def encode(split: Split, tokenizer: Tokenizer, max_length: int, regression: bool) -> Encoded:
    """Special tokens are placed here, not by the tokenizer's post-processor, so every tokenizer frames texts
    the same way (export writes this framing into the exported tokenizer)."""
    special = special_tokens(tokenizer)
    bos, eos = special.bos, special.eos
    columns = list(zip(*split.texts, strict=True))  # one tuple of texts per column
    pieces = [[e.ids for e in tokenizer.encode_batch(list(c), add_special_tokens=False)] for c in columns]
    rows, cut = [], 0
    if len(pieces) == 1:
        for a in pieces[0]:
            cut += len(a) > max_length - 2
            rows.append([bos, *a[: max_length - 2], eos])
    else:
        for a, b in zip(*pieces, strict=True):
            cut += len(a) + len(b) > max_length - 4
            a, b = truncate_pair(a, b, max_length - 4)
            rows.append([bos, *a, eos, eos, *b, eos])
    labels = None
    if split.labels is not None:
        labels = torch.tensor(split.labels, dtype=torch.float32 if regression else torch.int64)
    return Encoded(split, rows, labels, cut)


def truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cut a token at a time from the longer text, the second on a tie, until both fit in `budget` tokens:
    Hugging Face's longest_first, in closed form."""
    excess = len(a) + len(b) - budget
    if excess <= 0:
        return a, b
    la, lb = len(a), len(b)
    gap = min(excess, abs(la - lb))  # first bring the longer down to the shorter
    la, lb = (la - gap, lb) if la > lb else (la, lb - gap)
    rest = excess - gap  # then take turns, the second text first
    la, lb = la - rest // 2, lb - (rest + 1) // 2
    return a[:la], b[:lb]


def collate(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> (B, T) right-padded ids and (B, T) mask, T = the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, ids != pad_id


def training_batches(data: Encoded, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch: a random order of the examples, runs of 50 batches sorted by length, the batches shuffled."""
    order = torch.randperm(len(data), generator=generator).tolist()
    run = 50 * batch_size
    batches = []
    for start in range(0, len(order), run):
        chunk = sorted(order[start:start + run], key=lambda i: len(data.ids[i]))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


@torch.no_grad()
def predict(model: SequenceClassifier, data: Encoded, batch_size: int, device: torch.device,
            autocast: contextlib.AbstractContextManager, pad_id: int) -> torch.Tensor:
    """(N, C) float32 logits on the CPU, in the file's order; the model's mode is restored."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: -len(data.ids[i]))
    out = torch.empty(len(data), model.num_outputs)
    try:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            ids, mask = collate([data.ids[i] for i in index], pad_id)
            with autocast:
                logits = model(ids.to(device), mask.to(device))
            out[index] = logits.float().cpu()  # the host waits for the device here
    finally:
        model.train(was_training)
    return out


def decide(logits: torch.Tensor, regression: bool) -> torch.Tensor:
    """(N, C) logits -> (N,) class ids, or (N,) numbers for regression."""
    return logits[:, 0] if regression else logits.argmax(-1)


def scores(predictions: torch.Tensor, labels: torch.Tensor, metrics: tuple[str, ...]) -> dict[str, float]:
    return {name: METRICS[name](predictions.tolist(), labels.tolist()) for name in metrics}


def validation_metrics(per_split: dict[str, dict[str, float]]) -> dict[str, float]:
    """One file: its metrics as they are; several (MNLI's matched, mismatched): each prefixed by its name."""
    if len(per_split) == 1:
        return next(iter(per_split.values()))
    return {f"{split}_{name}": value for split, m in per_split.items() for name, value in m.items()}


# ---- the run ----------------------------------------------------------------------------------------------------


@dataclass
class SeedResult:
    seed: int
    epoch: int  # the best epoch, from 1
    metrics: dict[str, float]  # of the best epoch, every validation file
    score: float  # the task's score on the first validation file, which chose the epoch
    checkpoint: Path
    test_metrics: dict[str, float] | None = None
    predictions: Path | None = None
    majority: dict[str, float] = field(default_factory=dict)  # split -> the majority class's share (classification)

    def to_dict(self) -> dict[str, Any]:
        out = {"seed": self.seed, "epoch": self.epoch, "metrics": self.metrics, "checkpoint": str(self.checkpoint),
               "majority_class_rate": self.majority}
        if self.test_metrics is not None:
            out["test_metrics"] = self.test_metrics
        if self.predictions is not None:
            out["predictions"] = str(self.predictions)
        return out


@dataclass
class Result:
    """Every seed's result, with the mean and (sample) standard deviation over seeds of each metric."""

    task: str
    seeds: list[SeedResult]
    metrics: dict[str, float] = field(init=False)
    std: dict[str, float] = field(init=False)
    score: float = field(init=False)
    score_std: float = field(init=False)

    learning_rate: float | None = None
    search: dict[str, float] | None = None  # learning rate -> held-out score, when it was searched for
    test_metrics: dict[str, float] | None = field(init=False, default=None)
    test_std: dict[str, float] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        names = self.seeds[0].metrics
        self.metrics = {k: statistics.fmean(s.metrics[k] for s in self.seeds) for k in names}
        self.std = {k: _std([s.metrics[k] for s in self.seeds]) for k in names}
        if all(s.test_metrics for s in self.seeds):  # a labelled test file: its mean and spread as for dev
            tests = [s.test_metrics for s in self.seeds]
            self.test_metrics = {k: statistics.fmean(t[k] for t in tests) for k in tests[0]}
            self.test_std = {k: _std([t[k] for t in tests]) for k in tests[0]}
        self.score = statistics.fmean(score(s.metrics) for s in self.seeds)
        self.score_std = _std([score(s.metrics) for s in self.seeds])

    def to_dict(self) -> dict[str, Any]:
        out = {"task": self.task, "metrics": self.metrics, "std": self.std, "score": self.score,
               "majority_class_rate": self.seeds[0].majority, "learning_rate": self.learning_rate}
        if self.search is not None:
            out["learning_rate_search"] = self.search
        if self.test_metrics is not None:
            out |= {"test_metrics": self.test_metrics, "test_std": self.test_std}
        return out | {"seeds": [s.seed for s in self.seeds], "per_seed": [s.to_dict() for s in self.seeds]}

    def line(self) -> str:
        """The result in words: each metric (with its spread over seeds), the majority-class rate beside
        accuracy, then the test file's."""
        spread = len(self.seeds) > 1

        def show(metrics: dict[str, float], std: dict[str, float] | None, split: str | None) -> str:
            return ", ".join(f"{k} {v:.4f}" + (f" +- {std[k]:.4f}" if spread and std else "")
                             + majority_note(k, self.seeds[0].majority, split) for k, v in metrics.items())

        first = next(iter(self.seeds[0].majority), None)
        text = show(self.metrics, self.std, first) + (f" over {len(self.seeds)} seeds" if spread else "")
        if self.test_metrics is not None:
            text += "; test " + show(self.test_metrics, self.test_std, "test")
        return text


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def finetune(source: Source, task: Task, metrics: tuple[str, ...], settings: FinetuneSettings, output_dir: Path,
             overwrite: bool = False, say: Callable[[str], None] = print, task_name: str | None = None,
             label: str = "") -> Result:
    """Fine-tune `source` on `task` once per seed; writes under `output_dir`, returns every seed's best epoch.
    `label` starts every progress line (the demo fine-tunes two models, one after the other)."""
    check_metrics(metrics, task)
    device = devices.pick_device()
    max_length = min(settings.max_length, source.dims.max_tokens)
    regression = task.labels.kind == "regression"
    train = encode(task.train, source.tokenizer, max_length, regression)
    validation = [encode(s, source.tokenizer, max_length, regression) for s in task.validation]
    test = encode(task.test, source.tokenizer, max_length, regression) if task.test else None
    name = task_name or task.name or task.train.path.parent.name or task.train.path.stem
    say(f"{name}: {len(train)} training examples, "
        + ", ".join(f"{len(v)} in {v.split.path.name}" for v in validation)
        + (f", {len(test)} in {test.split.path.name} (predicted)" if test else "")
        + (f"; {task.labels.num_outputs} labels ({', '.join(task.labels.names)})" if not regression else
           "; regression")
        + f"; at most {max_length} tokens an example" + (f" ({train.cut} training examples cut)" if train.cut else ""))
    output_dir = Path(output_dir)
    results, search = [], None
    # One run per output folder, as for training's checkpoint folder; taken before anything in it is read or removed.
    with checkpoint.FolderLock(output_dir, flag="--output_dir"):
        prepare_output(output_dir, settings, overwrite)
        if settings.learning_rate is None:
            search = search_learning_rate(source, task, metrics, settings, train, device, max_length)
            best = max(search, key=lambda lr: (search[lr], -float(lr)))  # a tie: the lower rate
            settings = dataclasses.replace(settings, learning_rate=float(best))
            say(f"{label + ': ' if label else ''}learning rate {best}, the best of "
                + ", ".join(f"{lr} ({v:.3f})" for lr, v in search.items())
                + " on held-out training examples (pass --learning_rate to set it)")
        for seed in range(settings.seed, settings.seed + settings.num_seeds):
            results.append(fit(source, task, metrics, settings, seed, train, validation, test,
                               output_dir / f"seed_{seed}", device, max_length, say, label))
    result = Result(name, results, settings.learning_rate, search)
    (output_dir / "results.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def check_metrics(metrics: tuple[str, ...], task: Task) -> None:
    regression = task.labels.kind == "regression"
    for m in metrics:
        if m not in METRICS:
            raise UserError(f"--metric {m!r} is not one of {', '.join(METRICS)}; pass one of those.")
        if (m in ("pearson", "spearman")) != regression:
            kind = "regression" if regression else "classification"
            raise UserError(f"--metric {m} does not score a {kind} task; pass one of "
                            + ", ".join(k for k in METRICS if (k in ("pearson", "spearman")) == regression) + ".")
        if m == "f1" and task.labels.num_outputs != 2:
            raise UserError(f"--metric f1 scores label 1 of a two-label task, and this one has "
                            f"{task.labels.num_outputs} labels; pass --metric macro_f1.")


def prepare_output(output_dir: Path, settings: FinetuneSettings, overwrite: bool) -> None:
    """Refuse to mix a new run's checkpoints with an old one's, unless told to replace them."""
    old = [p for s in range(settings.seed, settings.seed + settings.num_seeds)
           for _, p in checkpoint.list_checkpoints(output_dir / f"seed_{s}")]
    if old and not overwrite:
        raise UserError(f"--output_dir {output_dir} already holds fine-tuned checkpoints ({old[0]}); pass another "
                        "--output_dir, or --overwrite to replace them.")
    checkpoint.ensure_writable(output_dir)
    for p in old:
        p.unlink()


def fit(source: Source, task: Task, metrics: tuple[str, ...], settings: FinetuneSettings, seed: int,
        train: Encoded, validation: list[Encoded], test: Encoded | None, out: Path, device: torch.device,
        max_length: int, say: Callable[[str], None], label: str = "") -> SeedResult:
    """One seed: set up, then `epochs` passes, scoring the validation files after each."""
    who = f"{label} seed {seed}" if label else f"seed {seed}"
    out.mkdir(parents=True, exist_ok=True)
    regression = task.labels.kind == "regression"
    pad_id = source.spec.pad_id
    torch.manual_seed(seed)  # the head's initialisation and dropout
    backbone = MaskedLM(source.dims)
    backbone.load_state_dict(source.weights)
    model = SequenceClassifier(backbone, task.labels.num_outputs, settings.dropout, settings.pooling).to(device)
    if regression:
        model.start_at(float(train.labels.mean()))
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    schedule = TrainingConfig(learning_rate=settings.learning_rate, max_steps=total,
                              warmup_steps=round(settings.warmup_ratio * total), schedule="linear",
                              weight_decay=settings.weight_decay, adam_beta1=0.9, adam_beta2=0.98, adam_eps=1e-6)
    optimizer = build_optimizer(model, schedule, device)
    scheduler = build_scheduler(optimizer, schedule)
    tracker = Tracker(directory=out, total_steps=total, start_step=0, fresh=True,
                      settings=TrackerSettings(log_interval=settings.log_interval, progress=settings.progress))
    autocast = devices.autocast_for(settings.precision, device, note=tracker.write)
    clip = settings.gradient_clip if settings.gradient_clip > 0 else float("inf")
    # The share of the most frequent class in each labelled file: the accuracy of always answering it.
    majority = {} if regression else {v.split.name: majority_rate(v.labels) for v in validation}
    step, best = 0, None
    window, tokens_seen = MetricsWindow(device), 0  # read back (the host waits for the device) at log points only
    model.train()
    try:
        for epoch in range(1, settings.epochs + 1):
            generator = torch.Generator().manual_seed(derive_seed(seed, "finetune", epoch))
            for index in training_batches(train, settings.batch_size, generator):
                ids, mask = collate([train.ids[i] for i in index], pad_id)
                target = train.labels[index].to(device)
                with autocast:
                    logits = model(ids.to(device), mask.to(device))
                loss = (F.mse_loss(logits.float()[:, 0], target) if regression
                        else F.cross_entropy(logits.float(), target))
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                finite = apply_update(optimizer, scheduler, loss.detach(), grad_norm)  # a NaN step is skipped
                step += 1
                tokens_seen += int(mask.sum())
                window.add(loss.detach(), grad_norm, int(mask.sum()), finite)
                tracker.advance()
                if tracker.due(step) or step == total:
                    # the rate this step's update used; the scheduler already holds the next one's
                    lr = schedule.learning_rate * lr_factor(step - 1, schedule)
                    record = window.read(step, lr, tokens_seen, step / steps_per_epoch)
                    if not math.isfinite(record["loss"]):  # every step since the last log point was skipped
                        raise UserError(f"the fine-tuning loss is not finite at step {step} (seed {seed}); lower "
                                        "--learning_rate, or pass --precision fp32.")
                    tracker.log(record, final=step == total)

            # The epoch's scores on every validation file; the first one's task score chooses the epoch.
            per_split, single_class = {}, {}
            for data in validation:
                predictions = decide(predict(model, data, 2 * settings.batch_size, device, autocast, pad_id),
                                     regression)
                per_split[data.split.name] = scores(predictions, data.labels, metrics)
                if not regression and len(data) > 1 and bool((predictions == predictions[0]).all()):
                    single_class[data.split.path.name] = task.labels.names[int(predictions[0])]
            found = validation_metrics(per_split)
            chosen = score(next(iter(per_split.values())))
            better = best is None or chosen > best[1]
            tracker.log_eval({"step": step, "epoch": epoch, **{f"val_{k}": v for k, v in found.items()}},
                             line=f"{who} epoch {epoch}: " + show_metrics(found, majority)
                             + ("  (best so far)" if better and epoch > 1 else ""))
            for data, predictions in single_class.items():
                tracker.write(f"{who} epoch {epoch}: every prediction on {data} is {predictions!r}; the classifier "
                              "has learnt only one class: raise --learning_rate or --epochs.")
            if better:
                state = host_copy(model.state_dict())
                path = save(state, source, task, metrics, settings, seed, step, epoch, found, max_length, out)
                best = (epoch, chosen, found, path, state)
    finally:
        tracker.close()

    epoch, chosen, found, path, state = best
    result = SeedResult(seed, epoch, found, chosen, path, majority=majority)
    say(f"{who}: best epoch {epoch} of {settings.epochs}: " + show_metrics(found, majority) + f"; checkpoint {path}")
    if test is not None:
        model.load_state_dict(state)
        logits = predict(model, test, 2 * settings.batch_size, device, autocast, pad_id)
        predictions = decide(logits, regression)
        result.predictions = write_predictions(test, predictions, task, out)
        if test.labels is not None:
            result.test_metrics = scores(predictions, test.labels, metrics)
            if not regression:
                majority["test"] = majority_rate(test.labels)
            say(f"{who}: {test.split.path.name}: " + show_metrics(result.test_metrics, majority, "test"))
    return result


def majority_rate(labels: torch.Tensor) -> float:
    """The most frequent class's share of `labels`: what a classifier that learnt nothing scores in accuracy."""
    return float(torch.bincount(labels).max()) / len(labels)


def majority_note(metric: str, majority: dict[str, float], split: str | None) -> str:
    """` (majority class 0.2560)` after an accuracy (of `split`, or of a validation file named in the metric)."""
    if not metric.endswith("accuracy"):
        return ""
    name = split if split in majority else next((s for s in majority if metric.startswith(f"{s}_")), None)
    return f" (majority class {majority[name]:.4f})" if name in majority else ""


def show_metrics(found: dict[str, float], majority: dict[str, float], split: str | None = None) -> str:
    split = split or next(iter(majority), None)
    return ", ".join(f"{k} {v:.4f}" + majority_note(k, majority, split) for k, v in found.items())


# Learning rates tried when none is given: a grid of half-decades from RoBERTa-large's GLUE rate (1e-5) to what a
# small, briefly pretrained model needs (5e-4 to 1e-3 measured on the demo's task).
SEARCH_RATES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
SEARCH_TRAIN, SEARCH_HELD_OUT = 2000, 500  # examples: the search costs little beside the run on a large task


def search_learning_rate(source: Source, task: Task, metrics: tuple[str, ...], settings: FinetuneSettings,
                         train: Encoded, device: torch.device, max_length: int) -> dict[str, float]:
    """{rate: held-out score}: each of `SEARCH_RATES` fine-tuned with `settings` (its epochs and warmup) on up to
    2,000 training examples and scored on up to 500 others, all drawn from the training file (the validation
    file stays unseen until the real run). Seeded: the same data gives the same choice."""
    generator = torch.Generator().manual_seed(derive_seed(settings.seed, "lr-search"))
    order = torch.randperm(len(train), generator=generator).tolist()
    held_n = min(SEARCH_HELD_OUT, max(1, len(train) // 5))
    held, fit_on = order[:held_n], order[held_n:held_n + SEARCH_TRAIN]

    def part(index: list[int], name: str) -> Encoded:
        split = dataclasses.replace(train.split, path=train.split.path.with_name(name),
                                    texts=[train.split.texts[i] for i in index], ids=[str(i) for i in index],
                                    labels=[train.split.labels[i] for i in index])
        return Encoded(split, [train.ids[i] for i in index], train.labels[index])

    found = {}
    with tempfile.TemporaryDirectory(prefix="lr-search-") as work:
        for lr in SEARCH_RATES:
            trial = dataclasses.replace(settings, learning_rate=lr, num_seeds=1, progress="lines",
                                        log_interval=1 << 30)  # quiet: only the epochs' lines
            try:
                result = fit(source, task, metrics, trial, settings.seed, part(fit_on, "search_train"),
                             [part(held, "search_held_out")], None, Path(work) / f"{lr:g}", device, max_length,
                             say=lambda _: None, label=f"learning rate {lr:g}:")
            except UserError:  # the loss diverged at this rate: the worst score there is
                found[f"{lr:g}"] = -1.0
                continue
            found[f"{lr:g}"] = result.score
    return found


def save(state: dict[str, torch.Tensor], source: Source, task: Task, metrics: tuple[str, ...],
         settings: FinetuneSettings, seed: int, step: int, epoch: int, found: dict[str, float], max_length: int,
         out: Path) -> Path:
    """The best epoch so far as a checkpoint (atomic); the previous best of this seed is then removed."""
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    snapshot = {
        "model": backbone,
        "classifier": head,
        "step": step,
        "epoch": epoch,
        "dims": dataclasses.asdict(source.dims),
        "tokenizer": {"json": source.tokenizer.to_str(), "mask_spec": dataclasses.asdict(source.spec)},
        "task": {"name": task.name, "family": family_of(source.dims).name, "pooling": settings.pooling,
                 "labels": task.labels.to_dict(), "text_fields": list(task.text_fields),
                 "label_field": task.label_field, "metrics": list(metrics), "max_length": max_length},
        "finetune": {**dataclasses.asdict(settings), "seed": seed, "source": source.origin},
        "metrics": found,
    }
    path = checkpoint.save(snapshot, out, step)
    checkpoint.rotate(out, 1)
    return path


def write_predictions(data: Encoded, predictions: torch.Tensor, task: Task, out: Path) -> Path:
    """GLUE's submission layout: `index<TAB>prediction`, a label name or a number, in the file's order."""
    path = out / f"predictions_{data.split.name}.tsv"
    names = task.labels.names
    lines = ["index\tprediction"]
    for index, p in zip(data.split.ids, predictions.tolist(), strict=True):
        lines.append(f"{index}\t{p:.4f}" if task.labels.kind == "regression" else f"{index}\t{names[p]}")
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- a fine-tuned model, for use ---------------------------------------------------------------------------


@dataclass
class Finetuned:
    """A fine-tuned checkpoint restored: the classifier (in eval mode), its tokenizer, what its outputs mean."""

    model: SequenceClassifier
    tokenizer: Tokenizer
    labels: Labels
    state: dict[str, Any]


def load_finetuned(path: str | Path, device: torch.device) -> Finetuned:
    from encoder_train.state import load_trained

    trained = load_trained(path, device, flag="--checkpoint")
    state = trained.state
    if "classifier" not in state or "task" not in state:
        raise UserError(f"checkpoint {path} holds no classification head (it is not from `encoder-train finetune`); "
                        "pass a checkpoint that fine-tuning wrote.")
    try:
        task = state["task"]
        labels = Labels(task["labels"]["kind"], tuple(task["labels"]["names"]))
        model = SequenceClassifier(trained.model, labels.num_outputs, state["finetune"].get("dropout"),
                                   task["pooling"])
        model.head.load_state_dict(state["classifier"])
    except (KeyError, TypeError, AttributeError, RuntimeError):
        raise UserError(f"checkpoint {path} holds an incomplete or foreign classification head; it was not written "
                        "by this version of `encoder-train finetune`.") from None
    return Finetuned(model.to(device).eval(), trained.tokenizer, labels, state)
