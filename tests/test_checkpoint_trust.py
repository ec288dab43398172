"""Checkpoints that never lie, and nothing finished is lost: damaged, unreadable, unfinished or foreign sharded
checkpoints are one sentence in every command and `latest` falls back past them (setting them aside, never
deleting them); a read-only folder reads; a full disk during an asynchronous save is one sentence; a run that stops
after a finished step saves it first. Real runs, files, a real tmpfs, a real other user (where the tests run as
root, chmod does not stop reads: the reading process drops to `nobody`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_shards, make_tokenizer, small_disk
from encoder_train import checkpoint
from encoder_train.cli import main

CONFIG = """
model: {hidden_size: HIDDEN, num_layers: 2, num_heads: 2, intermediate_size: 64, max_position_embeddings: 130}
data: {num_workers: 0}
training: {batch_size: 8, max_steps: 4, learning_rate: 3.0e-3, warmup_steps: 1, precision: fp32, log_interval: 1,
           data_parallel: ddp}
checkpoint: {checkpoint_every: 2, max_checkpoints: 5, format: sharded}
"""


def write_config(root: Path, hidden: int = 32) -> Path:
    path = root / f"c{hidden}.yaml"
    path.write_text(CONFIG.replace("HIDDEN", str(hidden)))
    return path


def train_args(root: Path, ckpt: Path, *extra: str, hidden: int = 32) -> list[str]:
    return ["train", "--config_file", str(write_config(root, hidden)), "--data_dir", str(root / "data"),
            "--tokenizer_filepath", str(root / "tok.json"), "--checkpoint_dir", str(ckpt), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """`sharded/`: a one-process run with sharded checkpoints at steps 2 and 4; `wide/`: the same, twice as wide;
    `single/`: single-file checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("trust")
    make_shards(root / "data")
    make_tokenizer(root / "tok.json")
    assert main(train_args(root, root / "sharded")) == 0
    assert main(train_args(root, root / "wide", "--max_steps", "2", hidden=64)) == 0
    assert main(train_args(root, root / "single", "--set", "checkpoint.format=single")) == 0
    return root


def copy_run(runs: Path, name: str, to: Path) -> Path:
    shutil.copytree(runs / name, to, ignore=shutil.ignore_patterns(".encoder-train.lock", "metrics.jsonl", "*.log"))
    return to


def one_sentence(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("encoder-train: error:")]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    return lines[0]


def flip(file: Path, offset: int, count: int) -> bytes:
    """Invert `count` bytes from `offset` in place (the size stays); returns the damaged content."""
    with open(file, "r+b") as f:
        f.seek(offset)
        old = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))
    return file.read_bytes()


def reseal(folder: Path) -> None:
    """Rewrite a sharded folder's marker for the files now in it: sizes and checksums that match, as a copy that
    mixed two runs' files and recomputed the marker would have."""
    marker = json.loads((folder / checkpoint.MARKER).read_text())
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != checkpoint.MARKER}
    marker |= {"files": files, "sha256": {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in files}}
    (folder / checkpoint.MARKER).write_text(json.dumps(marker))


def aside(ckpt: Path, name: str) -> list[Path]:
    return sorted(ckpt.glob(f"{name}.damaged-*"))


# ---- damage the checksums catch -------------------------------------------------------------------------


@pytest.mark.parametrize("file, offset", [("__0_0.distcp", 5000), (".metadata", 200), ("meta.pt", 900)])
def test_same_size_damage_is_refused_everywhere_and_latest_sets_it_aside(runs, tmp_path, capsys, file, offset):
    ckpt = copy_run(runs, "sharded", tmp_path / "ckpt")
    bad = ckpt / "checkpoint_00000004"
    damaged = flip(bad / file, offset, 400)
    for command in (["evaluate", "--checkpoint", str(bad), "--data_dir", str(runs / "data"), "--max_batches", "1"],
                    ["fill-mask", "--checkpoint", str(bad), "w5 <mask> w7"],
                    ["consolidate", "--checkpoint", str(bad), "--output", str(tmp_path / "one.pt")]):
        assert main(command) == 2, command
        message = one_sentence(capsys.readouterr().err)
        assert str(bad) in message and file in message
    assert not (tmp_path / "one.pt").exists()

    assert main(train_args(runs, ckpt, "--load_checkpoint", "latest", "--max_steps", "5")) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint_00000004; set aside as checkpoint_00000004.damaged-" in out
    assert "resuming from" in out and "at step 2" in out
    (kept,) = aside(ckpt, "checkpoint_00000004")
    assert (kept / file).read_bytes() == damaged  # set aside as it was, never deleted
    assert [s for s, _ in checkpoint.list_checkpoints(ckpt)] == [2, 4, 5]
    assert checkpoint.load(ckpt / "checkpoint_00000004")["step"] == 4  # the run wrote a good one in its place


