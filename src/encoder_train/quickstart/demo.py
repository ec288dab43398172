"""The quickstart: corpus -> tokenizer -> pre-tokenized shards -> training -> evaluation -> fine-tuning -> report card.

Runs on any machine with Python, no download: the corpus is the documentation that ships with
CPython itself (`pydoc_data.topics` and the standard library's docstrings). Each stage writes into
one work folder and is skipped when its output is already there, so running the demo again resumes
it (training continues from its latest checkpoint, fine-tuning keeps each fine-tune that finished)
instead of starting over. Ctrl-C or SIGTERM stops it with a sentence saying where; progress.json in the
work folder keeps each stage's seconds over every run, so summary.json's time is the demo's total.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from encoder_train.checkpoint import list_checkpoints
from encoder_train.config import BUNDLED_CONFIG_DIR, Config, load_config
from encoder_train.data.prepare import pretokenize
from encoder_train.data.shards import scan_shards
from encoder_train.devices import autocast_for, native_bf16, pick_device
from encoder_train.errors import UserError
from encoder_train.evaluate import evaluate, show_guesses
from encoder_train.quickstart.corpus import write_stdlib_corpus
from encoder_train.quickstart.docstrings import DEMO_SETTINGS, FINETUNES, kept_results, run_demo_stage
from encoder_train.quickstart.learned import TOP_K, MaskedTally, examples, log_frequencies, word_mask
from encoder_train.quickstart.report_card import Card, reading, run_card
from encoder_train.state import load_trained
from encoder_train.tokenizer import train_tokenizer
from encoder_train.train import TrainResult, train

STAGES = ("corpus", "tokenizer", "shards", "training", "evaluation", "fine-tuning", "report card")
EXAMPLES = 4  # held-out words shown after training


@dataclass(frozen=True)
class DemoSettings:
    workdir: Path = Path("runs/demo")
    config_file: Path = BUNDLED_CONFIG_DIR / "demo.yaml"
    vocab_size: int = 8192
    seq_len: int = 128
    corpus_bytes: int | None = None  # cap the corpus (tests); None: all of it
    max_steps: int | None = None  # override the config's training.max_steps (tests)
    val_fraction: float = 0.05


@dataclass(frozen=True)
class Work:
    """The demo's files, all in one folder."""

    root: Path

    @property
    def corpus(self) -> Path:
        return self.root / "corpus.txt"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM outside training (training stops itself at a step's end and says so)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM raises as Ctrl-C does (its default would end the process without a word); both carry the signal."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Progress:
    """What the demo did so far, in work/progress.json: each stage's seconds summed over every run of the demo,
    the number of runs, and the evaluation's results (a rerun reprints them). `this_run` says, per stage, whether
    this run ran it, resumed it or skipped it as done."""

    VERSION = 1  # of what is kept: a file of another version (or unreadable) is started afresh

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            kept = json.loads(path.read_text())
        except (OSError, ValueError):  # none yet; or damaged (it only holds times and numbers to reprint)
            kept = {}
        if not isinstance(kept, dict) or kept.get("version") != self.VERSION:
            kept = {}
        self.seconds: dict[str, float] = kept.get("seconds", {})
        self.runs: int = kept.get("runs", 0) + 1
        self.evaluation: dict[str, Any] | None = kept.get("evaluation")
        self.this_run: dict[str, str] = {}
        self.current = 0  # index in STAGES of the stage running now

    @contextlib.contextmanager
    def stage(self, index: int) -> Iterator[None]:
        """Time stage `index` (its seconds count even when it is stopped) and save the progress after it."""
        self.current, t0 = index, time.perf_counter()
        try:
            yield
        finally:
            name = STAGES[index]
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.save()

    def did(self, what: str) -> None:
        self.this_run[STAGES[self.current]] = what

    def save(self) -> None:
        aside = self.path.with_name(f".{self.path.name}.tmp")  # a kill mid-write leaves the previous file whole
        aside.write_text(json.dumps({"version": self.VERSION, "runs": self.runs, "seconds": self.seconds,
                                     "evaluation": self.evaluation}, indent=2) + "\n")
        aside.replace(self.path)

    def stopped(self, signum: int) -> None:
        print(f"stopped by {signal.Signals(signum).name} during [{self.current + 1}/{len(STAGES)}] "
              f"{STAGES[self.current]}. What finished is kept: run the same encoder-train demo command again to "
              "continue from there.", file=sys.stderr)


def run_demo(s: DemoSettings) -> dict[str, Any]:
    """Run every stage, print where each artefact went; returns the summary written to work/summary.json.

    Stopped by a signal, it returns {"stopped_by": the signal number} instead.
    """
    work = Work(make_workdir(s.workdir))
    progress = Progress(work.root / "progress.json")
    try:
        with stop_on_signals():
            with progress.stage(0):
                make_corpus(s, work, progress)
            with progress.stage(1):
                make_tokenizer(s, work, progress)
            with progress.stage(2):
                make_shards(s, work, progress)
            with progress.stage(3):
                config, trained = pretrain(s, work, progress)
            if trained.stopped_by:  # training said where it stopped and how to continue
                return {"stopped_by": trained.stopped_by}
            checkpoint = trained.checkpoint
            with progress.stage(4):
                evaluation = evaluate_stage(config, checkpoint, work, progress)
            with progress.stage(5):
                finetuned = finetune_stage(config, checkpoint, work, progress)
            with progress.stage(6):
                card = report_card_stage(s, config, checkpoint, work, progress)
    except KeyboardInterrupt as e:  # Stopped, or a second Ctrl-C inside training
        signum = getattr(e, "signum", signal.SIGINT)
        progress.stopped(signum)
        return {"stopped_by": signum}
    return write_summary(work, progress, evaluation, finetuned, card, checkpoint)


def make_workdir(folder: Path) -> Path:
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--workdir {folder} is a file, not a folder; pass a folder for the demo's artefacts (it is "
                        "created if missing).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--workdir {folder} cannot be created ({e.strerror}); pass a folder you can write "
                        "to.") from None
    return folder


