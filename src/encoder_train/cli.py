"""argv -> subcommand -> function call; nothing else.

A `UserError` from anywhere below becomes one line on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from encoder_train import families
from encoder_train.config import BUNDLED_CONFIG_DIR, FLAG_TO_KEY, flag_for, load_config, parse_set, resolve_config_path
from encoder_train.errors import UserError
from encoder_train.urls import local_only, redact, with_credentials


class Parser(argparse.ArgumentParser):
    """argparse, with usage mistakes reported like every other user error: one line, exit code 2."""

    def error(self, message: str, prog: str | None = None) -> None:  # type: ignore[override]
        # An argument may be a URL with credentials (an unknown flag's value too): never repeat them.
        self.exit(2, f"encoder-train: error: {redact(message)}; see `{prog or self.prog} --help`.\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            # A subcommand's unknown arguments surface here, in the top parser: point at that subcommand's help.
            command = getattr(parsed, "command", None)
            self.error(f"unrecognized arguments: {' '.join(extra)}", f"{self.prog} {command}" if command else None)
        return parsed


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def local_path(text: str) -> str:
    """A flag's local file or folder: a URL is refused (`--checkpoint_dir s3://...` would write a folder `s3:`)."""
    why = local_only(text)
    if why:
        raise argparse.ArgumentTypeError(f"{redact(text)} {why}")
    return text


def data_location(text: str) -> str:
    """A data folder: a path or a URL (data/store.py), without credentials in it."""
    why = with_credentials(text)
    if why:
        raise argparse.ArgumentTypeError(f"{redact(text)} {why}")
    return text