def test_a_damaged_single_file_is_set_aside_not_overwritten(runs, tmp_path, capsys):
    ckpt = copy_run(runs, "single", tmp_path / "ckpt")
    damaged = flip(ckpt / "checkpoint_00000004.pt", 3000, 64)
    assert main(train_args(runs, ckpt, "--load_checkpoint", "latest", "--set", "checkpoint.format=single")) == 0
    assert "skipping checkpoint_00000004.pt; set aside as checkpoint_00000004.pt.damaged-" in capsys.readouterr().out
    (kept,) = aside(ckpt, "checkpoint_00000004.pt")
    assert kept.read_bytes() == damaged
    assert checkpoint.load(ckpt / "checkpoint_00000004.pt")["step"] == 4


def test_a_marker_written_before_checksums_still_resumes_and_a_partial_list_of_them_is_damage(runs, tmp_path, capsys):
    ckpt = copy_run(runs, "sharded", tmp_path / "ckpt")
    folder = ckpt / "checkpoint_00000004"
    marker = json.loads((folder / checkpoint.MARKER).read_text())
    (folder / checkpoint.MARKER).write_text(json.dumps({"step": 4, "files": marker["files"]}))  # sizes only
    assert checkpoint.load(folder)["step"] == 4
    assert main(train_args(runs, ckpt, "--load_checkpoint", "latest", "--max_steps", "5")) == 0
    assert "at step 4" in capsys.readouterr().out and not aside(ckpt, "checkpoint_00000004")

    sums = dict(marker["sha256"])
    sums.pop(next(name for name in sums if name.endswith(".distcp")))
    (folder / checkpoint.MARKER).write_text(json.dumps(marker | {"sha256": sums}))
    with pytest.raises(checkpoint.Damaged, match="checksums do not name every file"):
        checkpoint.load(folder)


# ---- damage only loading finds (torch's CheckpointException is a BaseException) ---------------------------


def test_shards_of_another_shape_are_one_sentence_and_latest_falls_back(runs, tmp_path, capsys):
    """The shards and index of a wider run under this run's meta.pt, with a marker that matches them: every file
    verifies, and only reading the shards into the model finds them foreign."""
    ckpt = copy_run(runs, "sharded", tmp_path / "ckpt")
    bad = ckpt / "checkpoint_00000004"
    for name in ("__0_0.distcp", ".metadata"):
        shutil.copy(runs / "wide/checkpoint_00000002" / name, bad / name)
    reseal(bad)
    for command in (["evaluate", "--checkpoint", str(bad), "--data_dir", str(runs / "data"), "--max_batches", "1"],
                    ["consolidate", "--checkpoint", str(bad), "--output", str(tmp_path / "one.pt")]):
        assert main(command) == 2, command
        assert str(bad) in one_sentence(capsys.readouterr().err)
    assert not (tmp_path / "one.pt").exists()

    assert main(train_args(runs, ckpt, "--load_checkpoint", "latest")) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint_00000004; set aside as" in out and "do not load into this model" in out
    assert "at step 2" in out and len(aside(ckpt, "checkpoint_00000004")) == 1
    with pytest.raises(checkpoint.Damaged, match="do not load"):  # as the library call, too
        checkpoint.read_shards(aside(ckpt, "checkpoint_00000004")[0] / "nothing-here")


# ---- a folder without its marker --------------------------------------------------------------------------


