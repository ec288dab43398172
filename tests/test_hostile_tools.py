"""Hostile input to the tools around training: tokenizer, fill-mask, evaluate, export, pretokenize, demo.

Each mistake must end in one sentence on stderr naming the file, flag or value and the fix, exit code 2,
no traceback, and nothing lost; the real CLI runs on real files.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import SPECIALS, VOCAB, make_shards, make_tokenizer
from encoder_train.cli import main
from encoder_train.config import BUNDLED_CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent

# A two-step run of a one-layer model: a real checkpoint in about a second.
CONFIG = """
model: {hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, max_position_embeddings: 130}
data: {num_workers: 0}
training: {batch_size: 8, max_steps: 2, warmup_steps: 1, precision: fp32, log_interval: 1}
"""


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_error(err: str) -> str:
    """The single `encoder-train: error: ...` line, and nothing else, on stderr."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("encoder-train: error: "), err
    assert "Traceback" not in err
    return lines[0]


def env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(checkpoint, its tokenizer.json, held-out shards)."""
    root = tmp_path_factory.mktemp("trained")
    tok = make_tokenizer(root / "tokenizer.json")
    data = make_shards(root / "data", files=1, rows=16)
    cfg = root / "c.yaml"
    cfg.write_text(CONFIG)
    assert main(["train", "--config_file", str(cfg), "--data_dir", str(data), "--tokenizer_filepath", str(tok),
                 "--checkpoint_dir", str(root / "ckpt")]) == 0
    return root / "ckpt" / "checkpoint_00000002.pt", tok, data


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"the model reads token {i} of the text, then token {i + 1}." for i in range(200)))
    return path


# ---- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_refuses_to_replace_an_existing_output_unless_overwrite(capsys, tmp_path, corpus):
    out = tmp_path / "tokenizer.json"
    out.write_text("my hand-made tokenizer")
    rc, stdout, err = cli(capsys, "tokenizer", "--input", corpus, "--output", out, "--vocab_size", 300)
    line = one_error(err)
    assert rc == 2 and not stdout
    assert str(out) in line and "already exists" in line and "--overwrite" in line
    assert out.read_text() == "my hand-made tokenizer"  # untouched

    rc, stdout, _ = cli(capsys, "tokenizer", "--input", corpus, "--output", out, "--vocab_size", 300, "--overwrite")
    assert rc == 0 and f"wrote {out}" in stdout
    assert Tokenizer.from_file(str(out)).token_to_id("<mask>") == 4


def test_tokenizer_vocab_size_beyond_the_maximum_is_refused(tmp_path, corpus):
    # A subprocess: before the fix the Rust trainer aborted the whole process (no Python exception).
    out = tmp_path / "tokenizer.json"
    r = subprocess.run([sys.executable, "-m", "encoder_train", "tokenizer", "--input", str(corpus), "--output",
                        str(out), "--vocab_size", str(10**12)], capture_output=True, text=True, env=env(), timeout=60)
    line = one_error(r.stderr)
    assert r.returncode == 2 and not r.stdout
    assert f"vocab_size {10**12} is too large" in line and "--vocab_size 1000000 or less" in line
    assert not out.exists()


# ---- fill-mask ----------------------------------------------------------------------------------


def test_fill_mask_top_k_beyond_the_vocabulary_shows_every_word(capsys, trained):
    ckpt, _, _ = trained
    rc, out, err = cli(capsys, "fill-mask", "--checkpoint", ckpt, "--top_k", 10_000, "w5 <mask> w7")
    assert rc == 0 and "Traceback" not in err
    shown = out.split("mask 1:")[1].split()
    tokens, probs = shown[0::2], [float(p) for p in shown[1::2]]
    words = VOCAB - len(SPECIALS)
    assert len(tokens) == words and len(set(tokens)) == words  # every word once, no special token
    assert not {repr(s) for s in SPECIALS} & set(tokens)
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=0.01)


def word_tokenizer(path: Path, vocab: dict[str, int]) -> Path:
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))
    return path


def words_in_order(order: list[str]) -> dict[str, int]:
    return {t: i for i, t in enumerate(order)}


@pytest.mark.parametrize("kind, expected", [
    ("larger", "vocabulary size 200 vs 128"),
    # The same size, but <mask> and <pad> trade places with words.
    ("specials moved", "<pad> id"),
    # The same size and special ids, but every word under another id: the answers would be wrong words.
    ("words moved", "token 'w127' has id 5 vs 127"),  # the first id that names another token
])
def test_fill_mask_refuses_a_tokenizer_of_another_vocabulary(capsys, trained, tmp_path, kind, expected):
    ckpt, _, _ = trained
    words = [f"w{i}" for i in range(len(SPECIALS), VOCAB)]
    if kind == "larger":
        other = make_tokenizer(tmp_path / "other.json", vocab=200)
    elif kind == "specials moved":
        other = word_tokenizer(tmp_path / "other.json", words_in_order(words[:2] + SPECIALS + words[2:]))
    else:
        other = word_tokenizer(tmp_path / "other.json", words_in_order(SPECIALS + words[::-1]))
    rc, out, err = cli(capsys, "fill-mask", "--checkpoint", ckpt, "--tokenizer_filepath", other, "w5 <mask>")
    line = one_error(err)
    assert rc == 2 and not out
    assert str(other) in line and str(ckpt) in line and expected in line
    assert "leave out --tokenizer_filepath" in line


def test_fill_mask_accepts_the_tokenizer_it_was_trained_with(capsys, trained):
    ckpt, tok, _ = trained
    rc, out, _ = cli(capsys, "fill-mask", "--checkpoint", ckpt, "--tokenizer_filepath", tok, "w5 <mask>")
    assert rc == 0 and "mask 1:" in out


def test_fill_mask_checks_every_text_before_printing_any(capsys, trained):
    ckpt, _, _ = trained
    rc, out, err = cli(capsys, "fill-mask", "--checkpoint", ckpt, "w5 <mask> w7", "w5 w6 w7")
    line = one_error(err)
    assert rc == 2 and "has no <mask>" in line
    assert out == ""  # not even the first, good text


# ---- a folder or a missing file where a checkpoint is expected -----------------------------------


@pytest.mark.parametrize("command", ["evaluate", "fill-mask", "export"])
@pytest.mark.parametrize("wrong", ["folder", "missing"])
def test_checkpoint_paths_name_each_commands_own_flag(capsys, trained, tmp_path, command, wrong):
    if command == "export":
        pytest.importorskip("transformers")
    ckpt, _, data = trained
    path = ckpt.parent if wrong == "folder" else tmp_path / "nowhere.pt"
    extra = {"evaluate": ["--data_dir", data], "fill-mask": ["w5 <mask>"],
             "export": ["--output_dir", tmp_path / "hf"]}[command]
    rc, out, err = cli(capsys, command, "--checkpoint", path, *extra)
    line = one_error(err)
    assert rc == 2 and not out
    assert "--load_checkpoint" not in line and "pass --checkpoint with a checkpoint file" in line
    if wrong == "folder":
        assert f"--checkpoint {path} is a folder, not a checkpoint file" in line and str(ckpt) in line
    else:
        assert f"checkpoint {path} does not exist" in line
    assert not (tmp_path / "hf").exists()


def test_train_load_checkpoint_folder_names_train_s_flag(capsys, trained, tmp_path):
    ckpt, tok, data = trained
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    rc, _, err = cli(capsys, "train", "--config_file", cfg, "--data_dir", data, "--tokenizer_filepath", tok,
                     "--checkpoint_dir", tmp_path / "new", "--load_checkpoint", ckpt.parent)
    line = one_error(err)
    assert rc == 2
    assert f"--load_checkpoint {ckpt.parent} is a folder, not a checkpoint file" in line and str(ckpt) in line
    rc, _, err = cli(capsys, "train", "--config_file", cfg, "--data_dir", data, "--tokenizer_filepath", tok,
                     "--checkpoint_dir", tmp_path / "new", "--load_checkpoint", tmp_path / "nowhere.pt")
    assert rc == 2 and "pass --load_checkpoint with a checkpoint file or latest" in one_error(err)


# ---- demo ---------------------------------------------------------------------------------------


def bar_steps(err: Path) -> list[int]:
    """The step counts the progress bar has shown so far (its first is the step it started from)."""
    return [int(n) for n in re.findall(r"(\d+)/5000 \[", err.read_text())]


def stop_demo_while_training(work: Path, tmp_path: Path, signum: int, name: str) -> tuple[int, str, str]:
    """Start the demo, wait until its training loop has finished a step, send `signum`."""
    args = [sys.executable, "-m", "encoder_train", "demo", "--workdir", str(work), "--corpus_bytes", "60000",
            "--max_steps", "5000"]
    out_path, err_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with out_path.open("w") as out, err_path.open("w") as err:  # files: a full pipe would stall the demo
        proc = subprocess.Popen(args, stdout=out, stderr=err, env=env())
        try:
            deadline = time.monotonic() + 240
            # A progress line (output to a file gets lines, not the bar), or the bar moving past its first count:
            # a step is done, inside the loop that handles signals.
            while not re.search(r"^step \d+/5000", err_path.read_text(), re.M) \
                    and ((steps := bar_steps(err_path)) == [] or max(steps) <= steps[0]) and proc.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None, err_path.read_text()[-2000:]
            proc.send_signal(signum)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, out_path.read_text(), err_path.read_text()


@pytest.mark.slow
def test_demo_stopped_by_a_signal_says_to_rerun_the_demo_and_exits_128_plus_signal(tmp_path):
    work = tmp_path / "demo"
    rc, out, err = stop_demo_while_training(work, tmp_path, signal.SIGINT, "first")
    assert "[4/7] training" in out and "Traceback" not in err
    assert rc == 128 + signal.SIGINT, err[-2000:]
    stopped = [line for line in err.splitlines() if line.startswith("stopped by SIGINT")]
    assert len(stopped) == 1 and "Run the same encoder-train demo command again" in stopped[0]
    assert "--load_checkpoint" not in err
    assert list((work / "checkpoints").glob("checkpoint_*.pt"))

    # Running it again does resume, as the message says; SIGTERM stops it the same way.
    rc, out, err = stop_demo_while_training(work, tmp_path, signal.SIGTERM, "second")
    assert out.count("already there") == 3 and "resuming from" in out
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "Run the same encoder-train demo command again" in err
    assert "--load_checkpoint" not in err and "Traceback" not in err


def test_demo_duration_agrees_between_readme_and_demo_yaml():
    readme = re.findall(r"in about (\S+) minutes", (ROOT / "README.md").read_text())
    yaml = re.findall(r"in about (\S+) minutes", (BUNDLED_CONFIG_DIR / "demo.yaml").read_text())
    assert readme[:1] == yaml == ["4"]


# ---- small ones ---------------------------------------------------------------------------------


def test_pretokenize_counts_are_pluralised_and_seq_len_names_the_config_key(capsys, tmp_path):
    tok = make_tokenizer(tmp_path / "tok.json")
    text = tmp_path / "words.txt"
    text.write_text("w5 w6 w7 w8\n\nw9 w10 w11\n")
    out_dir = tmp_path / "shards"
    base = ["pretokenize", "--input", text, "--tokenizer_filepath", tok, "--output_dir", out_dir]

    rc, out, err = cli(capsys, *base, "--seq_len", 600, "--config_file", "tiny.yaml")
    line = one_error(err)
    assert rc == 2 and "max_positions" not in line
    assert "--seq_len 600" in line and "model.max_position_embeddings 130" in line and "tiny.yaml" in line
    assert "--seq_len 128 or less" in line and not out_dir.exists()

    rc, out, _ = cli(capsys, *base, "--seq_len", 16, "--val_fraction", 0)
    assert rc == 0 and "wrote 1 training row in 1 shard to" in out and "no held-out rows" in out
    rc, _, err = cli(capsys, *base, "--seq_len", 16, "--val_fraction", 0)
    assert rc == 2 and "already holds 1 .pt shard (e.g." in one_error(err)


def test_an_unknown_argument_points_at_the_subcommand_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--config_file", "tiny.yaml", "--bogus"])
    assert e.value.code == 2
    line = one_error(capsys.readouterr().err)
    assert "unrecognized arguments: --bogus" in line and "see `encoder-train train --help`" in line
    with pytest.raises(SystemExit):
        main(["--bogus"])
    assert "see `encoder-train --help`" in one_error(capsys.readouterr().err)


def test_train_help_lists_every_bundled_config(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps help lines
    names = sorted(p.name for p in BUNDLED_CONFIG_DIR.glob("*.yaml"))
    assert "demo.yaml" in names and f"(bundled: {', '.join(names)})" in text

