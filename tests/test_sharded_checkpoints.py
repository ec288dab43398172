"""Sharded checkpoints: every rank writes its own shards (torch.distributed.checkpoint) in the background; the folder
resumes bit-exact at the same world size, at another (one plain process included), and every command reads it.
Real torchrun processes with gloo on the CPU."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_shards, make_tokenizer
from encoder_train import checkpoint
from encoder_train.cli import main
from helpers.launch import TORCHRUN, run

CONFIG = """
model: {hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, max_position_embeddings: 130,
        dropout: 0.1, attention_dropout: 0.1}
data: {num_workers: 1}
training: {batch_size: 8, gradient_accumulation_steps: 2, max_steps: 10, learning_rate: 3.0e-3, warmup_steps: 2,
           precision: fp32, log_interval: 1, data_parallel: fsdp}
checkpoint: {checkpoint_every: 5, max_checkpoints: 5}
"""


def train(launcher: list[str], root: Path, ckpt: Path, *extra: str, **kw):
    """The run of `root`'s c.yaml on its data and tok.json."""
    return run(launcher, root / "c.yaml", (root / "data", root / "tok.json"), ckpt, *extra, **kw)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """Ten FSDP steps on two processes, checkpoints (sharded: the default under FSDP2) at steps 5 and 10."""
    root = tmp_path_factory.mktemp("sharded")
    make_shards(root / "data")
    make_tokenizer(root / "tok.json")
    (root / "c.yaml").write_text(CONFIG)
    train(TORCHRUN, root, root / "straight")
    return root


