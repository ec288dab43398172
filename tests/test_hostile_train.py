"""`train` under hostile conditions: two runs on one folder, data that breaks mid-run, a full disk, bad paths,
bad data, resumes with other settings. Each ends in one sentence and exit 2 (or a correct run), and no
finished step is lost."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import BOS, EOS, PAD, make_rows, make_shards, small_disk
from encoder_train import checkpoint
from encoder_train.cli import main
from helpers.train_runs import command, config, env, one_sentence


def logged(ckpt: Path) -> list[int]:
    try:
        return [json.loads(line)["step"] for line in (ckpt / "metrics.jsonl").read_text().splitlines() if line]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def wait_for_steps(ckpt: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while len(logged(ckpt)) < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it was disturbed"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(map(str, args)))
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---- one writer per checkpoint folder ---------------------------------------------------------------------


def test_a_second_run_on_a_locked_folder_stops_at_once_and_touches_nothing(tmp_path, shard_dir, tokenizer_file):
    ckpt = tmp_path / "ckpt"
    cfg = config(tmp_path, steps=100_000, every=1000)
    first = subprocess.Popen(command(cfg, shard_dir, tokenizer_file, ckpt), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env())
    wait_for_steps(ckpt, 3, first)
    second = subprocess.run(command(cfg, shard_dir, tokenizer_file, ckpt, "--load_checkpoint", "latest"),
                            capture_output=True, text=True, env=env(), timeout=120)
    assert second.returncode == 2
    message = one_sentence(second.stderr)
    assert str(ckpt) in message and f"process {first.pid} on host" in message
    assert first.poll() is None  # the second run did not disturb the first
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err[-2000:]
    steps = logged(ckpt)
    assert steps == list(range(1, len(steps) + 1))  # every step once: nothing written by the second run
    assert [s for s, _ in checkpoint.list_checkpoints(ckpt)] == [len(steps)]


def test_a_killed_run_leaves_no_lock_behind(tmp_path, shard_dir, tokenizer_file):
    ckpt = tmp_path / "ckpt"
    cfg = config(tmp_path, steps=400, every=5)
    proc = subprocess.Popen(command(cfg, shard_dir, tokenizer_file, ckpt), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env())
    wait_for_steps(ckpt, 7, proc)
    with pytest.raises(Exception, match="in use by another encoder-train run"):
        with checkpoint.FolderLock(ckpt):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(command(config(tmp_path, steps=12, every=5), shard_dir, tokenizer_file, ckpt,
                                     "--load_checkpoint", "latest"), capture_output=True, text=True, env=env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]


# ---- data that breaks during the run ----------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
def test_shards_truncated_while_training_end_in_a_sentence_with_the_last_step_saved(tmp_path, tokenizer_file,
                                                                                     workers):
    data = make_shards(tmp_path / "data", files=3, rows=64, width=32)
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(command(config(tmp_path, steps=5000, every=1000, workers=workers), data, tokenizer_file,
                                    ckpt), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
    wait_for_steps(ckpt, 5, proc)
    for shard in data.rglob("*.pt"):  # shrink every shard in place: what a memory map would die of (SIGBUS)
        with open(shard, "r+b") as f:
            f.truncate(700)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, f"exit {proc.returncode}: {err[-2000:]}"
    message = one_sentence(err)
    assert "data file" in message and ".pt" in message and "saved in" in message
    assert message.endswith("then resume with the same command plus --load_checkpoint latest."), message
    saved = checkpoint.list_checkpoints(ckpt)
    assert saved and saved[-1][0] >= 5  # the finished steps were kept, though checkpoint_every is 1000
    assert checkpoint.load(saved[-1][1])["step"] == saved[-1][0]


def test_a_shard_damaged_mid_run_saves_first(capsys, tmp_path, tokenizer_file):
    # One file per window, visited in turn: the damaged file is reached only after some steps.
    data = make_shards(tmp_path / "data", files=4, rows=16, width=32)
    for shard in sorted(data.rglob("*.pt")):
        t = torch.load(shard, weights_only=True)
        t[5, 3] = 10_000  # an id outside the vocabulary
        torch.save(t, shard)
        break
    cfg = config(tmp_path, steps=30, every=1000)
    cfg.write_text(cfg.read_text().replace("data: {", "data: {shuffle_files: 1, "))
    ckpt = tmp_path / "ckpt"
    rc, _, err = run_cli(capsys, "train", "--config_file", cfg, "--data_dir", data, "--tokenizer_filepath",
                         tokenizer_file, "--checkpoint_dir", ckpt)
    assert rc == 2 and "outside the tokenizer's vocabulary" in err
    saved = checkpoint.list_checkpoints(ckpt)
    if logged(ckpt):  # the damaged file was not the first visited: the steps before it are saved
        assert saved and saved[-1][0] == logged(ckpt)[-1] and "saved in" in err


# ---- a full disk ------------------------------------------------------------------------------------------


def test_a_full_disk_keeps_the_previous_checkpoint(capsys, tmp_path, shard_dir, tokenizer_file, monkeypatch):
    real_save, calls = torch.save, []

    def failing_save(obj, f, *a, **k):  # the second checkpoint hits a full disk halfway through
        calls.append(1)
        if len(calls) == 2:
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    ckpt = tmp_path / "ckpt"
    rc, _, err = run_cli(capsys, "train", "--config_file", config(tmp_path, steps=20, every=5), "--data_dir",
                         shard_dir, "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", ckpt)
    assert rc == 2 and "no space left to write checkpoint" in err and "MB are free" in err
    assert [s for s, _ in checkpoint.list_checkpoints(ckpt)] == [5]
    assert checkpoint.load(checkpoint.checkpoint_path(ckpt, 5))["step"] == 5
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]


def test_a_real_full_filesystem(capsys, tmp_path, shard_dir, tokenizer_file):
    """A tmpfs with room for one checkpoint and a half (needs root; skipped elsewhere)."""
    probe = tmp_path / "probe"
    assert main(["train", "--config_file", str(config(tmp_path, steps=2, every=2)), "--data_dir", str(shard_dir),
                 "--tokenizer_filepath", str(tokenizer_file), "--checkpoint_dir", str(probe)]) == 0
    size = checkpoint.checkpoint_path(probe, 2).stat().st_size
    with small_disk(tmp_path, size * 3 // 2) as mnt:
        capsys.readouterr()
        rc, _, err = run_cli(capsys, "train", "--config_file", config(tmp_path, steps=20, every=5), "--data_dir",
                             shard_dir, "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", mnt / "ckpt")
        assert rc == 2 and "no space left to write checkpoint" in err, err[-2000:]
        assert [s for s, _ in checkpoint.list_checkpoints(mnt / "ckpt")] == [5]
        assert checkpoint.load(checkpoint.checkpoint_path(mnt / "ckpt", 5))["step"] == 5


# ---- bad data ---------------------------------------------------------------------------------------------


def test_rows_all_padding_and_nothing_to_mask(capsys, tmp_path, tokenizer_file):
    ckpt = tmp_path / "ckpt"
    rows = make_rows(32, 16)
    rows[7] = PAD
    (tmp_path / "pads").mkdir()
    torch.save(rows, tmp_path / "pads" / "a.pt")
    rc, _, err = run_cli(capsys, "train", "--config_file", config(tmp_path), "--data_dir", tmp_path / "pads",
                         "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", ckpt)
    assert rc == 2 and "all padding (row 7 is the first)" in err

    (tmp_path / "specials").mkdir()
    torch.save(torch.tensor([[BOS, EOS]] * 32), tmp_path / "specials" / "a.pt")
    rc, _, err = run_cli(capsys, "train", "--config_file", config(tmp_path), "--data_dir", tmp_path / "specials",
                         "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", ckpt)
    assert rc == 2 and "nothing to mask" in err

    # evaluate: a checkpoint, then held-out data with nothing to predict is said so, not perplexity 1.0
    good = make_shards(tmp_path / "good", files=1, rows=16, width=16)
    assert run_cli(capsys, "train", "--config_file", config(tmp_path, steps=2, every=2), "--data_dir", good,
                   "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", ckpt)[0] == 0
    for folder, pattern in [("pads", "all padding"), ("specials", "nothing to mask")]:
        rc, out, err = run_cli(capsys, "evaluate", "--checkpoint", checkpoint.checkpoint_path(ckpt, 2),
                               "--data_dir", tmp_path / folder)
        assert rc == 2 and pattern in err and "perplexity" not in out
    (tmp_path / "short").mkdir()  # rows whose single maskable token is rarely picked: no prediction at all
    torch.save(torch.tensor([[BOS, 7, EOS]] * 2), tmp_path / "short" / "a.pt")
    rc, out, err = run_cli(capsys, "evaluate", "--checkpoint", checkpoint.checkpoint_path(ckpt, 2),
                           "--data_dir", tmp_path / "short")
    assert (rc == 2 and "gave no token to predict" in err) or json.loads(out)["tokens"] > 0


def test_uint8_shards_train(capsys, tmp_path, tokenizer_file):
    data = tmp_path / "u8"
    data.mkdir()
    torch.save(make_rows(32, 16).to(torch.uint8), data / "a.pt")
    rc, _, err = run_cli(capsys, "train", "--config_file", config(tmp_path, steps=3, every=3), "--data_dir", data,
                         "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", tmp_path / "ckpt")
    assert rc == 0, err


# ---- paths of the wrong kind ------------------------------------------------------------------------------


def test_folders_for_files_and_files_for_folders(capsys, tmp_path, shard_dir, tokenizer_file):
    cfg = config(tmp_path)
    a_file = next(shard_dir.rglob("*.pt"))
    base = ["train", "--config_file", cfg, "--data_dir", shard_dir, "--tokenizer_filepath", tokenizer_file,
            "--checkpoint_dir", tmp_path / "ckpt"]
    cases = [
        (["--config_file", tmp_path], "--config_file .* is a folder"),
        (["--config_dir", cfg], "--config_dir .* is a file"),
        (["--data_dir", a_file], "--data_dir .* is a file, not a folder"),
        (["--tokenizer_filepath", tmp_path], "--tokenizer_filepath .* is a folder"),
        (["--load_checkpoint", tmp_path], "--load_checkpoint .* is a folder"),
        (["--checkpoint_dir", tokenizer_file], "--checkpoint_dir .* is a file, not a folder"),
        (["--val_data_dir", a_file], "--val_data_dir .* is a file, not a folder"),
    ]
    for extra, pattern in cases:
        rc, _, err = run_cli(capsys, *base, *extra)
        assert rc == 2 and err.count("\n") == 1, (extra, err)
        assert __import__("re").search(pattern, err), (extra, err)
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").glob("checkpoint_*"))


# ---- every setting from the command line, and a dry run -------------------------------------------------


def test_set_and_plain_flags_override_the_yaml_and_are_stored(capsys, tmp_path, shard_dir, tokenizer_file):
    ckpt = tmp_path / "ckpt"
    rc, out, err = run_cli(capsys, "train", "--config_file", config(tmp_path, steps=50), "--data_dir", shard_dir,
                           "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", ckpt, "--max_steps", 4,
                           "--learning_rate", 1e-3, "--seed", 3, "--precision", "bf16",
                           "--set", "training.warmup_steps=1", "--set", "data.mask_probability=0.3")
    assert rc == 0, err
    stored = checkpoint.load(checkpoint.checkpoint_path(ckpt, 4))["config"]
    assert stored["training"]["max_steps"] == 4 and stored["training"]["learning_rate"] == 1e-3
    assert stored["training"]["seed"] == 3 and stored["training"]["precision"] == "bf16"
    assert stored["training"]["warmup_steps"] == 1 and stored["data"]["mask_probability"] == 0.3
    rc, _, err = run_cli(capsys, "train", "--config_file", config(tmp_path), "--max_steps", 4,
                         "--set", "training.max_steps=5")
    assert rc == 2 and "set both by --max_steps and by --set" in err


def test_dry_run_prints_config_and_size_and_writes_nothing(capsys, tmp_path, shard_dir, tokenizer_file):
    ckpt = tmp_path / "ckpt"
    rc, out, err = run_cli(capsys, "train", "--config_file", config(tmp_path), "--data_dir", shard_dir,
                           "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", ckpt, "--dry_run")
    assert rc == 0, err
    assert "resolved config:" in out and "hidden_size: 32" in out and "M parameters" in out and "3 shards" in out
    assert not ckpt.exists()


def test_a_model_too_large_for_memory_is_refused_before_allocating(capsys, tmp_path, shard_dir, tokenizer_file):
    for size in ("hidden_size=1099511627776", "intermediate_size=100000000000"):
        rc, _, err = run_cli(capsys, "train", "--config_file", config(tmp_path), "--data_dir", shard_dir,
                             "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", tmp_path / "ckpt",
                             "--set", f"model.{size}", "--set", "model.num_heads=1")
        assert rc == 2 and "parameters" in err and "GB of memory" in err, err


# ---- resuming with other settings -------------------------------------------------------------------------


def test_resume_with_other_settings_says_so_and_uses_them(capsys, tmp_path, shard_dir, tokenizer_file):
    ckpt = tmp_path / "ckpt"
    common = ["--data_dir", shard_dir, "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", ckpt]
    assert run_cli(capsys, "train", "--config_file", config(tmp_path, steps=10, every=10), *common)[0] == 0
    rc, out, err = run_cli(capsys, "train", "--config_file", config(tmp_path, steps=15, every=10), *common,
                           "--load_checkpoint", "latest", "--batch_size", 4)
    assert rc == 0, err
    note = next(line for line in out.splitlines() if line.startswith("note: resuming with settings"))
    assert "training.max_steps 10 -> 15" in note and "training.batch_size 8 -> 4" in note
    assert "learning rate of the next step is 1.154e-03" in note  # 3e-3 * (1 - (10 - 2) / 13)
    lr_11 = next(json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["step"] == 11)["lr"]
    # the rate step 11's update used (0-based 10: the note's next step), in the new schedule, not the stretched old one
    assert lr_11 == pytest.approx(3e-3 * (1 - 8 / 13))
    # An unchanged resume says nothing of the kind.
    rc, out, _ = run_cli(capsys, "train", "--config_file", config(tmp_path, steps=15, every=10), *common,
                         "--load_checkpoint", "latest", "--batch_size", 4)
    assert rc == 0 and "note: resuming with settings" not in out


def test_torchrun_variables_without_torchrun_are_one_sentence(tmp_path, shard_dir, tokenizer_file):
    for extra in ({"RANK": "1", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        env_ = {k: v for k, v in env().items() if k not in ("MASTER_ADDR", "MASTER_PORT")} | extra
        r = subprocess.run(command(config(tmp_path), shard_dir, tokenizer_file, tmp_path / "ck"), capture_output=True,
                           text=True, env=env_, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.count("\n") == 1 and "encoder-train: error:" in r.stderr and "torchrun" in r.stderr


def test_a_checkpoint_of_another_version_is_one_sentence(capsys, tmp_path, shard_dir, tokenizer_file):
    ckpt = tmp_path / "ckpt"
    common = ["train", "--config_file", config(tmp_path, steps=2, every=2), "--data_dir", shard_dir,
              "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", ckpt]
    assert run_cli(capsys, *common)[0] == 0
    path = checkpoint.checkpoint_path(ckpt, 2)
    state = checkpoint.load(path)
    del state["data"], state["rng"]
    old = tmp_path / "old"
    old.mkdir()
    checkpoint.save(state, old, 2)
    rc, _, err = run_cli(capsys, *common[:-2], "--checkpoint_dir", tmp_path / "new", "--load_checkpoint",
                         checkpoint.checkpoint_path(old, 2))
    assert rc == 2 and "another version of encoder-train" in err and err.count("\n") == 1


def test_the_memory_refusal_names_the_key_behind_it(capsys, tmp_path, shard_dir, tokenizer_file):
    rc, _, err = run_cli(capsys, "train", "--config_file", config(tmp_path), "--data_dir", shard_dir,
                         "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", tmp_path / "ckpt",
                         "--set", "model.max_position_embeddings=100000000000", "--dry_run")
    assert rc == 2 and "largest part comes from model.max_position_embeddings" in err