def plural(count: int, noun: str) -> str:
    """'1 shard', '2 shards'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain an encoder with masked-language modelling",
        description="Pretrain a BERT/RoBERTa-style encoder on pre-tokenized .pt shards. Flags override the "
        "YAML config, which overrides the schema's defaults.",
    )
    # Every flag defaults to None: only flags the user typed override the YAML file.
    p.add_argument("--config_file", type=local_path, required=True,
                   help="YAML config: a file name in --config_dir, or a path (bundled: "
                   + ", ".join(sorted(p.name for p in BUNDLED_CONFIG_DIR.glob("*.yaml"))) + ")")
    p.add_argument("--config_dir", type=local_path, default=None,
                   help="folder holding --config_file (default: the configs bundled with encoder-train)")
    p.add_argument("--data_dir", type=data_location, default=None,
                   help="folder (or s3://, gs://, hf:// URL) of training .pt shards, searched recursively")
    p.add_argument("--tokenizer_filepath", type=local_path, default=None,
                   help="Hugging Face tokenizers JSON file (tokenizer.json)")
    p.add_argument("--val_data_dir", type=data_location, default=None,
                   help="folder (or URL) of held-out .pt shards, evaluated every training.eval_every steps and at "
                        "the end")
    p.add_argument("--checkpoint_dir", type=local_path, default=None,
                   help="folder for checkpoints (checkpoint_XXXXXXXX.pt files, or sharded checkpoint_XXXXXXXX/ "
                   "folders) and metrics.jsonl (default: ./checkpoints)")
    p.add_argument("--init_from_hf", type=local_path, default=None,
                   help="start from a local Hugging Face RoBERTa, BERT or ModernBERT masked-LM folder (weights, "
                   "config.json, tokenizer); "
                   "the YAML's training section still applies")
    p.add_argument("--load_checkpoint", type=local_path, default=None,
                   help="checkpoint file or sharded checkpoint folder to resume from, or 'latest' for the newest in "
                   "--checkpoint_dir")
    p.add_argument("--checkpoint_every", type=positive_int, default=None,
                   help="optimizer steps between checkpoints (one is also written at the end)")
    p.add_argument("--max_checkpoints", type=positive_int, default=None,
                   help="how many of the newest checkpoints to keep; older ones are deleted after a new one is saved")
    p.add_argument("--wandb", action="store_true", default=None, help="log to Weights & Biases")
    p.add_argument("--wandb_run_id", default=None,
                   help="W&B run id to resume (default: the run stored in the resumed checkpoint, else a new run)")
    p.add_argument("--wandb_log_freq", type=positive_int, default=None, help="optimizer steps between W&B logs")
    p.add_argument("--wandb_project_name", default=None, help="W&B project (default: encoder-train)")
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="write TensorBoard event files to CHECKPOINT_DIR/tensorboard (the tensorboard extra)")
    p.add_argument("--progress", choices=["auto", "bar", "lines"], default=None,
                   help="a progress bar, or one plain line per training.log_interval (for logs written to a file); "
                   "auto (default): the bar on a terminal, lines otherwise")
    p.add_argument("--batch_size", type=positive_int, default=None,
                   help="rows per micro-batch, overriding training.batch_size")
    p.add_argument("--gradient_clip", type=float, default=None,
                   help="max global gradient L2 norm, overriding training.gradient_clip (0 disables)")
    p.add_argument("--max_steps", type=positive_int, default=None,
                   help="optimizer steps, overriding training.max_steps; with phases (whose lengths set the run's), "
                   "the step at which a trial run stops, its schedule unchanged")
    p.add_argument("--learning_rate", type=float, default=None,
                   help="peak learning rate, overriding training.learning_rate")
    p.add_argument("--seed", type=int, default=None, help="overrides training.seed")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="overrides training.precision")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", dest="set_items",
                   help="override any config key at any depth (repeatable), e.g. --set training.warmup_steps=100, "
                   "--set data.sources.web.data_dir=s3://bucket/web, --set phases.1.steps=4 (a phase by index or "
                   "name); values are YAML, validated like the file's")
    p.add_argument("--restart_source", action="append", default=[], metavar="NAME",
                   help="on resume, read this data source again from its beginning (repeatable): the way to continue "
                   "after its files changed, which is otherwise refused")
    p.add_argument("--dry_run", action="store_true",
                   help="print the resolved config, the model's size, the data and the plan (each phase's steps, "
                   "tokens, mix and schedule; each source's size and epochs read), then exit without training "
                   "(nothing is written)")
    p.set_defaults(func=run_train)


def config_from_args(args: argparse.Namespace):
    overrides = {key: getattr(args, flag) for flag, key in FLAG_TO_KEY.items() if getattr(args, flag, None) is not None}
    origins: dict[str, str] = {}
    for key, (value, origin) in parse_set(getattr(args, "set_items", [])).items():
        if key in overrides:
            raise UserError(f"{key} is set both by {flag_for(key)} and by {origin}; pass one of them.")
        overrides[key], origins[key] = value, origin
    return load_config(resolve_config_path(args.config_file, args.config_dir), overrides, origins)


def run_train(args: argparse.Namespace) -> int:
    from encoder_train.train import train  # imports torch: kept out of `--help`

    result = train(config_from_args(args), dry_run=args.dry_run, restart_sources=tuple(args.restart_source))
    # Stopped by a signal: exit as a shell would (128 + signal), so a job chain does not carry on.
    return 128 + result.stopped_by if result.stopped_by else 0


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="held-out MLM loss, accuracy and perplexity of a checkpoint, as one JSON line",
        description="Evaluate a checkpoint on .pt shards with a fixed, seeded mask (numbers compare across runs "
        "and checkpoints). Prints one JSON line: loss, accuracy, perplexity, tokens (predicted), real_tokens, rows.",
    )
    p.add_argument("--checkpoint", type=local_path, required=True,
                   help="checkpoint file (or sharded checkpoint folder) written by `encoder-train train`")
    p.add_argument("--data_dir", type=data_location, required=True,
                   help="folder (or s3://, gs://, hf:// URL) of held-out .pt shards, searched recursively")
    p.add_argument("--batch_size", type=positive_int, default=32, help="rows per batch (default 32)")
    p.add_argument("--max_batches", type=positive_int, default=None, help="stop after this many batches")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from encoder_train.devices import pick_device
    from encoder_train.evaluate import run_evaluate as evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.data_dir, args.batch_size, args.max_batches, pick_device())
    print(json.dumps(result))
    return 0


def add_fill_mask_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fill-mask",
        help="the most likely tokens for each <mask> in a text",
        description="Print the top-k tokens, with probabilities, for each <mask> in TEXT.",
    )
    p.add_argument("--checkpoint", type=local_path, required=True,
                   help="checkpoint file (or sharded checkpoint folder) written by `encoder-train train`")
    p.add_argument("--tokenizer_filepath", type=local_path, default=None,
                   help="tokenizer.json with the same vocabulary as the checkpoint's (default: the tokenizer "
                   "stored in the checkpoint)")
    p.add_argument("--top_k", type=positive_int, default=5,
                   help="tokens to show per <mask> (default 5; more than the vocabulary's non-special tokens "
                   "shows them all)")
    p.add_argument("text", nargs="+", help='text with <mask>, e.g. "The <mask> sat on the mat."')
    p.set_defaults(func=run_fill_mask)


def run_fill_mask(args: argparse.Namespace) -> int:
    from encoder_train.devices import pick_device
    from encoder_train.evaluate import check_same_vocabulary, fill_mask, show_guesses
    from encoder_train.state import load_trained
    from encoder_train.tokenizer import load_tokenizer

    device = pick_device()
    trained = load_trained(args.checkpoint, device, flag="--checkpoint")
    if args.tokenizer_filepath:
        tokenizer = load_tokenizer(args.tokenizer_filepath)
        check_same_vocabulary(trained, tokenizer, args.tokenizer_filepath, args.checkpoint)
        trained.tokenizer = tokenizer
    # Every text is checked (and filled) before anything is printed: an error leaves stdout empty.
    filled = [(text, fill_mask(trained, text, args.top_k, device)) for text in args.text]
    for text, masks in filled:
        print(text)
        for i, candidates in enumerate(masks):
            print(f"  mask {i + 1}: {show_guesses(candidates)}")
    return 0


def add_input_flags(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The text both `tokenizer` and `pretokenize` read: the files, and the field that holds the text."""
    p.add_argument("--input", type=data_location, nargs="+", required=required, metavar="PATH",
                   help="text, .jsonl or .parquet files; .gz and .zst (e.g. x.jsonl.zst) are decompressed as read "
                   "(.parquet needs the parquet extra, .zst the zstd extra); paths, globs (raw/**/*.jsonl), and "
                   "s3://, gs://, hf:// URLs and URL globs (s3://bucket/raw/**/*.jsonl.zst), streamed")
    p.add_argument("--text_field", default="text", metavar="NAME",
                   help="the field of each .jsonl object, and the Parquet column, that holds the text (default text)")