def make_corpus(s: DemoSettings, work: Work, progress: Progress) -> None:
    print(f"[1/7] corpus: {work.corpus}")
    if work.corpus.exists():
        print("      already there")
        return progress.did("skipped")
    info = write_stdlib_corpus(work.corpus, max_bytes=s.corpus_bytes)
    print(f"      {info.documents} documents, {info.bytes / 1e6:.1f} MB of CPython's own documentation")
    progress.did("ran")


def make_tokenizer(s: DemoSettings, work: Work, progress: Progress) -> None:
    print(f"[2/7] tokenizer: {work.tokenizer}")
    if work.tokenizer.exists():
        print("      already there")
        return progress.did("skipped")
    # Written aside, then renamed: a demo killed here leaves no half-written tokenizer to skip to later.
    aside = work.tokenizer.with_name(".tokenizer.json.tmp")
    tok = train_tokenizer([work.corpus], aside, vocab_size=s.vocab_size, overwrite=True)
    aside.replace(work.tokenizer)
    print(f"      byte-level BPE, {tok.get_vocab_size()} tokens")
    progress.did("ran")


def make_shards(s: DemoSettings, work: Work, progress: Progress) -> None:
    data = work.data
    print(f"[3/7] shards: {data / 'train'} and {data / 'val'}")
    done = data / ".complete"  # written last: shards from a demo killed mid-way are made again, not trained on
    if done.exists():
        print("      already there")
        progress.did("skipped")
    else:
        report = pretokenize([work.corpus], work.tokenizer, data, seq_len=s.seq_len, val_fraction=s.val_fraction,
                             progress=False, overwrite=True)
        done.write_text("pretokenize finished\n")
        print(f"      {report.train_rows} training rows, {report.val_rows} held-out rows of {s.seq_len} tokens, "
              f"fill ratio {report.fill_ratio:.3f}")
        progress.did("ran")
    if not any((data / "val").glob("*.pt")):
        # Training would stop at its first evaluation's missing folder, naming a flag the demo does not have.
        raise UserError(
            f"the demo's corpus {work.corpus} is too small to hold out any row of {s.seq_len} tokens for evaluation; "
            f"delete {work.corpus}, {work.tokenizer} and {data}, then run the demo again with a larger --corpus_bytes "
            "(100000 or more) or without it."
        )


