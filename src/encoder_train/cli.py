"""argv -> subcommand -> function call; nothing else.

A `UserError` from anywhere below becomes one line on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from encoder_train.config import FLAG_TO_KEY, load_config, resolve_config_path
from encoder_train.errors import UserError


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain an encoder with masked-language modelling",
        description="Pretrain a BERT/RoBERTa-style encoder on pre-tokenized .pt shards. Flags override the "
        "YAML config, which overrides the schema's defaults.",
    )
    # Every flag defaults to None: only flags the user typed override the YAML file.
    p.add_argument("--config_file", required=True,
                   help="YAML config: a file name in --config_dir, or a path (bundled: tiny.yaml, small.yaml, "
                   "base.yaml, large.yaml)")
    p.add_argument("--config_dir", default=None,
                   help="folder holding --config_file (default: the configs bundled with encoder-train)")
    p.add_argument("--data_dir", default=None, help="folder of training .pt shards, searched recursively")
    p.add_argument("--tokenizer_filepath", default=None, help="Hugging Face tokenizers JSON file (tokenizer.json)")
    p.add_argument("--val_data_dir", default=None,
                   help="folder of held-out .pt shards, evaluated every training.eval_every steps and at the end")
    p.add_argument("--checkpoint_dir", default=None,
                   help="folder for checkpoint_XXXXXXXX.pt files and metrics.jsonl (default: ./checkpoints)")
    p.add_argument("--load_checkpoint", default=None,
                   help="checkpoint file to resume from, or 'latest' for the newest in --checkpoint_dir")
    p.add_argument("--checkpoint_every", type=positive_int, default=None,
                   help="optimizer steps between checkpoints (one is also written at the end)")
    p.add_argument("--max_checkpoints", type=positive_int, default=None,
                   help="how many of the newest checkpoints to keep; older ones are deleted after a new one is saved")
    p.add_argument("--wandb", action="store_true", default=None, help="log to Weights & Biases")
    p.add_argument("--wandb_run_id", default=None,
                   help="W&B run id to resume (default: the run stored in the resumed checkpoint, else a new run)")
    p.add_argument("--wandb_log_freq", type=positive_int, default=None, help="optimizer steps between W&B logs")
    p.add_argument("--wandb_project_name", default=None, help="W&B project (default: encoder-train)")
    p.add_argument("--batch_size", type=positive_int, default=None,
                   help="rows per micro-batch, overriding training.batch_size")
    p.add_argument("--gradient_clip", type=float, default=None,
                   help="max global gradient L2 norm, overriding training.gradient_clip (0 disables)")
    p.set_defaults(func=run_train)


def config_from_args(args: argparse.Namespace):
    overrides = {key: getattr(args, flag) for flag, key in FLAG_TO_KEY.items() if getattr(args, flag, None) is not None}
    return load_config(resolve_config_path(args.config_file, args.config_dir), overrides)


def run_train(args: argparse.Namespace) -> int:
    from encoder_train.train import train  # imports torch: kept out of `--help`

    result = train(config_from_args(args))
    # Stopped by a signal: exit as a shell would (128 + signal), so a job chain does not carry on.
    return 128 + result.stopped_by if result.stopped_by else 0


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="held-out MLM loss, accuracy and perplexity of a checkpoint, as one JSON line",
        description="Evaluate a checkpoint on .pt shards with a fixed, seeded mask (numbers compare across runs "
        "and checkpoints). Prints one JSON line: loss, accuracy, perplexity, tokens (predicted), real_tokens, rows.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file written by `encoder-train train`")
    p.add_argument("--data_dir", required=True, help="folder of held-out .pt shards, searched recursively")
    p.add_argument("--batch_size", type=positive_int, default=32, help="rows per batch (default 32)")
    p.add_argument("--max_batches", type=positive_int, default=None, help="stop after this many batches")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from encoder_train.evaluate import run_evaluate as evaluate_checkpoint
    from encoder_train.train import pick_device

    result = evaluate_checkpoint(args.checkpoint, args.data_dir, args.batch_size, args.max_batches, pick_device())
    print(json.dumps(result))
    return 0


def add_fill_mask_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fill-mask",
        help="the most likely tokens for each <mask> in a text",
        description="Print the top-k tokens, with probabilities, for each <mask> in TEXT.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file written by `encoder-train train`")
    p.add_argument("--tokenizer_filepath", default=None,
                   help="tokenizer.json (default: the tokenizer stored in the checkpoint)")
    p.add_argument("--top_k", type=positive_int, default=5, help="tokens to show per <mask> (default 5)")
    p.add_argument("text", nargs="+", help='text with <mask>, e.g. "The <mask> sat on the mat."')
    p.set_defaults(func=run_fill_mask)


def run_fill_mask(args: argparse.Namespace) -> int:
    from encoder_train.evaluate import fill_mask, load_trained
    from encoder_train.tokenizer import load_tokenizer
    from encoder_train.train import pick_device

    device = pick_device()
    trained = load_trained(args.checkpoint, device)
    if args.tokenizer_filepath:
        trained.tokenizer = load_tokenizer(args.tokenizer_filepath)
    for text in args.text:
        print(text)
        for i, candidates in enumerate(fill_mask(trained, text, args.top_k, device)):
            shown = "  ".join(f"{tok!r} {p:.3f}" for tok, p in candidates)
            print(f"  mask {i + 1}: {shown}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="encoder-train",
        description="Pretrain BERT/RoBERTa-style encoders with masked-language modelling.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(sub)
    add_evaluate_parser(sub)
    add_fill_mask_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"encoder-train: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("encoder-train: interrupted.", file=sys.stderr)
        return 130