def add_tokenizer_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer (RoBERTa's) or a WordPiece one (BERT's) on text",
        description="Train a byte-level BPE tokenizer with RoBERTa's special tokens (<s> <pad> </s> <unk> <mask>) "
        "and post-processing (<s> A </s>), or with --type wordpiece BERT's cased WordPiece ([PAD] [UNK] [CLS] [SEP] "
        "[MASK], [CLS] A [SEP]), from plain-text (paragraphs separated by blank lines), .jsonl (a \"text\" field), "
        "Parquet (a \"text\" column; --text_field names another) and .gz or .zst files of text or .jsonl, "
        "streaming. The output loads with tokenizers.Tokenizer.from_file.",
    )
    add_input_flags(p)
    p.add_argument("--output", type=local_path, default="tokenizer.json",
                   help="where to write the tokenizer (default tokenizer.json; refused when it exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--vocab_size", type=positive_int, default=50265,
                   help="vocabulary size including the 5 special tokens (default 50265, RoBERTa's)")
    p.add_argument("--min_frequency", type=positive_int, default=2,
                   help="merge only pairs seen at least this often (default 2)")
    kinds = {k: [f.name for f in families.FAMILIES.values() if f.tokenizer_type == k] for k in ("bpe", "wordpiece")}
    p.add_argument("--type", choices=tuple(kinds), default="bpe", dest="kind",
                   help=f"bpe: RoBERTa's byte-level BPE (default; model.family {', '.join(kinds['bpe'])}); wordpiece: "
                   f"BERT's (model.family {', '.join(kinds['wordpiece'])}; BERT uses --vocab_size 30522)")
    p.add_argument("--max_bytes", type=positive_int, default=None, metavar="N",
                   help="train on at most N bytes of text, an equal share from the start of each input (a file with "
                   "less passes the rest on); reading stops there (default: all of it)")
    p.add_argument("--sample_rate", type=float, default=None, metavar="P",
                   help="keep each document with probability P, by a seeded hash of its text: the same sample every "
                   "time (default 1)")
    p.add_argument("--sample_seed", type=int, default=0, metavar="S",
                   help="the seed of --sample_rate's hash (default 0)")
    p.set_defaults(func=run_tokenizer)


def run_tokenizer(args: argparse.Namespace) -> int:
    from pathlib import Path

    from encoder_train.data.inputs import expand_inputs
    from encoder_train.textsample import SampleReport, Sampling
    from encoder_train.tokenizer import train_tokenizer

    sampled = args.max_bytes is not None or args.sample_rate is not None
    sample = Sampling(args.max_bytes, 1.0 if args.sample_rate is None else args.sample_rate,
                      args.sample_seed) if sampled else None
    report = SampleReport()
    tok = train_tokenizer(expand_inputs(args.input), Path(args.output), args.vocab_size, args.min_frequency,
                          overwrite=args.overwrite, text_field=args.text_field, kind=args.kind, sample=sample,
                          report=report)
    print(f"wrote {args.output}: {tok.get_vocab_size()} tokens"
          + (" (the text ran out of merges before --vocab_size)" if tok.get_vocab_size() < args.vocab_size else "")
          + (f", trained on a sample of {report.documents:,} documents, {report.text_bytes:,} bytes of text"
             if sampled else ""))
    return 0


