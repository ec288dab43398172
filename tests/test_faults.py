"""Crash safety: SIGKILL at random moments, SIGTERM, late resumes, hostile files, and bad input.

The fault tests run the real CLI as a subprocess and kill it; the resumed runs must end with weights
identical, bit for bit, to a run never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import MASK, PAD, make_shards
from encoder_train import checkpoint
from encoder_train.batch import MaskSpec
from encoder_train.cli import main
from encoder_train.data.loader import BatchStream
from encoder_train.data.mixture import MLMBatches
from encoder_train.data.order import RowOrder
from encoder_train.data.shards import scan_shards
from helpers import wandb_records

CONFIG = """
model: {hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, max_position_embeddings: 130}
data: {num_workers: 1}
training: {batch_size: 8, gradient_accumulation_steps: 2, max_steps: STEPS, learning_rate: 3.0e-3, warmup_steps: 3,
           precision: PRECISION, log_interval: 1}
checkpoint: {checkpoint_every: 4, max_checkpoints: 2}
"""


def command(cfg: Path, data: Path, tok: Path, ckpt: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "encoder_train", "train", "--config_file", str(cfg), "--data_dir", str(data),
            "--tokenizer_filepath", str(tok), "--checkpoint_dir", str(ckpt), *extra]


def logged_steps(ckpt: Path) -> int:
    try:
        return len((ckpt / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def final_weights(ckpt: Path, step: int) -> dict[str, torch.Tensor]:
    return checkpoint.load(checkpoint.checkpoint_path(ckpt, step))["model"]


def env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_exact(tmp_path, shard_dir, tokenizer_file, precision):
    steps = 60
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.replace("STEPS", str(steps)).replace("PRECISION", precision))
    straight = tmp_path / "straight"
    subprocess.run(command(cfg, shard_dir, tokenizer_file, straight), check=True, capture_output=True, env=env())

    rng = random.Random(1234 if precision == "fp32" else 4321)
    faulty = tmp_path / "faulty"
    kills = 0
    for target in sorted(rng.sample(range(2, steps - 2), 3)):
        proc = subprocess.Popen(command(cfg, shard_dir, tokenizer_file, faulty, "--load_checkpoint", "latest"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
        deadline = time.monotonic() + 120
        while logged_steps(faulty) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))  # somewhere in a step, or in a checkpoint write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    done = subprocess.run(command(cfg, shard_dir, tokenizer_file, faulty, "--load_checkpoint", "latest"),
                          capture_output=True, text=True, env=env())
    assert done.returncode == 0, done.stderr[-2000:]

    a, b = final_weights(straight, steps), final_weights(faulty, steps)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    # No step was logged twice, and none is missing.
    steps_logged = [json.loads(line)["step"] for line in (faulty / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))
    assert not [p for p in faulty.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_sigterm_checkpoints_exits_and_resumes_the_same_wandb_run(tmp_path, shard_dir, tokenizer_file):
    steps = 40
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.replace("STEPS", str(steps)).replace("PRECISION", "fp32").replace(
        "checkpoint_every: 4", "checkpoint_every: 1000"))
    straight = tmp_path / "straight"
    subprocess.run(command(cfg, shard_dir, tokenizer_file, straight), check=True, capture_output=True, env=env())

    ckpt = tmp_path / "ckpt"
    args = command(cfg, shard_dir, tokenizer_file, ckpt, "--load_checkpoint", "latest", "--wandb",
                   "--wandb_log_freq", "1")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    deadline = time.monotonic() + 120
    while logged_steps(ckpt) < 7 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "Resume with the same command." in err  # it has --load_checkpoint latest already
    saved = checkpoint.list_checkpoints(ckpt)
    assert len(saved) == 1 and 7 <= saved[0][0] < steps  # written at the stop, not at checkpoint_every

    done = subprocess.run(args, capture_output=True, text=True, env=env())
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = final_weights(straight, steps), final_weights(ckpt, steps)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # One W&B run, continued: steps keep increasing across both sessions, with no duplicates.
    assert len(wandb_records.run_ids(ckpt / "wandb")) == 1
    logged = [h["_step"] for h in wandb_records.history(ckpt / "wandb")]
    assert logged == list(range(1, steps + 1))


def test_a_late_resume_reads_no_consumed_data(tmp_path):
    make_shards(tmp_path, files=4, rows=16, width=32)
    shards = scan_shards(tmp_path, 128)
    spec = MaskSpec(pad_id=PAD, mask_id=MASK, special_ids=(0, 1, 2, 3, 4), vocab_size=128, probability=0.15)
    # One file per shuffle window: epoch e visits the files in a seeded order, file by file.
    epoch = 1_000_000
    order = RowOrder(shards, seed=0, shuffle_files=1)
    first_rows = [order.locate(epoch * 64 + 16 * w) for w in range(4)]
    visit = [f for f, _ in first_rows]
    assert sorted(visit) == [0, 1, 2, 3]
    # Ruin the files this epoch has already consumed: any read of them would fail validation.
    for f in visit[:2]:
        t = torch.load(shards[f].path, weights_only=True)
        torch.save(torch.full_like(t, 10_000), shards[f].path)
    ds = MLMBatches(shards, spec, batch_size=8, seed=0, shuffle_files=1, start_row=epoch * 64 + 32)
    stream = BatchStream(ds, num_workers=1, prefetch=2, pin_memory=False)
    try:
        batches = [next(stream) for _ in range(4)]  # the rest of this epoch: files visit[2] and visit[3]
    finally:
        stream.close()
    assert [b.first_row for b in batches] == [epoch * 64 + 32 + 8 * i for i in range(4)]


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_code_is_refused_and_never_runs(capsys, tmp_path, shard_dir, tokenizer_file):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker), "step": 1}, evil)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.replace("STEPS", "4").replace("PRECISION", "fp32"))
    rc = main(["train", "--config_file", str(cfg), "--data_dir", str(shard_dir), "--tokenizer_filepath",
               str(tokenizer_file), "--checkpoint_dir", str(tmp_path / "ck"), "--load_checkpoint", str(evil)])
    err = capsys.readouterr().err
    assert rc == 2 and "refuses" in err and "Traceback" not in err
    assert not marker.exists()


def test_latest_skips_a_damaged_newest_checkpoint(capsys, tmp_path, shard_dir, tokenizer_file):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.replace("STEPS", "8").replace("PRECISION", "fp32"))
    ckpt = tmp_path / "ck"
    base = ["train", "--config_file", str(cfg), "--data_dir", str(shard_dir), "--tokenizer_filepath",
            str(tokenizer_file), "--checkpoint_dir", str(ckpt)]
    assert main(base) == 0
    good = torch.load(ckpt / "checkpoint_00000008.pt", weights_only=True)["model"]
    newest = ckpt / "checkpoint_00000008.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    newest.write_bytes(bytes(data))
    capsys.readouterr()
    assert main([*base, "--load_checkpoint", "latest"]) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint_00000008.pt" in out and "at step 4" in out
    redone = torch.load(newest, weights_only=True)["model"]
    assert all(torch.equal(good[k], redone[k]) for k in good)  # the damaged file was replaced by a good one


def test_repeated_nonfinite_loss_stops_with_the_last_checkpoint_intact(capsys, tmp_path, shard_dir, tokenizer_file):
    cfg = tmp_path / "run.yaml"
    # A learning rate that overflows float32 makes the weights, then the loss, non-finite.
    cfg.write_text(CONFIG.replace("STEPS", "30").replace("PRECISION", "fp32").replace("3.0e-3", "1.0e+30")
                   .replace("warmup_steps: 3", "warmup_steps: 0"))
    ckpt = tmp_path / "ck"
    rc = main(["train", "--config_file", str(cfg), "--data_dir", str(shard_dir), "--tokenizer_filepath",
               str(tokenizer_file), "--checkpoint_dir", str(ckpt), "--gradient_clip", "0"])
    captured = capsys.readouterr()
    assert rc == 2
    assert "not finite for 5 steps in a row" in captured.err and "update skipped" in captured.err
    for _, path in checkpoint.list_checkpoints(ckpt):
        checkpoint.load(path)  # every checkpoint left behind still verifies


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--checkpoint_every", "0"], "--checkpoint_every: must be a positive integer, got 0"),
        (["--max_checkpoints", "0"], "--max_checkpoints: must be a positive integer, got 0"),
        (["--batch_size", "-4"], "--batch_size: must be a positive integer, got -4"),
        (["--gradient_clip", "-1"], "--gradient_clip -1.0 is invalid"),
    ],
)
def test_bad_flags_are_one_line_exit_2(tmp_path, shard_dir, tokenizer_file, flags, message):
    r = subprocess.run(command(Path("tiny.yaml"), shard_dir, tokenizer_file, tmp_path / "ck", *flags),
                       capture_output=True, text=True, env=env())
    assert r.returncode == 2 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_a_nonfinite_step_is_skipped_on_the_device_and_training_goes_on(capsys, tmp_path, shard_dir, tokenizer_file,
                                                                         monkeypatch):
    """Step 3's loss is NaN: the update is skipped on the device (weights and AdamW state as after step 2), the
    host hears of it at the next log point, and the steps after it train normally."""
    from encoder_train import train as train_module

    real, calls = train_module.forward_backward, []

    def nan_on_third(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_module, "forward_backward", nan_on_third)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.replace("STEPS", "6").replace("PRECISION", "fp32").replace("data: {num_workers: 1}", "")
                   .replace("log_interval: 1", "log_interval: 3"))
    ckpt = tmp_path / "ck"
    rc = main(["train", "--config_file", str(cfg), "--data_dir", str(shard_dir), "--tokenizer_filepath",
               str(tokenizer_file), "--checkpoint_dir", str(ckpt), "--checkpoint_every", "1", "--max_checkpoints", "9"])
    err = capsys.readouterr().err
    assert rc == 0 and "steps 1-3: the loss or gradient norm was not finite in 1 of them; update skipped" in err
    assert "steps 4-6" not in err  # reported once, at the log point after it
    states = {s: checkpoint.load(p) for s, p in checkpoint.list_checkpoints(ckpt)}
    assert all(torch.equal(states[2]["model"][k], states[3]["model"][k]) for k in states[2]["model"])
    assert not all(torch.equal(states[3]["model"][k], states[4]["model"][k]) for k in states[3]["model"])
    steps_2 = [int(v["step"]) for v in states[2]["optimizer"]["state"].values()]
    assert steps_2 == [int(v["step"]) for v in states[3]["optimizer"]["state"].values()]
    lines = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in lines)  # averages over the finite steps only
