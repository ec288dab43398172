"""A training run as a child process: a tiny config, its command line and environment; the one-sentence error it
ends with; what it wrote to TensorBoard."""

from __future__ import annotations

import os
import sys
from pathlib import Path

CONFIG = """
model: {hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, max_position_embeddings: 130}
data: {num_workers: WORKERS}
training: {batch_size: 8, max_steps: STEPS, learning_rate: 3.0e-3, warmup_steps: 2, precision: fp32, log_interval: 1}
checkpoint: {checkpoint_every: EVERY, max_checkpoints: 2}
"""


def config(tmp_path: Path, steps: int = 20, every: int = 10, workers: int = 0) -> Path:
    p = tmp_path / f"run_{steps}_{every}_{workers}.yaml"
    p.write_text(CONFIG.replace("STEPS", str(steps)).replace("EVERY", str(every)).replace("WORKERS", str(workers)))
    return p


def command(cfg: Path, data: Path, tok: Path, ckpt: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "encoder_train", "train", "--config_file", str(cfg), "--data_dir", str(data),
            "--tokenizer_filepath", str(tok), "--checkpoint_dir", str(ckpt), *extra]


def env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def one_sentence(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("encoder-train: error:")]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    return lines[0]


def tensorboard_steps(folder: Path, tag: str = "loss") -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]
