"""encoder-train's side of a speed benchmark: `train(config)` from a small YAML file, timed from metrics.jsonl.

The config is loaded through `load_config`, as the CLI loads it; training logs every step, and each
metrics.jsonl record's tokens and tokens/s give that step's wall time.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from workload import MASK_PROBABILITY, Timing, Workload, quietly

from encoder_train.config import load_config
from encoder_train.train import train


def encoder_train_config(run_dir: Path, data_dir: Path, tokenizer: Path, w: Workload) -> Path:
    """A small YAML config file for this run; train() gets it through load_config like the CLI does."""
    model = {
        "vocab_size": w.size.vocab,  # exactly the HF model's (no rounding up to a multiple of 64)
        "hidden_size": w.size.hidden,
        "num_layers": w.size.layers,
        "num_heads": w.size.heads,
        "intermediate_size": w.size.ffn,
        "max_position_embeddings": w.seq_len + 2,  # RoBERTa's offset: positions start after the pad id
    }
    if w.size.family != "roberta":
        # The family key sets the rest of the architecture; rotary positions count from 0: the longest row.
        model = {"family": w.size.family, **model, "max_position_embeddings": w.seq_len}
    raw = {
        "model": model,
        "data": {
            "data_dir": str(data_dir),
            "tokenizer_filepath": str(tokenizer),
            "mask_probability": MASK_PROBABILITY,
            "shuffle_files": 1,
        },
        "training": {
            "batch_size": w.batch,
            "max_steps": w.total_steps,
            "learning_rate": w.lr,
            "warmup_steps": w.lr_warmup,
            "schedule": "linear",
            "adam_beta2": 0.98,
            "adam_eps": 1e-6,
            "weight_decay": 0.01,
            "gradient_clip": 1.0,
            "precision": w.precision,
            "seed": w.seed,
            "log_interval": 1,  # a record per step: its tokens and tokens/s give its time
            "compile": w.compile,
        },
        # Only the final checkpoint is written, after the last timed step.
        "checkpoint": {"checkpoint_dir": str(run_dir / "checkpoints"), "checkpoint_every": w.total_steps + 1},
    }
    path = run_dir / "config.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_encoder_train(
    run_dir: Path, data_dir: Path, tokenizer: Path, w: Workload, verbose: bool = False
) -> tuple[Timing, Path]:
    """Train W + N steps; time steps W+1..W+N from metrics.jsonl. Returns the timing and the final checkpoint."""
    config_file = encoder_train_config(run_dir, data_dir, tokenizer, w)
    result = quietly(lambda: train(load_config(config_file)), verbose)
    if result.stopped_by is not None:
        raise RuntimeError(f"encoder-train was stopped by signal {result.stopped_by} at step {result.step}")
    records = [json.loads(line) for line in (run_dir / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    seen = {r["step"]: r for r in records if "tokens_per_second" in r}  # training records, not evaluations
    timing = Timing([], [])
    for step in range(w.warmup + 1, w.total_steps + 1):
        tokens = seen[step]["tokens_seen"] - seen[step - 1]["tokens_seen"]
        timing.step_seconds.append(tokens / seen[step]["tokens_per_second"])  # the step's wall time
        timing.step_tokens.append(tokens)
    assert result.checkpoint is not None
    return timing, result.checkpoint