def pretrain(s: DemoSettings, work: Work, progress: Progress) -> tuple[Config, TrainResult]:
    """Train (or continue training) demo.yaml's model from its latest checkpoint."""
    data = work.data
    overrides = {
        "data.data_dir": str(data / "train"),
        "data.val_data_dir": str(data / "val"),
        "data.tokenizer_filepath": str(work.tokenizer),
        "checkpoint.checkpoint_dir": str(work.checkpoints),
        "checkpoint.load_checkpoint": "latest",
    }
    if s.max_steps is not None:
        # A shorter run keeps the config's warmup share.
        planned = load_config(s.config_file).training
        overrides["training.max_steps"] = s.max_steps
        overrides["training.warmup_steps"] = planned.warmup_steps * s.max_steps // planned.max_steps
    emulated = load_config(s.config_file).training.precision == "bf16" and not native_bf16(pick_device())
    if emulated:  # the demo is meant to take minutes: emulated bf16 would take it to hours
        overrides["training.precision"] = "fp32"
    config = load_config(s.config_file, overrides)
    print(f"[4/7] training ({s.config_file.name}): checkpoints and metrics.jsonl in {work.checkpoints}")
    if emulated:
        print("      this CPU has no native bf16 (it would run many times slower than fp32): training in fp32")
    found = list_checkpoints(work.checkpoints)
    before = found[-1][0] if found else 0
    # The demo passes --load_checkpoint latest itself: after a stop, running it again is all it takes.
    result = train(config, resume_hint="Run the same encoder-train demo command again to continue from it.")
    progress.did("stopped" if result.stopped_by else "skipped" if before >= config.training.max_steps
                 else "resumed" if before else "ran")
    return config, result


def evaluate_stage(config: Config, checkpoint: Path, work: Work, progress: Progress) -> dict[str, Any]:
    """Loss and accuracy, then words of 4+ letters (learned.py), of the trained model against the same model
    untrained; kept in progress.json for this checkpoint, so a rerun reprints them."""
    print("[5/7] evaluation on the held-out rows (fixed masks)")
    kept = progress.evaluation
    if kept is not None and kept["checkpoint"] == str(checkpoint):
        print("      evaluated before:")
        progress.did("skipped")
    else:
        kept = progress.evaluation = held_out_results(config, checkpoint, work.data)
        progress.did("ran")
    show_evaluation(kept)
    return kept


def held_out_results(config: Config, checkpoint: Path, data: Path) -> dict[str, Any]:
    device = pick_device()
    trained = load_trained(checkpoint, device)
    val = scan_shards(data / "val", trained.model.dims.max_tokens)
    autocast = autocast_for(config.training.precision, device)
    batch = config.training.batch_size
    torch.manual_seed(config.training.seed)
    untrained = type(trained.model)(trained.model.dims).to(device).eval()  # the same initialisation as step 0
    words = word_mask(trained)
    log_freq = log_frequencies(scan_shards(data / "train", trained.model.dims.max_tokens), trained.spec)
    results: dict[str, Any] = {"checkpoint": str(checkpoint), "step": trained.state["step"]}
    for name, model in (("untrained", untrained), ("trained", trained.model)):
        tally = MaskedTally(trained.spec, words, log_freq)  # one pass per model: evaluate's
        results[name] = evaluate(model, val, trained.spec, batch_size=batch, device=device, autocast=autocast,
                                 on_batch=tally.add)
        results[f"{name}_masks"] = tally.scores(trained.tokenizer).to_dict()
    # `tally.right`: the trained model's (the last one scored).
    results["examples"] = [e.to_dict() for e in examples(trained, untrained, tally.right, EXAMPLES, device)]
    return results


def show_evaluation(r: dict[str, Any]) -> None:
    before, after = r["untrained"], r["trained"]
    print(f"      untrained model: loss {before['loss']:.3f}, accuracy {before['accuracy']:.3f}, "
          f"perplexity {before['perplexity']:.0f}")
    print(f"      trained model:   loss {after['loss']:.3f}, accuracy {after['accuracy']:.3f}, "
          f"perplexity {after['perplexity']:.1f}   (step {r['step']})")
    mb, ma = r["untrained_masks"], r["trained_masks"]
    common = ", ".join(f"{token!r} {share:.0%}" for token, share in ma["first_guesses"])
    print(f"      where the input is <mask> ({ma['masks']} of the predictions; the others keep their token or get a "
          f"random one):\n"
          f"        loss: untrained {mb['loss']:.3f}, word frequencies alone {ma['frequency_loss']:.3f}, trained "
          f"{ma['loss']:.3f} (below the frequencies: what it reads from the context)\n"
          f"        the trained model's commonest first guesses: {common}\n"
          f"        words of 4+ letters ({ma['words']}): first guess right untrained {mb['word_top1']:.1%}, trained "
          f"{ma['word_top1']:.1%}; in the top {TOP_K} untrained {mb['word_topk']:.1%}, trained {ma['word_topk']:.1%}")
    if not r["examples"]:
        print("      fill-mask gets no held-out word of 4+ letters right yet, so there is none to show; [6/7] shows "
              "what this training gives a classifier.")
        return
    print(f"      the first {len(r['examples'])} of these words that the trained model gets right, in held-out "
          "order, each given to fill-mask in its sentence:")
    for e in r["examples"]:
        print(f"      {e['text']}\n        word {e['word']!r}\n"
              f"        trained:   {show_guesses(e['trained'])}\n        untrained: {show_guesses(e['untrained'])}")