def model(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path, flag="--checkpoint")["model"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fsdp_writes_sharded_folders_that_resume_bit_exact(straight, tmp_path):
    folders = [p for _, p in checkpoint.list_checkpoints(straight / "straight")]
    assert [p.name for p in folders] == ["checkpoint_00000005", "checkpoint_00000010"]
    assert all(p.is_dir() and (p / "__0_0.distcp").is_file() and (p / "__1_0.distcp").is_file() for p in folders)
    train(TORCHRUN, straight, tmp_path / "parts", "--set", "training.stop_at=5")
    train(TORCHRUN, straight, tmp_path / "parts", "--load_checkpoint", "latest")
    a = checkpoint.load(straight / "straight/checkpoint_00000010", flag="--checkpoint")
    b = checkpoint.load(tmp_path / "parts/checkpoint_00000010", flag="--checkpoint")
    assert same(a["model"], b["model"]) and a["data"] == b["data"]
    assert same(a["optimizer"]["state"]["encoder.layers.0.attention.query.weight"],
                b["optimizer"]["state"]["encoder.layers.0.attention.query.weight"])


def test_a_sharded_checkpoint_resumes_in_one_plain_process(straight, tmp_path):
    """Two FSDP ranks' shards into one process without torchrun: the model and optimizer continue, and the data
    from the same rows."""
    ckpt = tmp_path / "one"
    ckpt.mkdir()
    shutil.copytree(straight / "straight/checkpoint_00000005", ckpt / "checkpoint_00000005")
    r = train([sys.executable], straight, ckpt, "--load_checkpoint", "latest", "--set", "training.data_parallel=ddp")
    assert "resuming 2 processes' run with 1" in r.stdout
    five = checkpoint.load(ckpt / "checkpoint_00000005", flag="--checkpoint")
    ten = checkpoint.load(ckpt / "checkpoint_00000010.pt", flag="--checkpoint")  # one process: a single file
    assert ten["data"]["stream"]["rows"]["data_dir"] == five["data"]["stream"]["rows"]["data_dir"] + 5 * 8 * 2
    assert not same(five["model"], ten["model"])


def test_every_command_reads_a_sharded_folder_and_consolidate_writes_one_file(straight, tmp_path, capsys):
    folder = straight / "straight/checkpoint_00000010"
    assert main(["evaluate", "--checkpoint", str(folder), "--data_dir", str(straight / "data"),
                 "--max_batches", "2"]) == 0
    from_folder = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["fill-mask", "--checkpoint", str(folder), "w5 <mask> w7"]) == 0
    assert "mask 1:" in capsys.readouterr().out
    out = tmp_path / "one.pt"
    assert main(["consolidate", "--checkpoint", str(folder), "--output", str(out)]) == 0
    whole = checkpoint.load(out, flag="--checkpoint")  # verified like any single file
    assert same(whole["model"], model(folder)) and whole["step"] == 10
    assert main(["evaluate", "--checkpoint", str(out), "--data_dir", str(straight / "data"),
                 "--max_batches", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] == from_folder["loss"]
    from helpers.finetune_data import examples, write_jsonl

    train_file = write_jsonl(tmp_path / "train.jsonl", examples(24, seed=1))
    dev_file = write_jsonl(tmp_path / "dev.jsonl", examples(12, seed=2))
    assert main(["finetune", "--checkpoint", str(folder), "--train_file", str(train_file), "--validation_file",
                 str(dev_file), "--learning_rate", "1e-3", "--epochs", "1", "--output_dir", str(tmp_path / "ft")]) == 0
    capsys.readouterr()
    pytest.importorskip("transformers", reason="the hf extra (in dev) exports")
    assert main(["export", "--checkpoint", str(folder), "--output_dir", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert main(["consolidate", "--checkpoint", str(folder), "--output", str(out)]) == 2  # never overwrites


@pytest.mark.parametrize("damage", ["a rank's file", "the metadata", "the marker", "a cut shard"])
def test_a_damaged_sharded_checkpoint_is_one_sentence_and_latest_falls_back(straight, tmp_path, capsys, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight / "straight", ckpt, ignore=shutil.ignore_patterns(".encoder-train.lock"))
    bad = ckpt / "checkpoint_00000010"
    if damage == "a rank's file":
        (bad / "__1_0.distcp").unlink()
    elif damage == "the metadata":
        (bad / ".metadata").write_bytes(b"\0" * (bad / ".metadata").stat().st_size)
    elif damage == "the marker":
        (bad / "COMPLETE.json").write_text("{")
    else:
        with open(bad / "__0_0.distcp", "r+b") as f:
            f.truncate(100)
    assert main(["evaluate", "--checkpoint", str(bad), "--data_dir", str(straight / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "Traceback" not in err[0]
    # `latest` skips it, says so, and resumes the complete checkpoint of step 5; nothing is deleted.
    r = train([sys.executable], straight, ckpt, "--load_checkpoint", "latest", "--set",
              "training.data_parallel=ddp", "--set", "training.stop_at=6")
    assert "skipping checkpoint_00000010" in r.stdout and "resuming from" in r.stdout
    assert (ckpt / "checkpoint_00000005").is_dir()


def test_a_sharded_checkpoint_of_another_shape_is_refused(straight, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight / "straight/checkpoint_00000005", ckpt / "checkpoint_00000005")
    (tmp_path / "wide.yaml").write_text(CONFIG.replace("hidden_size: 32", "hidden_size: 64"))
    assert main(["train", "--config_file", str(tmp_path / "wide.yaml"), "--data_dir", str(straight / "data"),
                 "--tokenizer_filepath", str(straight / "tok.json"), "--checkpoint_dir", str(ckpt),
                 "--load_checkpoint", "latest", "--set", "training.data_parallel=ddp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different model shape" in err[0] and "hidden_size 32 vs 64" in err[0]


@pytest.mark.slow
def test_one_process_sharded_saves_rotate_resume_exactly_and_sigterm_saves(straight, tmp_path):
    """checkpoint.format: sharded without torchrun: rotation keeps the newest, a stale .partial folder is cleared at
    start, SIGTERM saves the step it finished, and the resumed run ends where an uninterrupted one does."""
    flags = ("--set", "checkpoint.format=sharded", "--set", "training.data_parallel=ddp", "--max_checkpoints", "1")
    whole = tmp_path / "whole"
    train([sys.executable], straight, whole, *flags, "--set", "training.max_steps=150", "--checkpoint_every", "50")
    assert [p.name for _, p in checkpoint.list_checkpoints(whole)] == ["checkpoint_00000150"]

    parts = tmp_path / "parts"
    stale = parts / ".checkpoint_00000003.partial"
    stale.mkdir(parents=True)
    proc = train([sys.executable], straight, parts, *flags, "--set", "training.max_steps=150", "--checkpoint_every",
                 "100", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (parts / "metrics.jsonl").exists() or len((parts / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert not stale.exists()
    (saved,) = checkpoint.list_checkpoints(parts)
    assert saved[1].is_dir() and 3 <= saved[0] < 150
    train([sys.executable], straight, parts, *flags, "--set", "training.max_steps=150", "--checkpoint_every", "50",
          "--load_checkpoint", "latest")
    assert same(model(whole / "checkpoint_00000150"), model(parts / "checkpoint_00000150"))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["bytes changed in place", "a shard cut short, its marker recomputed"])
def test_every_rank_falls_back_together_past_damaged_shards(straight, tmp_path, damage):
    """Under torchrun: rank 0 refuses the changed shard by its checksum, or every rank finds the resealed one does
    not load; either way all ranks set it aside once and resume from step 5 together."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight / "straight", ckpt, ignore=shutil.ignore_patterns(".encoder-train.lock"))
    bad = ckpt / "checkpoint_00000010"
    shard = bad / "__1_0.distcp"
    if damage == "bytes changed in place":
        with open(shard, "r+b") as f:
            f.seek(3000)
            f.write(b"\x00" * 300)
    else:
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
        marker = json.loads((bad / checkpoint.MARKER).read_text())
        marker["files"]["__1_0.distcp"] = shard.stat().st_size
        marker["sha256"]["__1_0.distcp"] = checkpoint.file_sha256(shard)
        (bad / checkpoint.MARKER).write_text(json.dumps(marker))
    r = train(TORCHRUN, straight, ckpt, "--load_checkpoint", "latest", "--set", "training.stop_at=7")
    assert r.stdout.count("skipping checkpoint_00000010; set aside as") == 1 and "at step 5" in r.stdout
    assert len(list(ckpt.glob("checkpoint_00000010.damaged-*"))) == 1
    assert checkpoint.load(ckpt / "checkpoint_00000007", flag="--checkpoint")["step"] == 7
