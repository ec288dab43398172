"""Hostile inputs found by a campaign over every command, each now one sentence and exit 2 (or a correct run):
odd YAML, integers that hang, paths that are pipes, dangling links or the wrong folder, text the tokenizers
choke on, shards too large to buffer, checkpoints without a checksum, a demo corpus too small to evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tokenizer
from encoder_train.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("encoder-train: error:"), err[-2000:]
    return lines[0]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **extra}


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


TINY = """
model: {hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32, max_position_embeddings: 40}
data: {num_workers: 0}
training: {batch_size: 4, max_steps: 2, precision: fp32}
"""


# ---- config ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, where", [
    # PyYAML keeps the second silently: the first section's keys were lost without a word.
    ("model: {hidden_size: 16}\ntraining: {max_steps: 2}\nmodel: {num_layers: 1}\n", "lines 1 and 3"),
    ("training: {max_steps: 2, max_steps: 5}\n", "line 1, columns 12 and 26"),
])
def test_a_key_written_twice_is_refused(capsys, tmp_path, text, where):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text(text)
    rc, _, err = run_cli(capsys, "train", "--config_file", cfg, "--dry_run")
    line = one_error(err)
    assert rc == 2 and str(cfg) in line and "written twice" in line and where in line


def test_a_merge_key_may_still_be_overridden(capsys, tmp_path, shard_dir, tokenizer_file):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(TINY + "checkpoint:\n  <<: {checkpoint_every: 7}\n  checkpoint_every: 3\n")
    rc, out, err = run_cli(capsys, "train", "--config_file", cfg, "--data_dir", shard_dir, "--tokenizer_filepath",
                           tokenizer_file, "--checkpoint_dir", tmp_path / "ck", "--dry_run")
    assert rc == 0, err
    assert "checkpoint_every: 3" in out


def test_a_duplicate_inside_a_set_value_is_refused(capsys):
    rc, _, err = run_cli(capsys, "train", "--config_file", "tiny.yaml", "--set", "training.batch_size={a: 1, a: 2}")
    assert rc == 2 and "--set training.batch_size={a: 1, a: 2}: key 'a' is written twice" in one_error(err)


@pytest.mark.parametrize("text, expected", [
    ("1: 2\ntraining: {max_steps: 2}\n", "key '1' at the top level is not a name"),
    ("model: {1: 2}\n", "key '1' in model is not a name"),
    ("model:\ntraining: {max_steps: 2}\n", "section model is empty"),
])
def test_keys_that_are_not_names_and_empty_sections_say_so(capsys, tmp_path, text, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    rc, _, err = run_cli(capsys, "train", "--config_file", cfg, "--dry_run")
    assert rc == 2 and expected in one_error(err)


@pytest.mark.parametrize("setting, limit", [
    # Before: 10**23 rows gathered one by one (hang, memory without end); the loader queueing 10**20 batches
    # before the first (hang); 10**15 micro-batches held (5 GB in a minute, SIGTERM unheard); 10**6 workers.
    ("training.batch_size=100000000000000000000000", "65536"),
    ("data.prefetch_batches=100000000000000000000", "1024"),
    ("training.gradient_accumulation_steps=1000000000000000", "16384"),
    ("data.num_workers=1000000", "256"),
])
def test_integers_that_would_hang_or_fork_without_end_are_refused(capsys, setting, limit):
    rc, _, err = run_cli(capsys, "train", "--config_file", "tiny.yaml", "--set", setting)
    line = one_error(err)
    assert rc == 2 and f"--set {setting} is invalid" in line and f"less than or equal to {limit}" in line


def test_rows_per_step_beyond_the_limit_are_refused(capsys):
    rc, _, err = run_cli(capsys, "train", "--config_file", "tiny.yaml", "--set", "training.batch_size=65536",
                         "--set", "training.gradient_accumulation_steps=17")
    line = one_error(err)
    assert rc == 2 and "65536 x 17" in line and "1,114,112 rows per optimizer step" in line


@pytest.mark.parametrize("inside", ["data/ck", "data", "val/sub"])
def test_a_checkpoint_folder_inside_a_data_folder_is_refused(capsys, tmp_path, tokenizer_file, inside):
    # Before: the first run wrote checkpoint_*.pt among the shards, and every later run (a resume too) stopped
    # on "data file .../checkpoint_00000002.pt holds a dict, not a tensor".
    from conftest import make_shards

    data, val = make_shards(tmp_path / "data", files=1), make_shards(tmp_path / "val", files=1)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc, _, err = run_cli(capsys, "train", "--config_file", cfg, "--data_dir", data, "--val_data_dir", val,
                         "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", tmp_path / inside)
    line = one_error(err)
    assert rc == 2 and "lies inside the data" in line and "--checkpoint_dir outside it" in line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_a_config_that_is_a_pipe_is_refused_without_blocking(tmp_path):
    pipe = fifo(tmp_path / "c.yaml")
    r = subprocess.run([sys.executable, "-m", "encoder_train", "train", "--config_file", str(pipe), "--dry_run"],
                       capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 2 and "is not a regular file (a pipe or a device)" in one_error(r.stderr)


# ---- the CLI's own error path ------------------------------------------------------------------------------


@pytest.mark.parametrize("variables", [{"WORLD_SIZE": "2"}, {"WORLD_SIZE": "abc", "RANK": "0"}])
def test_a_stray_world_size_does_not_turn_an_error_into_a_traceback(tmp_path, variables):
    # Before: KeyError 'RANK' / ValueError from the handler that prints the user's error.
    r = subprocess.run([sys.executable, "-m", "encoder_train", "train", "--config_file", "tiny.yaml", "--set",
                        "training.batch_size=0"], capture_output=True, text=True, env=env(**variables), timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "training.batch_size" in r.stderr.strip().splitlines()[-1]


# ---- tokenizer and pretokenize ----------------------------------------------------------------------------


@pytest.fixture
def words(tmp_path) -> Path:
    path = tmp_path / "words.txt"
    path.write_text("\n\n".join(" ".join(f"w{5 + (i * j) % 120}" for j in range(30)) for i in range(60)))
    return path


def test_text_input_that_is_a_pipe_is_refused(capsys, tmp_path, words):
    # `--input <(zcat x.gz)`: before, "input file /dev/fd/63 does not exist".
    pipe = fifo(tmp_path / "pipe.txt")
    rc, _, err = run_cli(capsys, "tokenizer", "--input", pipe, "--output", tmp_path / "t.json", "--vocab_size", 300)
    assert rc == 2 and f"input {pipe} is not a regular file" in one_error(err)


def test_a_tokenizer_file_that_is_a_pipe_is_refused(capsys, tmp_path, words):
    pipe = fifo(tmp_path / "tok.json")
    rc, _, err = run_cli(capsys, "pretokenize", "--input", words, "--tokenizer_filepath", pipe, "--output_dir",
                         tmp_path / "out")
    assert rc == 2 and f"tokenizer file {pipe} is not a regular file" in one_error(err)


def test_tokenizer_output_that_is_not_a_regular_file_is_never_replaced(capsys, tmp_path, words):
    # Before, `--output /dev/null --overwrite` as root replaced the device node with a JSON file.
    pipe = fifo(tmp_path / "out.json")
    rc, _, err = run_cli(capsys, "tokenizer", "--input", words, "--output", pipe, "--vocab_size", 300, "--overwrite")
    assert rc == 2 and "is not a regular file (a device or a pipe)" in one_error(err)
    assert pipe.is_fifo()


@pytest.mark.parametrize("command", ["tokenizer", "pretokenize"])
@pytest.mark.parametrize("line, expected", [
    ('{"text": "hello \\ud800 world"}', "has the escape \\ud800, half of a UTF-16 pair"),
    ("[" * 100_000 + "]" * 100_000, "nests JSON arrays or objects too deeply"),
])
def test_jsonl_lines_that_break_the_readers_name_the_line(capsys, tmp_path, command, line, expected):
    # Before: UnicodeEncodeError (tokenizer) / TypeError (pretokenize) / RecursionError, with tracebacks.
    data = tmp_path / "x.jsonl"
    data.write_text('{"text": "w5 w6 w7"}\n' + line + "\n")
    tok = make_tokenizer(tmp_path / "tok.json")
    extra = (["--output", tmp_path / "t.json", "--vocab_size", 300] if command == "tokenizer"
             else ["--tokenizer_filepath", tok, "--output_dir", tmp_path / "out"])
    rc, _, err = run_cli(capsys, command, "--input", data, *extra)
    message = one_error(err)
    assert rc == 2 and f"{data} line 2 " in message and expected in message
    assert not (tmp_path / "t.json").exists() and not list(tmp_path.glob("out/*/*.pt"))


def test_a_file_that_is_not_gzip_says_so_plainly(capsys, tmp_path):
    fake = tmp_path / "plain.gz"
    fake.write_text("not gzip at all\n")
    rc, _, err = run_cli(capsys, "tokenizer", "--input", fake, "--output", tmp_path / "t.json", "--vocab_size", 300)
    assert rc == 2 and f"input file {fake} could not be read at all (Not a gzipped file" in one_error(err)


def test_training_pieces_cut_only_long_runs_and_lose_nothing():
    from encoder_train.tokenizer import MAX_TRAINING_RUN_CHARS, _training_pieces

    n = MAX_TRAINING_RUN_CHARS
    text = "a short line\n" + "x" * (2 * n + 5) + " end " + " " * (n + 1) + "z"
    pieces = _training_pieces(text)
    assert "".join(pieces) == text and max(len(p) for p in pieces) <= n + 20
    assert _training_pieces("a b c") == ["a b c"]


def test_a_long_line_without_spaces_does_not_stall_tokenizer_training(tmp_path):
    # The BPE trainer's time grows with the square of a word's length: 1 MB of one "word" took many minutes.
    blob = tmp_path / "blob.txt"
    blob.write_text("some words first\n" + "ab" * 500_000 + "\n")
    r = subprocess.run([sys.executable, "-m", "encoder_train", "tokenizer", "--input", str(blob), "--output",
                        str(tmp_path / "t.json"), "--vocab_size", "300"], capture_output=True, text=True, env=env(),
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "t.json").read_text())["model"]["type"] == "BPE"


@pytest.mark.parametrize("flags, expected", [
    (["--rows_per_shard", 10**12], "pass --rows_per_shard 67108864 or less"),  # of 16 tokens: 4 GiB
    (["--seq_len", 10**12], "pass --seq_len 1073741824 or less"),
])
def test_shards_too_large_to_buffer_are_refused_before_old_shards_go(capsys, tmp_path, words, flags, expected):
    # Before: numpy's MemoryError with a traceback, after --overwrite had deleted the previous shards.
    tok = make_tokenizer(tmp_path / "tok.json")
    base = ["pretokenize", "--input", words, "--tokenizer_filepath", tok, "--output_dir", tmp_path / "out",
            "--seq_len", 16]
    assert run_cli(capsys, *base)[0] == 0
    old = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*.pt")}
    rc, _, err = run_cli(capsys, *base, "--overwrite", *flags)
    assert rc == 2 and expected in one_error(err)
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*.pt")} == old


def test_an_output_folder_that_cannot_be_created_keeps_the_old_shards(capsys, tmp_path, words):
    tok = make_tokenizer(tmp_path / "tok.json")
    base = ["pretokenize", "--input", words, "--tokenizer_filepath", tok, "--output_dir", tmp_path / "out",
            "--seq_len", 16, "--val_fraction", 0]
    assert run_cli(capsys, *base)[0] == 0
    assert not (tmp_path / "out" / "val").exists()  # no row was held out: no empty folder
    (tmp_path / "out" / "val").write_text("a file where the val folder goes")
    old = (tmp_path / "out" / "train" / "shard_00000.pt").read_bytes()
    rc, _, err = run_cli(capsys, *base, "--overwrite")
    assert rc == 2 and "could not create" in one_error(err)
    assert (tmp_path / "out" / "train" / "shard_00000.pt").read_bytes() == old


# ---- shards -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dangling link", "pipe"])
def test_a_shard_that_is_not_a_readable_file_is_named_not_skipped(capsys, tmp_path, shard_dir, tokenizer_file, kind):
    # Before: silently left out, so the run trained on part of the data.
    bad = shard_dir / "zz.pt"
    if kind == "dangling link":
        bad.symlink_to(tmp_path / "unmounted" / "shard.pt")
        expected = f"data file {bad} is a symbolic link to {tmp_path / 'unmounted' / 'shard.pt'}, which does not exist"
    else:
        fifo(bad)
        expected = f"data file {bad} is not a regular file (a pipe or a device)"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY)
    rc, _, err = run_cli(capsys, "train", "--config_file", cfg, "--data_dir", shard_dir, "--tokenizer_filepath",
                         tokenizer_file, "--checkpoint_dir", tmp_path / "ck", "--dry_run")
    assert rc == 2 and expected in one_error(err)


# ---- checkpoints ------------------------------------------------------------------------------------------


def test_a_checkpoint_that_is_a_pipe_is_refused(capsys, tmp_path, shard_dir):
    pipe = fifo(tmp_path / "checkpoint_00000002.pt")
    rc, _, err = run_cli(capsys, "evaluate", "--checkpoint", pipe, "--data_dir", shard_dir)
    assert rc == 2 and f"--checkpoint {pipe} is not a regular file" in one_error(err)


def test_a_checkpoint_without_a_checksum_says_so(capsys, tmp_path, shard_dir):
    path = tmp_path / "old.pt"
    torch.save({"model": {}, "step": 3}, path)
    rc, _, err = run_cli(capsys, "evaluate", "--checkpoint", path, "--data_dir", shard_dir)
    line = one_error(err)
    assert rc == 2 and "carries no checksum" in line and "fails verification" not in line


def test_a_checkpoint_folder_that_is_a_dangling_link_says_so(capsys, tmp_path, shard_dir, tokenizer_file):
    link = tmp_path / "ck"
    link.symlink_to(tmp_path / "gone")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY)
    rc, _, err = run_cli(capsys, "train", "--config_file", cfg, "--data_dir", shard_dir, "--tokenizer_filepath",
                         tokenizer_file, "--checkpoint_dir", link)
    assert rc == 2 and f"--checkpoint_dir {link} is a symbolic link to {tmp_path / 'gone'}" in one_error(err)
    assert not (tmp_path / "gone").exists()


def test_evaluate_names_train_s_flag_for_an_id_outside_the_vocabulary(capsys):
    from encoder_train.data.shards import check_values
    from encoder_train.errors import UserError

    with pytest.raises(UserError, match="the one passed to train's --tokenizer_filepath"):
        check_values("x.pt", torch.tensor([[0, 500, 2]]), vocab_size=128)


# ---- demo -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_demo_workdir_that_is_a_file(capsys, tmp_path, where):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    work = a_file if where == "file" else a_file / "demo"
    rc, _, err = run_cli(capsys, "demo", "--workdir", work, "--max_steps", 1)
    assert rc == 2 and f"--workdir {work}" in one_error(err)
    assert a_file.read_text() == "mine"


def test_demo_corpus_too_small_to_hold_out_rows_names_its_own_flag(capsys, tmp_path):
    # Before: training stopped with "... point --val_data_dir elsewhere", a flag the demo does not have.
    work = tmp_path / "demo"
    rc, _, err = run_cli(capsys, "demo", "--workdir", work, "--corpus_bytes", 3000, "--max_steps", 1)
    line = one_error(err)
    assert rc == 2 and "too small to hold out any row" in line and "--corpus_bytes" in line
    assert "--val_data_dir" not in line and not (work / "checkpoints").exists()
    rc, _, err = run_cli(capsys, "demo", "--workdir", tmp_path / "other", "--corpus_bytes", 1, "--max_steps", 1)
    assert rc == 2 and "larger --corpus_bytes" in one_error(err)
