"""Files as a colleague and a careless disk see them: modes that follow the umask, checkpoints that do not load,
a fine-tuned checkpoint where pretraining expects its own, table fields beyond Python's CSV limit."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from encoder_train import checkpoint
from encoder_train.cli import main
from helpers.finetune_data import examples, tiny_checkpoint, write_table
from helpers.train_runs import config, one_sentence


def run(capsys, *args) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def train_two_steps(capsys, tmp_path: Path, shard_dir: Path, tokenizer_file: Path, ckpt: Path) -> int:
    return run(capsys, "train", "--config_file", config(tmp_path, steps=2, every=1), "--data_dir", shard_dir,
               "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", ckpt)[0]


# ---- a checkpoint that does not load --------------------------------------------------------------------


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"PK\x03\x04 not a zip at all", b"\x80\x02}q\x00."])
def test_a_newest_checkpoint_that_does_not_load_falls_back_to_the_last_good_one(capsys, tmp_path, shard_dir,
                                                                                  tokenizer_file, content):
    ckpt = tmp_path / "ckpt"
    assert train_two_steps(capsys, tmp_path, shard_dir, tokenizer_file, ckpt) == 0
    bad = checkpoint.checkpoint_path(ckpt, 3)
    bad.write_bytes(content)
    # latest: the bad file is skipped and said so; the run resumes from step 2 and finishes at 4.
    rc, err = run(capsys, "train", "--config_file", config(tmp_path, steps=4, every=1), "--data_dir", shard_dir,
                  "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", ckpt, "--load_checkpoint", "latest")
    assert rc == 0 and "Traceback" not in err
    assert bad.exists()  # skipped, never deleted: the run's own step 3 replaces it by its atomic rename
    assert checkpoint.load(checkpoint.checkpoint_path(ckpt, 4))["step"] == 4


@pytest.mark.parametrize("command", ["evaluate", "fill-mask", "export"])
def test_a_file_that_is_not_a_checkpoint_is_one_sentence_everywhere(capsys, tmp_path, command):
    bad = tmp_path / "checkpoint_00000007.pt"
    bad.write_bytes(os.urandom(2048))
    args = {"evaluate": ["--checkpoint", bad, "--data_dir", tmp_path],
            "fill-mask": ["--checkpoint", bad, "a <mask> b"],
            "export": ["--checkpoint", bad, "--output_dir", tmp_path / "out"]}[command]
    rc, err = run(capsys, command, *args)
    assert rc == 2 and "truncated or corrupt" in one_sentence(err) and str(bad) in err
    assert bad.exists()  # never deleted


def test_a_random_bytes_checkpoint_given_by_name_is_one_sentence(capsys, tmp_path, shard_dir, tokenizer_file):
    bad = tmp_path / "old" / "checkpoint_00000002.pt"
    bad.parent.mkdir()
    bad.write_bytes(os.urandom(4096))
    rc, err = run(capsys, "train", "--config_file", config(tmp_path, steps=2, every=1), "--data_dir", shard_dir,
                  "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", tmp_path / "ckpt",
                  "--load_checkpoint", bad)
    assert rc == 2 and "truncated or corrupt" in one_sentence(err) and bad.exists()


def test_a_fine_tuned_checkpoint_cannot_resume_pretraining(capsys, tmp_path, shard_dir, tokenizer_file):
    pretrained = tiny_checkpoint(tmp_path / "pre")
    train_file = write_table(tmp_path / "train.tsv", examples(32, 0), ["text", "label"])
    dev = write_table(tmp_path / "dev.tsv", examples(16, 1), ["text", "label"])
    rc, err = run(capsys, "finetune", "--checkpoint", pretrained, "--train_file", train_file, "--validation_file",
                  dev, "--output_dir", tmp_path / "ft", "--epochs", "1", "--max_length", "32")
    assert rc == 0, err
    tuned = checkpoint.latest(tmp_path / "ft" / "seed_0")
    rc, err = run(capsys, "train", "--config_file", config(tmp_path, steps=2, every=1), "--data_dir", shard_dir,
                  "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", tmp_path / "ckpt",
                  "--load_checkpoint", tuned)
    assert rc == 2 and "fine-tuned classifier" in one_sentence(err)


# ---- modes follow the umask -----------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_exports_and_shards_follow_the_umask(tmp_path, shard_dir, tokenizer_file, umask):
    pytest.importorskip("safetensors")
    pytest.importorskip("transformers")
    ckpt, out = tmp_path / "ckpt", tmp_path / "export"
    script = f"""
import os, sys
os.umask({umask:#o})
from encoder_train.cli import main
rc = main(["train", "--config_file", {str(config(tmp_path, steps=2, every=1))!r}, "--data_dir", {str(shard_dir)!r},
           "--tokenizer_filepath", {str(tokenizer_file)!r}, "--checkpoint_dir", {str(ckpt)!r}])
rc = rc or main(["export", "--checkpoint", {str(ckpt / "checkpoint_00000002.pt")!r}, "--output_dir", {str(out)!r}])
sys.exit(rc)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = 0o666 & ~umask
    files = [ckpt / "checkpoint_00000002.pt", ckpt / "metrics.jsonl", out / "model.safetensors", out / "config.json",
             out / "tokenizer.json"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == expected, (f, oct(f.stat().st_mode))


# ---- table fields beyond Python's CSV limit -------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".tsv", ".csv"])
def test_a_field_over_the_csv_limit_is_read(tmp_path, suffix):
    from encoder_train.finetune.tasks import read_records

    rows = examples(8, 0)
    rows[3]["text"] = "word " * 250_000  # 1.25 MB, ten times Python's default field limit
    path = write_table(tmp_path / f"train{suffix}", rows, ["text", "label"])
    records = read_records(path, "--train_file")
    assert len(records.rows) == 8 and len(records.rows[3][1]["text"]) == len(rows[3]["text"])


def test_a_field_over_the_reader_limit_is_one_sentence_naming_the_line(tmp_path, monkeypatch):
    from encoder_train.errors import UserError
    from encoder_train.finetune import tasks

    monkeypatch.setattr(tasks, "FIELD_LIMIT", 1000)  # the reader's own error, at a size a test can afford
    rows = examples(8, 0)
    rows[5]["text"] = "x" * 2000
    path = write_table(tmp_path / "train.tsv", rows, ["text", "label"])
    with pytest.raises(UserError, match=r"train.tsv line 7 cannot be read as a .tsv table"):
        tasks.read_records(path, "--train_file")
