"""`encoder-train eval --watch`: beside a real training run with phases (a child process, TensorBoard and W&B offline
on), it evaluates every phase-end checkpoint as it appears, its values are read back from the run's W&B records,
metrics.jsonl and TensorBoard event files at those steps, and it stops by itself when the run is done; killed and
started again it evaluates and logs nothing twice; a checkpoint rotation deleted is skipped with a line; bad input
is one sentence and exit code 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_shards
from encoder_train import checkpoint
from encoder_train.cli import main
from helpers.recipes import recipe
from helpers.train_runs import one_sentence, tensorboard_steps
from helpers.wandb_records import history, run_ids

TWO_PHASES = [{"name": "warm", "steps": 5, "training": {"warmup_steps": 2}},
              {"name": "decay", "steps": 4, "training": {"schedule": "wsd", "decay_fraction": 1.0}}]
TRACKED = {"tensorboard": {"enabled": True, "log_freq": 1}, "wandb": {"enabled": True, "log_freq": 1}}


def env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


def train(config: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "encoder_train", "train", "--config_file", str(config), *extra],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def watcher(ckpt: Path, suite: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "encoder_train", "eval", "--watch", str(ckpt), "--suite", str(suite),
            "--output_dir", str(out), "--poll_seconds", "0.2", *extra]


def write_suite(folder: Path, text: str) -> Path:
    path = folder / "suite.yaml"
    path.write_text(text)
    return path


def wait_for(condition, child: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert child.poll() is None, f"the watcher ended before {what}: {child.communicate()}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def records(ckpt: Path) -> list[dict]:
    path = ckpt / "eval" / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def eval_rows(ckpt: Path) -> list[dict]:
    """The W&B history rows that carry the watcher's results, over the run's offline folders."""
    return [row for row in history(ckpt / "wandb") if "eval/step" in row]


@pytest.mark.slow
def test_the_watcher_beside_a_run_with_phases_records_each_phase_end_with_the_run(tmp_path):
    # Phase warm ends at step 5, decay (the run's end) at 9. The run first stops at 5 (a trial's stop_at), the watcher
    # starts and evaluates that phase end, and the run resumes beside it: the trainer forwards the step-5 results to
    # its W&B run at its next log point; those of step 9 come after its last, and the watcher logs them itself once
    # the trainer has ended. Then it stops by itself.
    config = recipe(tmp_path, phases=TWO_PHASES, **TRACKED)
    ckpt = tmp_path / "ckpt"
    suite = write_suite(tmp_path, "tasks:\n  mlm: {kind: mlm, data_dir: code-val, batch_size: 4}\n")
    out = tmp_path / "out"
    train(config, "--set", "training.stop_at=5")
    child = subprocess.Popen(watcher(ckpt, suite, out), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_for(lambda: any(r["step"] == 5 for r in records(ckpt)), child, "record of step 5")
        train(config, "--load_checkpoint", "latest")
        stdout, stderr = child.communicate(timeout=300)
    finally:
        child.kill()
    assert child.returncode == 0, stderr[-3000:]
    assert "the run is done at step 9" in stdout

    report = json.loads((out / "report.json").read_text())
    assert list(report["results"]) == ["ckpt@5", "ckpt@9"]
    assert report["models"]["ckpt@5"] == {"path": str(ckpt / "checkpoint_00000005.pt"), "step": 5,
                                          "kind": "checkpoint", "group": "ckpt"}
    loss = {s: report["results"][f"ckpt@{s}"]["mlm"]["loss"] for s in (5, 9)}
    accuracy = {s: report["results"][f"ckpt@{s}"]["mlm"]["accuracy"] for s in (5, 9)}
    assert loss[5] != loss[9]
    assert [(r["step"], r["task"], r["metrics"]["loss"]) for r in records(ckpt)] == [(5, "mlm", loss[5]),
                                                                                   (9, "mlm", loss[9])]

    # TensorBoard: the watcher's own event files, run "eval", at the checkpoints' steps; the trainer's are untouched.
    board = ckpt / "tensorboard" / "eval"
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in tensorboard_steps(board, "eval/mlm/loss")] == \
        [(5, loss[5]), (9, loss[9])]
    assert [s for s, _ in tensorboard_steps(board, "eval/mlm/accuracy")] == [5, 9]
    assert [s for s, _ in tensorboard_steps(ckpt / "tensorboard", "loss")] == list(range(1, 10))

    # W&B: one run (the trainer's), each checkpoint's results once, charted against eval/step.
    assert len(run_ids(ckpt / "wandb")) == 1
    rows = eval_rows(ckpt)
    assert sorted((r["eval/step"], r["eval/mlm/loss"], r["eval/mlm/accuracy"]) for r in rows) == \
        [(5, loss[5], accuracy[5]), (9, loss[9], accuracy[9])]
    by_step = {r["eval/step"]: r for r in rows}
    assert by_step[5]["_step"] == 6 and by_step[5]["loss"] > 0  # forwarded by the trainer, in its step-6 row
    assert by_step[9]["_step"] == 10 and "loss" not in by_step[9]  # logged by the watcher after the run's end
    forwarded = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()
                 if "eval/step" in line]
    assert forwarded == [{"step": 6, "eval/step": 5, "eval/mlm/loss": loss[5], "eval/mlm/accuracy": accuracy[5],
                          "eval/mlm/perplexity": report["results"]["ckpt@5"]["mlm"]["perplexity"]}]
    assert not list((ckpt / "eval" / "reading").iterdir())  # the links are gone


@pytest.mark.slow
def test_a_killed_watcher_resumes_without_evaluating_or_logging_twice_and_skips_rotated_checkpoints(tmp_path):
    # A checkpoint every 2 steps, one kept beside the phase ends: with --every 2, those of steps 2, 4, 6 and 8 are
    # gone before the watcher starts (one line each); 5 and 9 are evaluated. The second task is slow (8,000 rows):
    # the kill lands while the watcher is on its first checkpoint.
    config = recipe(tmp_path, phases=TWO_PHASES, checkpoint={"checkpoint_every": 2, "max_checkpoints": 1}, **TRACKED)
    ckpt = tmp_path / "ckpt"
    train(config)
    assert sorted(p.name for p in ckpt.glob("checkpoint_*")) == ["checkpoint_00000005.pt", "checkpoint_00000009.pt"]
    make_shards(tmp_path / "big", files=2, rows=4000, width=32, seed=4)
    suite = write_suite(tmp_path, "tasks:\n  quick: {kind: mlm, data_dir: code-val, batch_size: 4}\n"
                                  "  slow: {kind: mlm, data_dir: big, batch_size: 16}\n")
    out = tmp_path / "out"
    command = watcher(ckpt, suite, out, "--every", "2", "--name", "base")
    child = subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "report.json").exists(), child, "report")
    finally:
        child.send_signal(signal.SIGKILL)
    stdout, _ = child.communicate()
    first = json.loads((out / "report.json").read_text())
    assert list(first["results"]) == ["base@5"] and list(first["results"]["base@5"]) == ["quick"]
    for step in (2, 4, 6, 8):
        assert f"base@{step}: the checkpoint of step {step} was removed by the run's rotation" in stdout
    assert "base@5" not in {(r["model"]) for r in records(ckpt)}  # its row was not finished

    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "base@5 / quick: done before, kept" in done.stdout and "base@5 / slow: loss" in done.stdout
    assert "base@9 / quick: loss" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["details"]["base@5"]["quick"] == first["details"]["base@5"]["quick"]
    keys = [(r["step"], r["task"]) for r in records(ckpt)]
    assert sorted(keys) == [(5, "quick"), (5, "slow"), (9, "quick"), (9, "slow")]  # each once
    for task in ("quick", "slow"):
        points = tensorboard_steps(ckpt / "tensorboard" / "eval", f"eval/{task}/loss")
        assert [s for s, _ in points] == [5, 9]
        assert [v for _, v in points] == [pytest.approx(report["results"][f"base@{s}"][task]["loss"], rel=1e-6)
                                          for s in (5, 9)]
    rows = eval_rows(ckpt)  # the run had ended: the watcher logged both checkpoints itself, once
    assert sorted((r["eval/step"], r["eval/slow/loss"]) for r in rows) == \
        [(s, report["results"][f"base@{s}"]["slow"]["loss"]) for s in (5, 9)]

    again = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300)  # nothing left to do
    assert again.returncode == 0 and " / " not in again.stdout and "the run is done at step 9" in again.stdout
    assert len(records(ckpt)) == 4 and len(eval_rows(ckpt)) == 2


def a_checkpoint(folder: Path) -> Path:
    """A checkpoint file as train writes it (atomically, with its checksum), of a tiny state."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    return checkpoint.save({"model": {"w": torch.arange(6.0)}, "step": 8}, folder, 8)


