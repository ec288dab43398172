"""`encoder-train train` as child processes: one plain process, or two under a real `torchrun` (gloo on the CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
CONFIG = """
model: {hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, max_position_embeddings: 130,
        dropout: DROPOUT, attention_dropout: DROPOUT}
data: {num_workers: 1}
training: {batch_size: BATCH, gradient_accumulation_steps: 2, max_steps: 10, learning_rate: 3.0e-3, warmup_steps: 2,
           precision: fp32, log_interval: 1, data_parallel: PARALLEL}
checkpoint: {checkpoint_every: 5, max_checkpoints: 5}
"""


def config(tmp_path: Path, name: str, batch: int = 8, dropout: float = 0.1, parallel: str = "ddp") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(CONFIG.replace("BATCH", str(batch)).replace("DROPOUT", str(dropout)).replace("PARALLEL", parallel))
    return p


def run(launcher: list[str], cfg: Path, inputs, ckpt: Path, *extra: str, check: bool = True, **popen):
    """`launcher` (TORCHRUN, or [sys.executable] for one process) running `train` on inputs = (data, tokenizer).
    With `popen` keywords: the started Popen; else the finished run, asserted to succeed unless check=False."""
    data, tok = inputs
    args = [*launcher, "-m", "encoder_train", "train", "--config_file", str(cfg), "--data_dir", str(data),
            "--tokenizer_filepath", str(tok), "--checkpoint_dir", str(ckpt), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(args, env=env, **popen)
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