def test_a_folder_without_its_marker_is_named_refused_and_never_deleted(runs, tmp_path, capsys):
    only = tmp_path / "only"
    shutil.copytree(runs / "sharded/checkpoint_00000004", only / "checkpoint_00000004")
    (only / "checkpoint_00000004" / checkpoint.MARKER).unlink()
    shards = (only / "checkpoint_00000004/__0_0.distcp").read_bytes()

    assert main(train_args(runs, only)) == 2  # a fresh run into it is refused, naming it
    message = one_sentence(capsys.readouterr().err)
    assert "checkpoint_00000004 without its COMPLETE.json" in message and "--load_checkpoint latest" in message
    assert main(["evaluate", "--checkpoint", str(only / "checkpoint_00000004"), "--data_dir",
                 str(runs / "data")]) == 2
    assert "unfinished sharded checkpoint" in one_sentence(capsys.readouterr().err)

    ckpt = copy_run(runs, "sharded", tmp_path / "ckpt")
    (ckpt / "checkpoint_00000004" / checkpoint.MARKER).unlink()
    assert main(train_args(runs, ckpt, "--load_checkpoint", "latest")) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint_00000004; set aside as" in out and "at step 2" in out
    (kept,) = aside(ckpt, "checkpoint_00000004")
    assert (kept / "__0_0.distcp").read_bytes() == shards  # reached step 4 again: the old folder is still there
    assert checkpoint.load(ckpt / "checkpoint_00000004")["step"] == 4


def test_rotation_deletes_only_complete_checkpoints_and_none_older_than_a_kept_one(tmp_path):
    for step in (10, 25):
        torch.save({}, checkpoint.checkpoint_path(tmp_path, step))
    for step in (5, 20, 30):
        (checkpoint.folder_path(tmp_path, step)).mkdir()
    (checkpoint.folder_path(tmp_path, 20) / checkpoint.MARKER).write_text("{}")
    (checkpoint.folder_path(tmp_path, 30) / checkpoint.MARKER).write_text("{}")
    # 20 and 30 end phases: 10 and 25 are older than the kept 30, so no resume would take them.
    deleted = checkpoint.rotate(tmp_path, keep=2, kept_steps={20, 30})
    assert sorted(p.name for p in deleted) == ["checkpoint_00000010.pt", "checkpoint_00000025.pt"]
    assert [p.name for _, p in checkpoint.list_checkpoints(tmp_path)] == [
        "checkpoint_00000005", "checkpoint_00000020", "checkpoint_00000030"]  # 5: unfinished, never deleted
    torch.save({}, checkpoint.checkpoint_path(tmp_path, 40))
    torch.save({}, checkpoint.checkpoint_path(tmp_path, 50))
    assert checkpoint.rotate(tmp_path, keep=2, kept_steps={20, 30}) == []  # newer than the kept ones: the rotation's


# ---- who may read: a read-only folder, an unreadable shard --------------------------------------------------


def without_override(*args: str) -> subprocess.CompletedProcess:
    """`encoder-train ARGS` in a process that file permissions bind: as root (where chmod stops nothing), with the
    capabilities that override them dropped (setpriv), so that a mode of 000 or 555 means for it what it means for
    any user."""
    command = [sys.executable, "-m", "encoder_train", *args]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: file permissions cannot bind a reader here")
        drop = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def tree_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in folder.rglob("*")}