def test_a_checkpoint_rotation_deletes_stays_readable_through_the_watchers_links(tmp_path):
    from encoder_train.evaluation.watch import _link

    original = a_checkpoint(tmp_path / "ckpt")
    target = tmp_path / "reading" / original.name
    target.parent.mkdir()
    assert _link(original, target)
    original.unlink()  # what rotation does
    assert checkpoint.load(target)["model"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert not _link(original, tmp_path / "reading" / "again.pt")  # gone before it was linked


def test_the_trainer_is_seen_running_while_it_holds_its_folder_lock_and_never_blocked(tmp_path):
    from encoder_train.evaluation.watch import trainer_running

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert not trainer_running(ckpt)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom encoder_train.checkpoint import "
                               "FolderLock\nwith FolderLock(sys.argv[1]):\n    print('held', flush=True)\n"
                               "    time.sleep(60)\n", str(ckpt)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert trainer_running(ckpt)
        assert trainer_running(ckpt)  # asking took nothing: still held by the trainer, never by us
    finally:
        holder.kill()
        holder.wait()
    assert not trainer_running(ckpt)
    with checkpoint.FolderLock(ckpt):  # and a trainer may take it at once
        pass


def test_bad_watch_input_is_one_sentence_and_exit_2(capsys, tmp_path):
    make_shards(tmp_path / "val", files=1, rows=8, seed=3)
    suite = write_suite(tmp_path, "tasks:\n  mlm: {kind: mlm, data_dir: val}\n")
    base = ["eval", "--suite", str(suite), "--output_dir", str(tmp_path / "out")]
    run_dir = tmp_path / "run"
    pretrained = a_checkpoint(run_dir)
    cases = [
        (["--watch", str(run_dir), "--model", f"a={pretrained}"], "not both"),
        (["--watch", str(pretrained)], "is a checkpoint, not a run's checkpoint folder"),
        (["--watch", str(run_dir), "--every", "0"], "--every 0 must be a positive number"),
        (["--watch", str(run_dir), "--name", "a b"], "is not a plain name"),
        (["--watch", str(run_dir), "--poll_seconds", "0"], "--poll_seconds 0 must be a positive"),
        (["--model", f"a={pretrained}", "--every", "2"], "--every and --name go with --watch"),
    ]
    for flags, says in cases:
        assert main(base + flags) == 2, flags
        err = capsys.readouterr().err
        assert says in one_sentence(err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_second_watcher_of_a_run_is_refused_in_one_sentence(capsys, tmp_path):
    # The first (a real one, waiting for the run's first checkpoint) keeps the run's records.
    make_shards(tmp_path / "val", files=1, rows=8, seed=3)
    suite = write_suite(tmp_path, "tasks:\n  mlm: {kind: mlm, data_dir: val}\n")
    base = ["eval", "--suite", str(suite), "--output_dir", str(tmp_path / "out")]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = subprocess.Popen(watcher(run_dir, suite, tmp_path / "out1"), env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run_dir / "eval" / ".watch.lock").is_file() and
                 (run_dir / "eval" / ".watch.lock").read_text(), first, "lock")
        assert main(base + ["--watch", str(run_dir)]) == 2
        assert "another watcher (process " in one_sentence(capsys.readouterr().err)
    finally:
        first.kill()
        first.communicate()


def test_the_trainer_reads_the_watchers_records_as_they_grow_and_forwards_each_checkpoint_once(tmp_path):
    from encoder_train.tracking import WatchRecords, read_forwarded

    path = tmp_path / "eval" / "records.jsonl"
    path.parent.mkdir()
    line = {"step": 5, "task": "mlm", "metrics": {"loss": 2.5, "accuracy": 0.5, "perplexity": float("inf")}}
    later = {"step": 9, "task": "mlm", "metrics": {"loss": 2.0, "accuracy": 0.6, "note": "text"}}
    other = {"step": 5, "task": "sts", "metrics": {"spearman": 0.7}}
    path.write_text(json.dumps(line) + "\n" + json.dumps(later)[:20])  # the second still being written
    # The trainer already sent (5, sts) before its resume (its metrics.jsonl says so).
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 3, "loss": 4.0}) + "\n"
                       + json.dumps({"step": 4, "eval/step": 5, "eval/sts/spearman": 0.7}) + "\n")
    sent, last = read_forwarded(metrics)
    assert sent == {(5, "sts")} and last == 4
    watch = WatchRecords(path, sent)
    assert watch.next_row() == {"eval/step": 5, "eval/mlm/loss": 2.5, "eval/mlm/accuracy": 0.5}  # numbers only
    assert watch.next_row() is None  # the cut line waits
    path.write_text(json.dumps(line) + "\n" + json.dumps(later) + "\n" + json.dumps(other) + "\n")
    assert watch.next_row() == {"eval/step": 9, "eval/mlm/loss": 2.0, "eval/mlm/accuracy": 0.6}
    assert watch.next_row() is None  # (5, sts) went before the resume; (5, mlm) once