def add_pretokenize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretokenize",
        help="tokenize text into packed .pt shards for `train`",
        description="Tokenize text into rows of --seq_len tokens packed as RoBERTa's FULL-SENTENCES (documents "
        "run on across rows, separated by </s>), written as .pt shards in OUTPUT_DIR/train and OUTPUT_DIR/val "
        "(--folders names them otherwise: a recipe's source web reads shards/web and shards/web-val, which "
        "--output_dir shards --folders web web-val writes). "
        "Uses every CPU core (set RAYON_NUM_THREADS to use fewer); the same input gives the same shards. Reads "
        "plain text (paragraphs separated by blank lines), .jsonl (a \"text\" field), Parquet (a \"text\" column; "
        "--text_field names another) and .gz or .zst files of text or .jsonl, streaming.",
    )
    add_input_flags(p, required=False)
    p.add_argument("--tokenizer_filepath", type=local_path, default=None,
                   help="tokenizer.json to tokenize with (required, except with --verify)")
    p.add_argument("--output_dir", type=data_location, required=True,
                   help="folder (or s3://, gs://, hf:// URL) for the train/ and val/ shards (or the two --folders)")
    p.add_argument("--folders", nargs=2, default=["train", "val"], metavar=("TRAIN", "VAL"),
                   help="the folders under --output_dir for the training and the held-out shards (default train "
                   "val); a source's data_dir and val_data_dir, e.g. --output_dir shards --folders web web-val")
    needs = "; ".join(f.positions_needed for f in families.FAMILIES.values())
    p.add_argument("--seq_len", type=positive_int, default=512,
                   help=f"tokens per row including <s> and </s> (or [CLS] and [SEP]; default 512). The model needs "
                   f"max_position_embeddings of at least {needs}; --config_file checks it")
    p.add_argument("--rows_per_shard", type=positive_int, default=8192, help="rows per .pt file (default 8192)")
    p.add_argument("--val_fraction", type=float, default=0.01,
                   help="share of rows held out in OUTPUT_DIR/val (default 0.01; 0 holds out none)")
    p.add_argument("--config_file", type=local_path, default=None,
                   help="optional config: refuse a --seq_len longer than its model's positions")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards already in --output_dir (they stay until the new ones are all written; "
                   "one machine, a local folder, no tasks)")
    p.add_argument("--num_tasks", type=positive_int, default=None,
                   help="split the inputs (by file: input k goes to task k mod N) into N tasks, each run by its own "
                   "command (default: SLURM_ARRAY_TASK_COUNT in a SLURM array job); writes OUTPUT_DIR/manifest.json "
                   "when the last is done, and a rerun skips finished tasks")
    p.add_argument("--task_index", type=int, default=None,
                   help="which task this command runs, 0 to N-1 (default: SLURM_ARRAY_TASK_ID)")
    p.add_argument("--on_bad_input", choices=("stop", "skip"), default="stop",
                   help="a damaged or unreadable input file among many: stop and name it (default), or skip the rest "
                   "of it, recorded in the task's record (tasks only)")
    p.add_argument("--verify", action="store_true",
                   help="check --output_dir against its manifest.json (every shard present, of its size and sha256, "
                   "none unlisted): exit 0 when whole, 2 naming each shard that is not")
    p.set_defaults(func=run_pretokenize)


def run_pretokenize(args: argparse.Namespace) -> int:
    from encoder_train.data.prepare import pretokenize

    if args.verify:
        return run_verify(args)
    for flag, value in (("--input", args.input), ("--tokenizer_filepath", args.tokenizer_filepath)):
        if not value:
            raise UserError(f"pretokenize needs {flag} (only --verify goes without it); see `encoder-train "
                            "pretokenize --help`.")
    max_positions = None
    if args.config_file:
        from encoder_train.state import model_dims
        from encoder_train.tokenizer import load_tokenizer, special_tokens

        config = load_config(resolve_config_path(args.config_file, None))
        tokenizer = load_tokenizer(args.tokenizer_filepath)
        pad = special_tokens(tokenizer, args.tokenizer_filepath).pad
        dims = model_dims(config.model, tokenizer.get_vocab_size(), pad, str(args.config_file))
        dims.check_row_length(args.seq_len, f"--seq_len {args.seq_len} with the model of {args.config_file}",
                              f", or pass --seq_len {dims.max_tokens} or less")
        max_positions = dims.max_tokens
    from encoder_train.data.inputs import expand_inputs
    from encoder_train.urls import is_remote

    inputs = expand_inputs(args.input)
    tasks = (args.num_tasks is not None or args.task_index is not None or "SLURM_ARRAY_TASK_COUNT" in os.environ
             or is_remote(args.output_dir))
    if tasks:
        return run_pretokenize_task(args, inputs)
    if args.on_bad_input == "skip":
        raise UserError("--on_bad_input skip is for a run in tasks (it records what it skipped in the task's "
                        "record); add --num_tasks 1, or repair or leave out the damaged file.")
    report = pretokenize(inputs, args.tokenizer_filepath, args.output_dir, args.seq_len,
                         rows_per_shard=args.rows_per_shard, val_fraction=args.val_fraction,
                         overwrite=args.overwrite, max_positions=max_positions, progress=sys.stderr.isatty(),
                         text_field=args.text_field, folders=tuple(args.folders))
    held_out = (f"{plural(report.val_rows, 'held-out row')} in {plural(report.val_shards, 'shard')} to "
                f"{report.val_dir}" if report.val_rows else "no held-out rows")
    print(f"wrote {plural(report.train_rows, 'training row')} in {plural(report.train_shards, 'shard')} to "
          f"{report.train_dir} and {held_out}; fill ratio {report.fill_ratio:.4f}; "
          f"{report.megabytes_per_second:.1f} MB/s")
    print(f"train on them with --data_dir {report.train_dir}"
          + (f" --val_data_dir {report.val_dir}" if report.val_rows else "")
          + f", or as a recipe's source: {{data_dir: {report.train_dir}"
          + (f", val_data_dir: {report.val_dir}}}" if report.val_rows else "}"))
    return 0


