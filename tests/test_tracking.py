"""What a run reports: plain lines in a log file, every TensorBoard step once across a kill and resume, tracker
settings refused before training, the pip command for a missing extra, the resume hint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from encoder_train.train import how_to_resume
from helpers.train_runs import command, config, env, one_sentence, tensorboard_steps

MAX_STEPS = 12


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env(), timeout=600, **kw)


def test_output_to_a_file_is_one_plain_line_per_log_point(tmp_path, shard_dir, tokenizer_file):
    ckpt = tmp_path / "ckpt"
    cfg = config(tmp_path, steps=MAX_STEPS, every=5)  # log_interval 1
    proc = subprocess.run(command(cfg, shard_dir, tokenizer_file, ckpt, "--set", "training.log_interval=3"),
                          capture_output=True, env=env(), timeout=600)  # bytes: a carriage return stays one
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert b"\r" not in proc.stderr and b"\r" not in proc.stdout
    proc.stderr = proc.stderr.decode()
    progress = [line for line in proc.stderr.splitlines() if line.startswith("step ") and "/12" in line]
    assert [line.split()[1] for line in progress] == ["3/12", "6/12", "9/12", "12/12"]
    assert all(" loss " in line and " lr " in line and "tok/s" in line and " eta " in line for line in progress)
    saved = [line for line in proc.stderr.splitlines() if "saved" in line]
    assert len(saved) == 3 and all(line.startswith("step ") and len(line) < 300 for line in saved)


def test_the_bar_can_be_asked_for_in_a_file(tmp_path, shard_dir, tokenizer_file):
    proc = run(command(config(tmp_path, steps=4, every=5), shard_dir, tokenizer_file, tmp_path / "ckpt",
                       "--progress", "bar"))
    assert proc.returncode == 0 and "| 4/4 [" in proc.stderr and "step/s" in proc.stderr  # tqdm's bar


@pytest.mark.slow
def test_tensorboard_holds_every_step_once_after_a_kill_and_a_resume(tmp_path, shard_dir, tokenizer_file):
    cfg = config(tmp_path, steps=MAX_STEPS, every=5)
    flags = ("--tensorboard", "--set", "tensorboard.log_freq=1", "--max_checkpoints", "5")
    straight = tmp_path / "straight"
    assert run(command(cfg, shard_dir, tokenizer_file, straight, *flags)).returncode == 0

    # What a SIGKILL after step 8 leaves: checkpoints of steps 5 (and none later), metrics.jsonl up to step 8,
    # TensorBoard events up to step 8 (here: all of the straight run's, which the resume must also set right).
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(straight / "checkpoint_00000005.pt", killed)
    shutil.copytree(straight / "tensorboard", killed / "tensorboard")
    lines = (straight / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 8))

    proc = run(command(cfg, shard_dir, tokenizer_file, killed, *flags, "--load_checkpoint", "latest"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = tensorboard_steps(straight / "tensorboard")
    assert [s for s, _ in expected] == list(range(1, MAX_STEPS + 1))
    assert tensorboard_steps(killed / "tensorboard") == expected  # every step once, the same values
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, MAX_STEPS + 1))


def test_a_resume_between_log_points_says_how_many_steps_its_first_record_averages(tmp_path, shard_dir,
                                                                                   tokenizer_file):
    cfg = config(tmp_path, steps=MAX_STEPS, every=5)
    ckpt = tmp_path / "ckpt"
    assert run(command(cfg, shard_dir, tokenizer_file, ckpt, "--set", "training.log_interval=4",
                       "--max_steps", "5")).returncode == 0
    assert run(command(cfg, shard_dir, tokenizer_file, ckpt, "--set", "training.log_interval=4",
                       "--load_checkpoint", "latest")).returncode == 0
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["window_steps"]) for r in records] == [(4, 4), (5, 1), (8, 3), (12, 4)]


@pytest.mark.parametrize("flag,value", [("--wandb_run_id", "team/run 1"), ("--wandb_run_id", "x" * 500),
                                        ("--wandb_run_id", " padded"), ("--wandb_project_name", "a/b")])
def test_wandb_names_it_refuses_are_one_sentence_before_training(tmp_path, shard_dir, tokenizer_file, flag, value):
    ckpt = tmp_path / "ckpt"
    proc = run(command(config(tmp_path), shard_dir, tokenizer_file, ckpt, "--wandb", flag, value))
    assert proc.returncode == 2 and flag in one_sentence(proc.stderr)
    assert not ckpt.exists()  # refused before anything was written


@pytest.mark.parametrize("sink", ["tensorboard", "wandb"])
def test_a_file_where_a_sink_folder_goes_is_one_sentence(tmp_path, shard_dir, tokenizer_file, sink):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / sink).write_text("not a folder")
    proc = run(command(config(tmp_path), shard_dir, tokenizer_file, ckpt, f"--{sink}"))
    assert proc.returncode == 2 and f"{ckpt / sink}, which is a file" in one_sentence(proc.stderr)
    assert not list(ckpt.glob("checkpoint_*.pt"))


@pytest.mark.parametrize("module,flag", [("wandb", "--wandb"), ("tensorboard", "--tensorboard")])
def test_a_missing_extra_names_the_pip_command_that_adds_it(tmp_path, shard_dir, tokenizer_file, module, flag):
    args = command(config(tmp_path), shard_dir, tokenizer_file, tmp_path / "ckpt", flag)[3:]  # after -m encoder_train
    script = (f"import sys; sys.modules[{module!r}] = None\n"  # as if never installed: import raises ImportError
              f"from encoder_train.cli import main; sys.exit(main({args!r}))")
    proc = run([sys.executable, "-c", script])
    assert proc.returncode == 2
    line = one_sentence(proc.stderr)
    # An editable install (a clone, as quickstart.sh and .ci/run make) names its folder; a PyPI install the package.
    assert f"needs the {module} package" in line
    assert "pip install -e '" in line or "pip install 'encoder-train[" in line
    assert line.endswith(f"[{module}]' adds it.")


def test_the_resume_hint_fits_the_command():
    assert how_to_resume(None) == "Resume with the same command plus --load_checkpoint latest."
    assert how_to_resume("latest") == "Resume with the same command."
    assert "--load_checkpoint latest in place of --load_checkpoint ck/checkpoint_00000002.pt" in how_to_resume(
        "ck/checkpoint_00000002.pt")


def test_the_tracker_ids_part_keeps_the_wandb_run_under_the_checkpoints_key():
    """What a checkpoint stores of the trackers' runs, and which run a resume continues: the --wandb_run_id flag's
    (given at construction), else the checkpoint's; a checkpoint without one (W&B was off) starts none."""
    from encoder_train.tracking import TrackerIds

    resumed = TrackerIds()
    resumed.load_state_dict({"wandb_run_id": "abc123"})
    assert resumed.wandb == "abc123" and resumed.state_dict() == {"wandb_run_id": "abc123"}
    flagged = TrackerIds("mine")
    flagged.load_state_dict({"wandb_run_id": "abc123"})
    assert flagged.state_dict() == {"wandb_run_id": "mine"}
    off = TrackerIds()
    off.load_state_dict({"wandb_run_id": None})
    assert off.state_dict() == {"wandb_run_id": None}
