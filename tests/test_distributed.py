"""Data-parallel training under real `torchrun` processes, gloo on the CPU."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_shards, make_tokenizer, tree
from helpers.launch import TORCHRUN, config, run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    return make_shards(root / "data"), make_tokenizer(root / "tok.json")


def weights(ckpt: Path, step: int = 10) -> dict[str, torch.Tensor]:
    return torch.load(ckpt / f"checkpoint_{step:08d}.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, inputs):
    run([sys.executable], config(tmp_path, "one", batch=16, dropout=0.0), inputs, tmp_path / "one")
    r = run(TORCHRUN, config(tmp_path, "two", batch=8, dropout=0.0), inputs, tmp_path / "two")
    assert "global batch 32 rows per step = 8 per micro-batch x 2 accumulation x 2 processes (ddp)" in r.stdout
    assert r.stdout.count("resolved config:") == 1  # only rank 0 prints
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    one = (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
    two = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(one) == len(two) == 10  # rank 0 alone writes metrics, with the global loss
    for x, y in zip(one, two, strict=True):
        assert json.loads(y)["loss"] == pytest.approx(json.loads(x)["loss"], rel=1e-5)
        assert json.loads(y)["tokens_seen"] == json.loads(x)["tokens_seen"]


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_same_weights(tmp_path, inputs):
    cfg = config(tmp_path, "ddp")
    run(TORCHRUN, cfg, inputs, tmp_path / "straight")

    ckpt = tmp_path / "killed"
    proc = run(TORCHRUN, cfg, inputs, ckpt, start_new_session=True, stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (ckpt / "checkpoint_00000005.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = tree(proc.pid)  # torchrun starts each worker in a session of its own: kill theirs too
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
    proc.wait()
    if (ckpt / "checkpoint_00000010.pt").exists():  # it finished first: resume from the middle instead
        (ckpt / "checkpoint_00000010.pt").unlink()
    r = run(TORCHRUN, cfg, inputs, ckpt, "--load_checkpoint", "latest")
    assert "resuming from" in r.stdout
    a, b = weights(tmp_path / "straight"), weights(ckpt)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed 2-process run differs from the uninterrupted one"

    # The same checkpoint resumed by one process: it works, and says what changes.
    solo = tmp_path / "solo"
    solo.mkdir()
    shutil.copy(ckpt / "checkpoint_00000005.pt", solo)
    r = run([sys.executable], cfg, inputs, solo, "--load_checkpoint", "latest")
    assert "resuming 2 processes' run with 1" in r.stdout and (solo / "checkpoint_00000010.pt").exists()


@pytest.mark.slow
def test_fsdp2_trains_checkpoints_and_resumes(tmp_path, inputs):
    """FSDP2 with the gathered single-file format (sharded folders: tests/test_sharded_checkpoints.py)."""
    cfg = config(tmp_path, "fsdp", dropout=0.0, parallel="fsdp")
    cfg.write_text(cfg.read_text().replace("max_checkpoints: 5}", "max_checkpoints: 5, format: single}"))
    r = run(TORCHRUN, cfg, inputs, tmp_path / "straight")
    assert "(fsdp)" in r.stdout
    run(TORCHRUN, config(tmp_path, "ddp", dropout=0.0), inputs, tmp_path / "ddp")
    full = weights(tmp_path / "straight")
    for k, v in weights(tmp_path / "ddp").items():  # sharding changes nothing but memory
        torch.testing.assert_close(full[k], v, rtol=1e-5, atol=1e-6, msg=k)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(tmp_path / "straight" / "checkpoint_00000005.pt", resumed)
    run(TORCHRUN, cfg, inputs, resumed, "--load_checkpoint", "latest")
    again = weights(resumed)
    for k in full:
        torch.testing.assert_close(again[k], full[k], rtol=1e-6, atol=1e-7, msg=k)


def test_an_error_on_one_rank_ends_the_job_with_the_rank_shown(tmp_path, inputs):
    blocker = tmp_path / "blocker"
    blocker.write_text("")  # rank 0 alone checks that the checkpoint folder is writable
    start = time.monotonic()
    r = run(TORCHRUN, config(tmp_path, "err"), inputs, blocker / "ckpt", check=False)
    assert r.returncode != 0
    assert "[rank 0] encoder-train: error: checkpoint folder" in r.stderr and "not writable" in r.stderr
    assert time.monotonic() - start < 240  # ended, not hung