def finetune_stage(config: Config, checkpoint: Path, work: Work, progress: Progress) -> dict[str, Any] | None:
    print("[6/7] fine-tuning the trained and the untrained model: which package a docstring comes from")
    done = [name for name in FINETUNES if name in kept_results(work.root, checkpoint)]
    # In the precision pretraining ran in: fp32 where this CPU would only emulate bf16 (see `pretrain`).
    settings = dataclasses.replace(DEMO_SETTINGS, precision=config.training.precision)
    finetuned = run_demo_stage(work.root, checkpoint, config.training.seed, settings=settings)
    progress.did("skipped: too few docstrings" if finetuned is None else "skipped" if len(done) == len(FINETUNES)
                 else "resumed" if done else "ran")
    return finetuned


def report_card_stage(s: DemoSettings, config: Config, checkpoint: Path, work: Work, progress: Progress) -> Card:
    """The trained model against the untrained one on the offline suite and the held-out rows (report_card.py);
    each (model, task) pair its report holds already is kept, not run again."""
    print("[7/7] report card: the trained and the untrained model on the offline evaluation suite")
    kept: list[str] = []

    def say(line: str) -> None:
        kept.extend([line] if line.endswith("done before, kept") else [])
        print(f"      {line}")

    card = run_card(checkpoint, config.training.seed, work.root, work.data / "val", work.tokenizer, s.seq_len, say)
    pairs = sum(len(tasks) for tasks in card.results.values())
    progress.did("skipped" if kept and len(kept) == pairs else "resumed" if kept else "ran")
    if card.skipped_tasks:
        print(f"      {card.skipped_tasks}")
    if card.failure:
        print(f"      {card.failure}")
    markdown = card.report_dir / "report.md"
    print(f"      {markdown}:\n")
    print("\n".join(f"      {line}".rstrip() for line in markdown.read_text(encoding="utf-8").splitlines()))
    for line in reading(card.results):
        print(f"      {line}")
    return card


def write_summary(work: Work, progress: Progress, evaluation: dict[str, Any], finetuned: dict[str, Any] | None,
                  card: Card, checkpoint: Path) -> dict[str, Any]:
    """work/summary.json: the results, and the time over every run of the demo (a resumed demo's included)."""
    before, after = evaluation["untrained"], evaluation["trained"]
    summary: dict[str, Any] = {
        "untrained_loss": before["loss"], "trained_loss": after["loss"], "trained_accuracy": after["accuracy"],
        "step": evaluation["step"],
        "untrained_mask_loss": evaluation["untrained_masks"]["loss"],
        "frequency_mask_loss": evaluation["trained_masks"]["frequency_loss"],
        "trained_mask_loss": evaluation["trained_masks"]["loss"],
        "trained_word_top1": evaluation["trained_masks"]["word_top1"],
        f"trained_word_top{TOP_K}": evaluation["trained_masks"]["word_topk"],
    }
    if finetuned:
        summary |= {"finetune_trained_accuracy": finetuned["pretrained"]["accuracy"],
                    "finetune_untrained_accuracy": finetuned["untrained"]["accuracy"],
                    "finetune_chance": finetuned["chance"]}
    summary["report_card"] = {"report": str(card.report_dir / "report.md"), "results": card.results}
    summary |= {"seconds": sum(progress.seconds.values()), "runs": progress.runs,
                "stages": {name: {"seconds": round(progress.seconds.get(name, 0.0), 1),
                                  "this_run": progress.this_run.get(name, "not run")} for name in STAGES}}
    (work.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    skipped = [name for name in STAGES if progress.this_run.get(name) == "skipped"]
    runs = f" over {progress.runs} runs of the demo" if progress.runs > 1 else ""
    print(f"done in {summary['seconds']:.0f} s{runs}" + (f" ({', '.join(skipped)} done before)" if skipped else "")
          + f". Artefacts in {work.root}; try:")
    if evaluation["examples"]:
        first = evaluation["examples"][0]
        print(f"  encoder-train fill-mask --checkpoint {shlex.quote(str(checkpoint))} {shlex.quote(first['text'])}\n"
              f"      (a held-out sentence: the trained model's first guess is {first['word']!r}, the word that was "
              "there; try your own)")
    print(f"  encoder-train evaluate --checkpoint {shlex.quote(str(checkpoint))} "
          f"--data_dir {shlex.quote(str(work.data / 'val'))}")
    return summary