def run_pretokenize_task(args: argparse.Namespace, inputs: list) -> int:
    """One task of `pretokenize --num_tasks N` (data/tasks.py), then the manifest once every task is done."""
    from encoder_train.data.tasks import run_task, tasks_from_environment

    if args.overwrite:
        raise UserError("--overwrite is for a one-machine run into a local folder; tasks never replace shards they "
                        "did not write: choose another --output_dir, or empty this one.")
    num_tasks, task_index = tasks_from_environment(args.num_tasks, args.task_index)
    result = run_task(inputs, args.tokenizer_filepath, args.output_dir, args.seq_len, args.rows_per_shard,
                      args.val_fraction, args.text_field, tuple(args.folders), num_tasks, task_index,
                      on_bad_input=args.on_bad_input, progress=sys.stderr.isatty())
    report = result.report
    if report is None:
        print(f"task {task_index} of {num_tasks} was done before (its completion record is in "
              f"{args.output_dir}/.pretokenize/completions); nothing to do")
    else:
        print(f"task {task_index} of {num_tasks}: wrote {plural(report.train_rows, 'training row')} in "
              f"{plural(report.train_shards, 'shard')} to {report.train_dir} and "
              f"{plural(report.val_rows, 'held-out row')} in {plural(report.val_shards, 'shard')} to "
              f"{report.val_dir}; {plural(report.documents, 'document')}, "
              f"{plural(report.tokens, 'token')}; fill ratio {report.fill_ratio:.4f}; "
              f"{report.megabytes_per_second:.1f} MB/s")
    if result.manifest is not None:
        totals = result.manifest.totals
        print(f"all {num_tasks} tasks are done: wrote {args.output_dir}/manifest.json "
              f"({plural(totals.shards, 'shard')}, {plural(totals.rows, 'row')}, {plural(totals.tokens, 'token')}); "
              "check it with `encoder-train pretokenize"
              f" --verify --output_dir {args.output_dir}`")
    else:
        print(f"{result.pending} of {num_tasks} tasks are not done yet; the last to finish writes the manifest")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from encoder_train.data.tasks import verify

    manifest = verify(args.output_dir)
    totals = manifest.totals
    print(f"{args.output_dir} matches its manifest: {plural(totals.shards, 'shard')}, {plural(totals.rows, 'row')}, "
          f"{plural(totals.tokens, 'token')}")
    return 0


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the quickstart: train a small encoder on CPython's own documentation, no download",
        description="Build a corpus from the documentation that ships with Python, train a tokenizer, "
        "pre-tokenize, train the bundled demo.yaml model, evaluate it against an untrained one and against word "
        "frequencies alone, then fine-tune both on a docstring classification task, and end with their report card "
        "on the offline evaluation suite. Running it again resumes where it stopped.",
    )
    p.add_argument("--workdir", type=local_path, default="runs/demo",
                   help="folder for every artefact (default runs/demo)")
    p.add_argument("--max_steps", type=positive_int, default=None, help="override demo.yaml's training.max_steps")
    p.add_argument("--corpus_bytes", type=positive_int, default=None, help="cap the corpus at this many bytes")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from encoder_train.quickstart.demo import DemoSettings, run_demo

    summary = run_demo(DemoSettings(workdir=Path(args.workdir), max_steps=args.max_steps,
                                    corpus_bytes=args.corpus_bytes))
    stopped = summary.get("stopped_by")
    return 128 + stopped if stopped else 0  # stopped by a signal: exit as `train` does


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face RobertaForMaskedLM, BertForMaskedLM or ModernBertForMaskedLM folder",
        description="Write config.json, model.safetensors and the tokenizer so that "
        "transformers.AutoModelForMaskedLM.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR) and "
        "pipeline('fill-mask', model=DIR) work. Needs pip install 'encoder-train[hf]'.",
    )
    add_export_flags(p, "checkpoint file (or sharded checkpoint folder) written by `encoder-train train`")
    p.set_defaults(func=run_export)


def add_export_flags(p: argparse.ArgumentParser, checkpoint_help: str) -> None:
    """The flags both exports take: the checkpoint, the folder to write, and whether to replace an earlier one."""
    p.add_argument("--checkpoint", type=local_path, required=True, help=checkpoint_help)
    p.add_argument("--output_dir", type=local_path, required=True, help="folder to write (refused when it holds files)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output_dir")


def run_export(args: argparse.Namespace) -> int:
    from encoder_train.hf import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output_dir, overwrite=args.overwrite)
    print(f"wrote {out}: load it with transformers.AutoModelForMaskedLM.from_pretrained({str(out)!r}), or for "
          f"sentence embeddings (mean pooling) with sentence_transformers.SentenceTransformer({str(out)!r})")
    return 0


def add_consolidate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "consolidate",
        help="turn a sharded checkpoint folder into a single checkpoint file",
        description="Join the shards of a sharded checkpoint (a checkpoint_XXXXXXXX/ folder written under FSDP2 or "
        "with checkpoint.format: sharded) into one checkpoint_XXXXXXXX.pt file, in this process alone (no torchrun): "
        "the same training state, verified, which every command reads and `train --load_checkpoint` resumes.",
    )
    p.add_argument("--checkpoint", type=local_path, required=True, help="the sharded checkpoint folder")
    p.add_argument("--output", type=local_path, required=True, help="the file to write (refused when it exists)")
    p.set_defaults(func=run_consolidate)