@pytest.mark.slow
def test_a_read_only_folder_reads_in_every_command_and_nothing_is_written(runs, tmp_path):
    colleague = tmp_path / "colleague"
    shutil.copytree(runs / "sharded/checkpoint_00000004", colleague / "checkpoint_00000004")
    folder = colleague / "checkpoint_00000004"
    before = tree_of(colleague)
    for p in [*folder.iterdir(), folder, colleague]:
        p.chmod(0o444 if p.is_file() else 0o555)
    try:
        for command in (["evaluate", "--checkpoint", str(folder), "--data_dir", str(runs / "data"),
                         "--max_batches", "1"],
                        ["fill-mask", "--checkpoint", str(folder), "w5 <mask> w7"],
                        ["consolidate", "--checkpoint", str(folder), "--output", str(tmp_path / "one.pt")]):
            r = without_override(*command)
            assert r.returncode == 0, r.stderr[-3000:]
    finally:
        for p in [colleague, folder, *folder.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert tree_of(colleague) == before  # no temporary copy beside it, nothing changed
    assert checkpoint.load(tmp_path / "one.pt", flag="--checkpoint")["step"] == 4


@pytest.mark.slow
def test_an_unreadable_shard_is_one_sentence_and_latest_falls_back(runs, tmp_path):
    ckpt = copy_run(runs, "sharded", tmp_path / "ckpt")
    bad = ckpt / "checkpoint_00000004"
    (bad / "__0_0.distcp").chmod(0o000)
    r = without_override("evaluate", "--checkpoint", str(bad), "--data_dir", str(runs / "data"), "--max_batches", "1")
    assert r.returncode == 2
    message = one_sentence(r.stderr)
    assert str(bad) in message and "__0_0.distcp" in message and "cannot be read" in message
    r = without_override(*train_args(runs, ckpt, "--load_checkpoint", "latest"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping checkpoint_00000004; set aside as" in r.stdout and "at step 2" in r.stdout
    (kept,) = aside(ckpt, "checkpoint_00000004")
    kept.joinpath("__0_0.distcp").chmod(0o644)  # for pytest's clean-up


# ---- a full disk during an asynchronous sharded save ---------------------------------------------------------


def test_a_full_disk_during_a_sharded_save_is_one_sentence_and_leaves_no_partial_folder(runs, tmp_path, capsys):
    """A tmpfs with room for one sharded checkpoint and a half (mounting needs root; skipped elsewhere)."""
    size = sum(p.stat().st_size for p in (runs / "sharded/checkpoint_00000002").iterdir())
    with small_disk(tmp_path, size * 3 // 2) as mnt:
        capsys.readouterr()
        assert main(train_args(runs, mnt / "ckpt", "--max_steps", "6")) == 2
        message = one_sentence(capsys.readouterr().err)
        assert "no space left to write checkpoint" in message and "MB are free" in message
        assert [s for s, _ in checkpoint.list_checkpoints(mnt / "ckpt")] == [2]
        assert checkpoint.load(mnt / "ckpt/checkpoint_00000002")["step"] == 2
        assert not list((mnt / "ckpt").glob(".checkpoint_*"))  # the half-written .partial folder is gone


# ---- nothing finished is lost -----------------------------------------------------------------------------


def logged(ckpt: Path) -> list[int]:
    try:
        return [json.loads(line)["step"] for line in (ckpt / "metrics.jsonl").read_text().splitlines() if line]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_held_out_shard_damaged_during_the_run_saves_the_finished_step_first(runs, tmp_path, damage):
    val = make_shards(tmp_path / "val", files=1, rows=16, width=32, seed=7)
    shard = next(val.rglob("*.pt"))
    ckpt = tmp_path / "ckpt"
    args = train_args(runs, ckpt, "--val_data_dir", str(val), "--max_steps", "100000", "--checkpoint_every", "100000",
                      "--set", "training.eval_every=1", "--set", "checkpoint.format=single")
    proc = subprocess.Popen([sys.executable, "-m", "encoder_train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while max(logged(ckpt), default=0) < 3:  # training and held-out records: the step each holds
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was disturbed"
        time.sleep(0.02)
    if damage == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(300)
    else:
        shard.unlink()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    message = one_sentence(err)
    (saved,) = checkpoint.list_checkpoints(ckpt)
    assert saved[0] >= 3 and f"step {saved[0]} is saved in {saved[1]}" in message
    assert checkpoint.load(saved[1])["step"] == saved[0]


def test_too_many_non_finite_steps_save_the_step_reached_first(runs, tmp_path, capsys):
    """The updates of non-finite steps were skipped, so the weights reached are good ones: saved before the stop."""
    (tmp_path / "nan.yaml").write_text(write_config(runs).read_text().replace("3.0e-3", "1.0e+30")
                                       .replace("warmup_steps: 1", "warmup_steps: 0"))
    ckpt = tmp_path / "ckpt"
    args = train_args(runs, ckpt, "--max_steps", "40", "--checkpoint_every", "1000", "--gradient_clip", "0")
    args[args.index("--config_file") + 1] = str(tmp_path / "nan.yaml")
    assert main(args) == 2
    message = one_sentence(capsys.readouterr().err)
    (saved,) = checkpoint.list_checkpoints(ckpt)
    assert "not finite for 5 steps in a row" in message and f"step {saved[0]} is saved in {saved[1]}" in message
    assert checkpoint.load(saved[1])["step"] == saved[0] < 40
