"""The quickstart, end to end at a reduced size: corpus -> tokenizer -> shards -> train -> evaluate -> fine-tune;
what it shows after training, and how a stopped demo continues."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from encoder_train.cli import main
from encoder_train.evaluate import show_guesses
from encoder_train.finetune.docstrings import MIN_PER_CLASS

STAGES = ["corpus", "tokenizer", "shards", "training", "evaluation", "fine-tuning"]


def test_demo_runs_end_to_end_and_resumes(capsys, tmp_path):
    work = tmp_path / "demo"
    args = ["demo", "--workdir", str(work), "--max_steps", "12", "--corpus_bytes", "150000"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for artefact in ("corpus.txt", "tokenizer.json", "data/train", "data/val", "checkpoints/checkpoint_00000012.pt",
                     "checkpoints/metrics.jsonl", "summary.json", "progress.json"):
        assert (work / artefact).exists(), artefact
    summary = json.loads((work / "summary.json").read_text())
    # Even 12 steps take the held-out loss clearly below an untrained model's...
    assert summary["trained_loss"] < summary["untrained_loss"] - 1.0
    # ...and, where the input is <mask>, below an untrained model's but not past what word frequencies give.
    assert summary["trained_mask_loss"] < summary["untrained_mask_loss"] - 1.0
    assert summary["frequency_mask_loss"] < summary["untrained_mask_loss"] - 1.0
    assert "untrained model: loss" in out and "trained model:   loss" in out
    assert "word frequencies alone" in out and "commonest first guesses" in out and "words of 4+ letters" in out
    # 12 steps get no word right: fill-mask is not advertised, only evaluate.
    assert "no held-out word of 4+ letters for fill-mask to show" in out
    assert "encoder-train fill-mask" not in out and "encoder-train evaluate" in out
    assert summary["runs"] == 1 and list(summary["stages"]) == STAGES
    ran = {name: stage["this_run"] for name, stage in summary["stages"].items()}
    assert ran == dict.fromkeys(STAGES[:5], "ran") | {"fine-tuning": "skipped: too few docstrings"}

    # Again: every stage finds its output; the summary's time is both runs'.
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.count("already there") == 3 and "nothing to do" in again and "evaluated before" in again
    second = json.loads((work / "summary.json").read_text())
    assert second["trained_loss"] == summary["trained_loss"]
    assert second["trained_mask_loss"] == summary["trained_mask_loss"]
    assert second["runs"] == 2 and "over 2 runs of the demo" in again
    for name in STAGES[:5]:
        assert second["stages"][name]["this_run"] == "skipped"
        assert second["stages"][name]["seconds"] >= summary["stages"][name]["seconds"]
    assert second["seconds"] > summary["seconds"]


def test_fill_mask_and_the_demo_show_tokens_alike():
    # As Python writes them: the space that starts a word and whitespace tokens stay visible.
    shown = show_guesses([(" list", 0.31), ("\n", 0.12), (" ", 0.05), ("list", 0.01)])
    assert shown == r"' list' 0.310  '\n' 0.120  ' ' 0.050  'list' 0.010"


def docstring_corpus(path: Path) -> Path:
    """Docstrings of two packages (as corpus.py writes them), enough for the demo's fine-tuning task."""
    paragraphs = []
    for package, topic in (("alpha", "tables of numbers"), ("beta", "network sockets and their buffers")):
        lines = [f"{package}.item{i}: Return entry {i} of the {topic}, or raise an error when entry {i} is "
                 f"missing from the {topic}." for i in range(MIN_PER_CLASS + 5)]
        paragraphs.append("\n".join(lines))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(paragraphs * 3) + "\n", encoding="utf-8")
    return path


def run_until(args: list[str], line: str, signum: int) -> tuple[int, str, str]:
    """Run the demo in a process, send `signum` once `line` is printed; its exit code, stdout and stderr."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "encoder_train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    out = []
    for text in proc.stdout:
        out.append(text)
        if line in text:
            proc.send_signal(signum)
            break
    rest, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(out) + rest, err


def test_a_demo_stopped_while_fine_tuning_says_where_and_continues(tmp_path, capsys):
    work = tmp_path / "demo"
    docstring_corpus(work / "corpus.txt")
    args = ["demo", "--workdir", str(work), "--max_steps", "8"]
    kept = work / "finetune" / "results.json"

    rc, out, err = run_until(args, "fine-tuning the pretrained model", signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped while fine-tuning the pretrained model" in out and "Traceback" not in err
    assert ("stopped by SIGTERM during [6/6] fine-tuning. What finished is kept: run the same encoder-train demo "
            "command again to continue from there.") in err
    assert not kept.exists()

    rc, out, err = run_until(args, "fine-tuning the untrained model", signal.SIGINT)
    assert rc == 128 + signal.SIGINT, err[-2000:]
    assert out.count("already there") == 3 and "evaluated before" in out
    assert f"stopped while fine-tuning the untrained model; the pretrained model's fine-tune is kept in {kept}" in out
    assert "stopped by SIGINT during [6/6] fine-tuning" in err and "Traceback" not in err
    pretrained = json.loads(kept.read_text())["pretrained"]

    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"pretrained model: fine-tuned before, kept in {kept}" in out
    assert "fine-tuning the pretrained model" not in out and "fine-tuning the untrained model" in out
    summary = json.loads((work / "summary.json").read_text())
    assert summary["finetune_trained_accuracy"] == pretrained["accuracy"]
    assert 0.0 <= summary["finetune_untrained_accuracy"] <= 1.0 and summary["finetune_chance"] == 0.5
    assert summary["runs"] == 3
    assert {n: s["this_run"] for n, s in summary["stages"].items()} == (
        dict.fromkeys(STAGES[:5], "skipped") | {"fine-tuning": "resumed"})