def run_consolidate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from encoder_train import checkpoint
    from encoder_train.model import ModelDims
    from encoder_train.state import check_weights_fit

    source, output = Path(args.checkpoint), Path(args.output)
    if not (source.is_dir() and (source / checkpoint.MARKER).exists()):
        raise UserError(f"--checkpoint {source} is not a sharded checkpoint folder (one with {checkpoint.MARKER}); "
                        "pass a checkpoint_XXXXXXXX/ folder that `train` wrote.")
    if output.exists() or output.is_symlink():
        raise UserError(f"--output {output} exists; pass a new file name (nothing is overwritten).")
    state = checkpoint.load(source, flag="--checkpoint")
    check_weights_fit(state["model"], ModelDims(**state["dims"]), source)  # what every reader of the file needs
    del state["sharded_checkpoint"]
    try:  # the folder of --output is made as `train` makes --checkpoint_dir
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output {output} cannot be written: its folder {output.parent} cannot be created "
                        f"({e.strerror}); pass a file in a folder that exists or can be made.") from None
    written = checkpoint.save_as(state, output)
    print(f"wrote {written}: step {state['step']}, {len(state['model'])} model tensors, from {source}")
    return 0


def add_finetune_source_flags(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=local_path,
                        help="checkpoint file written by `encoder-train train` (or by finetune)")
    source.add_argument("--init_from_hf", type=local_path, default=None,
                        help="a local Hugging Face masked-LM folder instead (an `encoder-train export`, or a released "
                        "RoBERTa-, BERT- or ModernBERT-style model)")


def add_finetune_setting_flags(p: argparse.ArgumentParser) -> None:
    """Hyper-parameters: each defaults to the task's own (glue.py) or FinetuneSettings' default."""
    p.add_argument("--learning_rate", type=float, default=None, help="peak learning rate (2e-5; GLUE: per task)")
    p.add_argument("--batch_size", type=positive_int, default=None, help="examples per step (default 32)")
    p.add_argument("--epochs", type=positive_int, default=None, help="passes over the training file (default 3)")
    p.add_argument("--warmup_ratio", type=float, default=None, help="share of the steps spent warming up (0.06)")
    p.add_argument("--weight_decay", type=float, default=None, help="AdamW weight decay (0.1)")
    p.add_argument("--max_length", type=positive_int, default=None,
                   help="tokens per example with <s> and </s>, longer texts are cut (512, at most the model's)")
    p.add_argument("--gradient_clip", type=float, default=None, help="max gradient L2 norm, 0 disables (1.0)")
    p.add_argument("--dropout", type=float, default=None, help="dropout in the head (default: the model's)")
    p.add_argument("--pooling", choices=["cls", "mean"], default=None,
                   help="ModernBERT's head: pool the CLS token (default) or the mean of the tokens")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default bf16")
    p.add_argument("--seed", type=int, default=None, help="the first seed (default 0)")
    p.add_argument("--num_seeds", type=positive_int, default=None,
                   help="runs with seeds seed, seed + 1, ...; the result is their mean and standard deviation")
    p.add_argument("--log_interval", type=positive_int, default=None, help="steps between metrics.jsonl records")
    p.add_argument("--progress", choices=["auto", "bar", "lines"], default=None,
                   help="a progress bar, or one plain line per --log_interval (for logs written to a file); auto "
                   "(default): the bar on a terminal, lines otherwise")
    p.add_argument("--overwrite", action="store_true", help="replace fine-tuned checkpoints already in --output_dir")


FINETUNE_SETTINGS = ("learning_rate", "batch_size", "epochs", "warmup_ratio", "weight_decay", "max_length",
                     "gradient_clip", "dropout", "pooling", "precision", "seed", "num_seeds", "log_interval",
                     "progress")


def finetune_source(args: argparse.Namespace):
    from encoder_train.finetune.loop import source_from_checkpoint, source_from_hf

    return source_from_hf(args.init_from_hf) if args.init_from_hf else source_from_checkpoint(args.checkpoint)


