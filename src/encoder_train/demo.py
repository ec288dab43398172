"""The quickstart: corpus -> tokenizer -> pre-tokenized shards -> training -> evaluation -> fill-mask -> fine-tuning.

Runs on any machine with Python, no download: the corpus is the documentation that ships with
CPython itself (`pydoc_data.topics` and the standard library's docstrings). Each stage writes into
one work folder and is skipped when its output is already there, so running the demo again resumes
it (training continues from its latest checkpoint) instead of starting over.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from encoder_train.config import BUNDLED_CONFIG_DIR, load_config
from encoder_train.corpus import write_stdlib_corpus
from encoder_train.data.prepare import pretokenize
from encoder_train.data.shards import scan_shards
from encoder_train.devices import autocast_for, pick_device
from encoder_train.errors import UserError
from encoder_train.evaluate import evaluate, fill_mask
from encoder_train.finetune.docstrings import run_demo_stage
from encoder_train.state import load_trained
from encoder_train.tokenizer import train_tokenizer
from encoder_train.train import train

FILL_MASK_EXAMPLES = (
    "Return a new <mask> containing the items of the iterable.",
    "The import statement is used to load a <mask>.",
    "Raise a ValueError if the <mask> is not found.",
    "Open a file and return a file <mask>.",
)


@dataclass(frozen=True)
class DemoSettings:
    workdir: Path = Path("runs/demo")
    config_file: Path = BUNDLED_CONFIG_DIR / "demo.yaml"
    vocab_size: int = 8192
    seq_len: int = 128
    corpus_bytes: int | None = None  # cap the corpus (tests); None: all of it
    max_steps: int | None = None  # override the config's training.max_steps (tests)
    val_fraction: float = 0.05


def show_guesses(guesses: list[tuple[str, float]]) -> str:
    """`'list' 0.31, '\\n' 0.12`: words without the space that starts them; whitespace tokens escaped, not blank."""
    return ", ".join(f"{t.strip() or t!r} {p:.2f}" for t, p in guesses)


def run_demo(s: DemoSettings) -> dict[str, float]:
    """Run every stage, print where each artefact went; returns the untrained and trained held-out losses.

    A training stopped by a signal returns {"stopped_by": the signal number} instead.
    """
    t0 = time.perf_counter()
    work = s.workdir
    if work.exists() and not work.is_dir():
        raise UserError(f"--workdir {work} is a file, not a folder; pass a folder for the demo's artefacts (it is "
                        "created if missing).")
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--workdir {work} cannot be created ({e.strerror}); pass a folder you can write to.") from None
    corpus, tok_path, data = work / "corpus.txt", work / "tokenizer.json", work / "data"
    ckpt_dir = work / "checkpoints"

    print(f"[1/6] corpus: {corpus}")
    if not corpus.exists():
        info = write_stdlib_corpus(corpus, max_bytes=s.corpus_bytes)
        print(f"      {info.documents} documents, {info.bytes / 1e6:.1f} MB of CPython's own documentation")
    else:
        print("      already there")

    print(f"[2/6] tokenizer: {tok_path}")
    if not tok_path.exists():
        # Written aside, then renamed: a demo killed here leaves no half-written tokenizer to skip to later.
        aside = tok_path.with_name(".tokenizer.json.tmp")
        tok = train_tokenizer([corpus], aside, vocab_size=s.vocab_size, overwrite=True)
        aside.replace(tok_path)
        print(f"      byte-level BPE, {tok.get_vocab_size()} tokens")
    else:
        print("      already there")

    print(f"[3/6] shards: {data / 'train'} and {data / 'val'}")
    done = data / ".complete"  # written last: shards from a demo killed mid-way are made again, not trained on
    if not done.exists():
        report = pretokenize([corpus], tok_path, data, seq_len=s.seq_len, val_fraction=s.val_fraction,
                             progress=False, overwrite=True)
        done.write_text("pretokenize finished\n")
        print(f"      {report.train_rows} training rows, {report.val_rows} held-out rows of {s.seq_len} tokens, "
              f"fill ratio {report.fill_ratio:.3f}")
    else:
        print("      already there")
    if not any((data / "val").glob("*.pt")):
        # Training would stop at its first evaluation's missing folder, naming a flag the demo does not have.
        raise UserError(
            f"the demo's corpus {corpus} is too small to hold out any row of {s.seq_len} tokens for evaluation; "
            f"delete {corpus}, {tok_path} and {data}, then run the demo again with a larger --corpus_bytes "
            "(100000 or more) or without it."
        )

    overrides = {
        "data.data_dir": str(data / "train"),
        "data.val_data_dir": str(data / "val"),
        "data.tokenizer_filepath": str(tok_path),
        "checkpoint.checkpoint_dir": str(ckpt_dir),
        "checkpoint.load_checkpoint": "latest",
    }
    if s.max_steps is not None:
        # A shorter run keeps the config's warmup share.
        planned = load_config(s.config_file).training
        overrides["training.max_steps"] = s.max_steps
        overrides["training.warmup_steps"] = planned.warmup_steps * s.max_steps // planned.max_steps
    config = load_config(s.config_file, overrides)
    print(f"[4/6] training ({s.config_file.name}): checkpoints and metrics.jsonl in {ckpt_dir}")
    # The demo passes --load_checkpoint latest itself: after a stop, running it again is all it takes.
    result = train(config, resume_hint="Run the same encoder-train demo command again to continue from it.")
    if result.stopped_by:
        return {"stopped_by": result.stopped_by}

    print("[5/6] evaluation on the held-out rows (fixed masks)")
    device = pick_device()
    trained = load_trained(result.checkpoint, device)
    val = scan_shards(data / "val", trained.model.dims.max_tokens)
    autocast = autocast_for(config.training.precision, device)
    batch = config.training.batch_size
    torch.manual_seed(config.training.seed)
    untrained_model = type(trained.model)(trained.model.dims).to(device)  # the same initialisation as step 0
    before = evaluate(untrained_model, val, trained.spec, batch_size=batch, device=device, autocast=autocast)
    after = evaluate(trained.model, val, trained.spec, batch_size=batch, device=device, autocast=autocast)
    print(f"      untrained model: loss {before['loss']:.3f}, accuracy {before['accuracy']:.3f}, "
          f"perplexity {before['perplexity']:.0f}")
    print(f"      trained model:   loss {after['loss']:.3f}, accuracy {after['accuracy']:.3f}, "
          f"perplexity {after['perplexity']:.1f}   (step {trained.state['step']})")
    for text in FILL_MASK_EXAMPLES:
        guesses = fill_mask(trained, text, top_k=3, device=device)[0]
        print(f"      {text}\n        -> {show_guesses(guesses)}")

    print("[6/6] fine-tuning the trained and the untrained model: which package a docstring comes from")
    finetuned = run_demo_stage(work, result.checkpoint, config.training.seed)
    summary = {"untrained_loss": before["loss"], "trained_loss": after["loss"], "trained_accuracy": after["accuracy"],
               "step": trained.state["step"], "seconds": time.perf_counter() - t0}
    if finetuned:
        summary |= {"finetune_trained_accuracy": finetuned["pretrained"]["accuracy"],
                    "finetune_untrained_accuracy": finetuned["untrained"]["accuracy"],
                    "finetune_chance": finetuned["chance"]}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done in {summary['seconds']:.0f} s. Artefacts in {work}; try:\n"
          f"  encoder-train fill-mask --checkpoint {result.checkpoint} \"Return the <mask> of the list.\"\n"
          f"  encoder-train evaluate --checkpoint {result.checkpoint} --data_dir {data / 'val'}")
    return summary