def add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained encoder for sentence (pair) classification or regression",
        description="Fine-tune a checkpoint with a classification or regression head on a .tsv (GLUE's layout), "
        ".csv or .jsonl training file; keep the best epoch on the validation file; print its metrics, the last "
        "line as one JSON object.",
    )
    add_finetune_source_flags(p)
    p.add_argument("--train_file", type=local_path, required=True, help=".tsv (with a header), .csv or .jsonl")
    p.add_argument("--validation_file", type=local_path, required=True, nargs="+",
                   help="one file or more (MNLI: dev_matched.tsv dev_mismatched.tsv); the first chooses the epoch")
    p.add_argument("--test_file", type=local_path, default=None,
                   help="predicted with the best epoch into predictions_NAME.tsv (scored too if it has labels)")
    p.add_argument("--task", default=None,
                   help="a GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli): its columns, labels, "
                   "metrics and hyper-parameters")
    p.add_argument("--text_fields", nargs="+", default=None, metavar="COLUMN",
                   help="the text column, or two for a sentence pair (default: sentence1 sentence2, sentence, "
                   "text, ... whichever the file has)")
    p.add_argument("--label_field", default=None, help="the label column (default: label)")
    p.add_argument("--regression", action="store_true",
                   help="the labels are scores to predict (without it, labels with a decimal point mean regression)")
    p.add_argument("--metric", nargs="+", default=None,
                   choices=["accuracy", "f1", "macro_f1", "matthews", "pearson", "spearman"],
                   help="scores to report (default: the GLUE task's; else accuracy, or pearson spearman for "
                   "regression); the first file's mean of them chooses the best epoch")
    p.add_argument("--output_dir", type=local_path, default=None, help="default runs/finetune/TASK")
    add_finetune_setting_flags(p)
    p.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from encoder_train.finetune.glue import resolve_task
    from encoder_train.finetune.loop import FinetuneSettings, finetune

    task, metrics, defaults = resolve_task(args.train_file, args.validation_file, args.test_file, args.task,
                                           args.text_fields, args.label_field, args.regression, args.metric)
    given = {k: getattr(args, k) for k in FINETUNE_SETTINGS if getattr(args, k) is not None}
    settings = FinetuneSettings(**{**defaults, **given})
    source = finetune_source(args)
    name = task.name or Path(args.train_file).parent.name or Path(args.train_file).stem
    out = Path(args.output_dir) if args.output_dir else Path("runs/finetune") / name
    result = finetune(source, task, metrics, settings, out, overwrite=args.overwrite, task_name=name)
    print(f"{name}: {result.line()}; results in {out}")
    print(json.dumps(result.to_dict()))
    return 0


def add_glue_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "glue",
        help="fine-tune and score a checkpoint on every GLUE task in a folder (GLUE's download layout)",
        description="Run every task found in DATA_DIR (CoLA/, SST-2/, MRPC/, QQP/, STS-B/, MNLI/, QNLI/, RTE/, "
        "WNLI/ with train.tsv and dev.tsv, as GLUE's download lays them out) with each task's documented "
        "hyper-parameters, score the dev sets with GLUE's metrics and print a table with the GLUE average. "
        "Nothing is downloaded.",
    )
    add_finetune_source_flags(p)
    p.add_argument("--data_dir", type=local_path, required=True, help="the folder of GLUE's download")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="only these tasks (default: all found)")
    p.add_argument("--output_dir", type=local_path, default="runs/glue", help="one folder per task (default runs/glue)")
    add_finetune_setting_flags(p)
    p.set_defaults(func=run_glue)


def run_glue(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from encoder_train.finetune.glue import run_glue as glue

    given = {k: getattr(args, k) for k in FINETUNE_SETTINGS if getattr(args, k) is not None}
    summary = glue(finetune_source(args), Path(args.data_dir), Path(args.output_dir), given, args.tasks,
                   overwrite=args.overwrite)
    print(json.dumps(summary))
    return 0


def add_export_classifier_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-classifier",
        help="write a fine-tuned checkpoint as a Hugging Face sequence-classification folder",
        description="Write config.json (with the labels), model.safetensors and the tokenizer so that "
        "pipeline('text-classification', model=DIR) works: RobertaForSequenceClassification or "
        "ModernBertForSequenceClassification, after the model's family. Needs pip install 'encoder-train[hf]'.",
    )
    add_export_flags(p, "checkpoint file written by `encoder-train finetune`")
    p.set_defaults(func=run_export_classifier)


def run_export_classifier(args: argparse.Namespace) -> int:
    from encoder_train.finetune.export import export_classifier

    out = export_classifier(args.checkpoint, args.output_dir, overwrite=args.overwrite)
    print(f"wrote {out}: serve it with transformers.pipeline('text-classification', model={str(out)!r})")
    return 0


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score models and checkpoints on a suite of tasks (mlm, classification, ...) into a report card",
        description="Evaluate every --model on every task of SUITE (docs/evaluation.md): DIR/report.json, "
        "DIR/report.md and, for a run's checkpoint folder, a plot per metric across its checkpoints. The report is "
        "written as each (model, task) finishes; a rerun skips what is done. Nothing is downloaded.",
    )
    p.add_argument("--suite", type=local_path, required=True, help="the suite YAML (tasks: {NAME: {kind: ...}})")
    p.add_argument("--model", action="append", default=None, metavar="NAME=PATH",
                   help="a model: a checkpoint file or sharded folder, a run's checkpoint folder (its phase ends "
                   "and its last checkpoint, as NAME@STEP) or a Hugging Face folder; repeat for more")
    p.add_argument("--output_dir", type=local_path, required=True, help="where the report (and exports) go")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: a GPU when there is one)")
    p.add_argument("--watch", type=local_path, default=None, metavar="RUN_CHECKPOINT_DIR",
                   help="instead of --model: evaluate a training run's kept checkpoints as they appear, record the "
                   "results with the run (TensorBoard, W&B) and stop when it is done (docs/evaluation.md)")
    p.add_argument("--every", type=int, default=None, metavar="N",
                   help="with --watch: also the checkpoints of steps that are multiples of N")
    p.add_argument("--poll_seconds", type=float, default=30.0, help="with --watch: seconds between looks")
    p.add_argument("--name", default=None, help="with --watch: the run's name in the report (RUNNAME@STEP; default: "
                   "the folder's name)")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from encoder_train.evaluation.models import model_rows
    from encoder_train.evaluation.runner import failures_sentence, run_suite
    from encoder_train.evaluation.suite import load_suite

    if args.watch is not None:
        return run_eval_watch(args)
    if args.every is not None or args.name is not None:
        raise UserError("--every and --name go with --watch RUN_CHECKPOINT_DIR; leave them out with --model (a run "
                        "folder given as --model gives its phase ends and its last checkpoint).")
    if not args.model:
        raise UserError("eval needs at least one --model NAME=PATH; pass the checkpoint, run folder or Hugging Face "
                        "folder to evaluate.")
    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a device; pass cpu, cuda or cuda:N.") from None
    rows = model_rows(args.model)  # before the suite's files are read: a typo in a path is the quicker news
    suite = load_suite(Path(args.suite))
    report = run_suite(suite, rows, Path(args.output_dir), device=device)
    failed = failures_sentence(report, rows, suite)
    if failed:
        raise UserError(failed)
    print(f"report: {Path(args.output_dir) / 'report.md'}")
    return 0


def run_eval_watch(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from encoder_train.evaluation.suite import load_suite
    from encoder_train.evaluation.watch import watch

    if args.model:
        raise UserError("eval takes --watch RUN_CHECKPOINT_DIR or --model NAME=PATH, not both; evaluate the other "
                        "models with a command of their own.")
    if args.poll_seconds <= 0:
        raise UserError(f"--poll_seconds {args.poll_seconds:g} must be a positive number of seconds (e.g. 30).")
    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a device; pass cpu, cuda or cuda:N.") from None
    suite = load_suite(Path(args.suite))
    watch(Path(args.watch), suite, Path(args.output_dir), every=args.every, poll_seconds=args.poll_seconds,
          name=args.name, device=device)
    return 0


def add_eval_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval-data",
        help="write the offline evaluation suite and its data (from Python's own docstrings, no download)",
        description="Write DIR/offline.yaml (the bundled configs/eval/offline.yaml) and the files its tasks read, "
        "beside it: a retrieval task (a docstring's first sentence finds the rest of it), training pairs from other "
        "modules, and scored sentence pairs. Files already there are kept when they are the same and refused when "
        "they differ. Then: encoder-train eval --suite DIR/offline.yaml ...",
    )
    p.add_argument("--output_dir", type=local_path, required=True, help="the folder to write the suite and data into")
    p.set_defaults(func=run_eval_data)


def run_eval_data(args: argparse.Namespace) -> int:
    from encoder_train.evaluation.offline import write_offline_data

    made = write_offline_data(args.output_dir)
    print(f"wrote {made.suite} and its data beside it: retrieval {made.queries} queries over {made.documents} "
          f"documents, {made.train_pairs} training pairs; sts {made.sts_pairs} scored pairs, {made.sts_train_pairs} "
          f"training pairs")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="encoder-train",
        description="Pretrain BERT/RoBERTa-style encoders with masked-language modelling.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_parser(sub)
    add_tokenizer_parser(sub)
    add_pretokenize_parser(sub)
    add_train_parser(sub)
    add_evaluate_parser(sub)
    add_fill_mask_parser(sub)
    add_export_parser(sub)
    add_consolidate_parser(sub)
    add_finetune_parser(sub)
    add_glue_parser(sub)
    add_export_classifier_parser(sub)
    add_eval_parser(sub)
    add_eval_data_parser(sub)
    return parser


def rank_prefix() -> str:
    """`[rank 3] ` under torchrun, to say which rank failed (torchrun then stops the others); else nothing.
    Read as plain text: a stray WORLD_SIZE without RANK (or not a number) must not hide the message."""
    world = os.environ.get("WORLD_SIZE", "1").strip()
    return f"[rank {os.environ.get('RANK', '?')}] " if world not in ("", "0", "1") else ""


# The commands that compute, and those of them that print their CPU thread count at start (evaluate and fill-mask
# print only their answer).
COMPUTES = ("train", "evaluate", "fill-mask", "finetune", "glue", "demo", "eval")
SAYS_THREADS = ("train", "finetune", "glue", "demo", "eval")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in COMPUTES:
            from encoder_train.threads import configure

            line = configure()  # before torch starts OpenMP (the commands import it lazily)
            if args.command in SAYS_THREADS and os.environ.get("RANK", "0") == "0":
                print(line, flush=True)
        return args.func(args)
    except UserError as e:
        print(f"{rank_prefix()}encoder-train: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("encoder-train: interrupted.", file=sys.stderr)
        return 130
