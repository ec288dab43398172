"""The quickstart, end to end at a reduced size: corpus -> tokenizer -> shards -> train -> evaluate -> fine-tune;
what it shows after training, and how a stopped demo continues."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from encoder_train.cli import main
from encoder_train.evaluate import show_guesses
from encoder_train.quickstart.docstrings import MIN_PER_CLASS

STAGES = ["corpus", "tokenizer", "shards", "training", "evaluation", "fine-tuning", "report card"]


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
    assert "fill-mask gets no held-out word of 4+ letters right yet" in out
    assert "encoder-train fill-mask" not in out and "encoder-train evaluate" in out
    assert summary["runs"] == 1 and list(summary["stages"]) == STAGES
    ran = {name: stage["this_run"] for name, stage in summary["stages"].items()}
    assert ran == dict.fromkeys(STAGES[:5], "ran") | {"fine-tuning": "skipped: too few docstrings",
                                                     "report card": "ran"}
    # The report card: the demo's model and the same model untrained, on the held-out rows and the offline suite.
    card = summary["report_card"]["results"]
    assert set(card) == {"demo", "untrained"}
    for model in card.values():
        assert set(model) == {"heldout", "docstrings", "docstring-sts"}
        assert 0.0 <= model["docstrings"]["ndcg@10"] <= 1.0 and -1.0 <= model["docstring-sts"]["spearman"] <= 1.0
    # Its held-out task masks as stage 5 does, and its untrained model is the one stage 5 builds: the same losses.
    assert card["demo"]["heldout"]["loss"] == pytest.approx(summary["trained_loss"], rel=1e-4)
    assert card["untrained"]["heldout"]["loss"] == pytest.approx(summary["untrained_loss"], rel=1e-4)
    assert (work / "report" / "report.md").is_file() and (work / "eval" / "demo.yaml").is_file()
    assert "[7/7] report card" in out and "## docstrings (retrieval)" in out and "| untrained |" in out
    assert "heldout: loss" in out and "untrained: training helped" in out

    # Again: every stage finds its output; the summary's time is both runs'.
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.count("already there") == 3 and "nothing to do" in again and "evaluated before" in again
    assert again.count("done before, kept") == 6 and "## heldout (mlm)" in again
    second = json.loads((work / "summary.json").read_text())
    assert second["trained_loss"] == summary["trained_loss"]
    assert second["trained_mask_loss"] == summary["trained_mask_loss"]
    assert second["runs"] == 2 and "over 2 runs of the demo" in again
    assert second["report_card"] == summary["report_card"]
    for name in STAGES[:5] + ["report card"]:
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
    # Text of no package (as the help() topics are), for enough held-out rows.
    paragraphs += [f"Topic {i}: the language reference describes statements, expressions and the data model."
                   for i in range(150)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def run_until(args: list[str], line: str, signum: int, err_path: Path) -> tuple[int, str, str]:
    """Run the demo in a process, send `signum` once `line` is printed; its exit code, stdout and stderr."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    with err_path.open("w") as err:  # a file: a full pipe would stall the demo while stdout is read
        proc = subprocess.Popen([sys.executable, "-m", "encoder_train", *args], stdout=subprocess.PIPE, stderr=err,
                                text=True, env=env)
        out = []
        for text in proc.stdout:
            out.append(text)
            if line in text:
                proc.send_signal(signum)
                break
        rest, _ = proc.communicate(timeout=300)
    return proc.returncode, "".join(out) + rest, err_path.read_text()


@pytest.mark.slow
def test_a_demo_stopped_while_fine_tuning_says_where_and_continues(tmp_path, capsys):
    work = tmp_path / "demo"
    docstring_corpus(work / "corpus.txt")
    args = ["demo", "--workdir", str(work), "--max_steps", "8"]
    kept = work / "finetune" / "results.json"

    rc, out, err = run_until(args, "fine-tuning the pretrained model", signal.SIGTERM, tmp_path / "err1")
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped while fine-tuning the pretrained model" in out and "Traceback" not in err
    assert ("stopped by SIGTERM during [6/7] fine-tuning. What finished is kept: run the same encoder-train demo "
            "command again to continue from there.") in err
    assert not kept.exists()

    rc, out, err = run_until(args, "fine-tuning the untrained model", signal.SIGINT, tmp_path / "err2")
    assert rc == 128 + signal.SIGINT, err[-2000:]
    assert out.count("already there") == 3 and "evaluated before" in out
    assert f"stopped while fine-tuning the untrained model; the pretrained model's fine-tune is kept in {kept}" in out
    assert "stopped by SIGINT during [6/7] fine-tuning" in err and "Traceback" not in err
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
        dict.fromkeys(STAGES[:5], "skipped") | {"fine-tuning": "resumed", "report card": "ran"})


WORDS = "apple river stone cloud maple tiger lemon piano forest candle silver rocket garden window planet".split()


def test_the_demo_shows_held_out_words_that_fill_mask_gets_right(tmp_path, capsys):
    """A model that learned its text: stage 5 shows words it gets right, and the command it suggests answers so.
    Most words of this text are ' spam': a model that learned the word frequencies already gets those right."""
    from encoder_train.config import load_config
    from encoder_train.data.prepare import pretokenize
    from encoder_train.quickstart.demo import Progress, Work, held_out_results, show_evaluation, write_summary
    from encoder_train.quickstart.learned import WORD
    from encoder_train.quickstart.report_card import Card
    from encoder_train.tokenizer import train_tokenizer

    corpus = tmp_path / "corpus.txt"
    rng = random.Random(0)
    corpus.write_text("\n\n".join(" ".join(rng.choice(("spam", "spam", "spam", rng.choice(WORDS))) for _ in range(20))
                                  + "." for _ in range(300)) + "\n")
    train_tokenizer([corpus], tmp_path / "tokenizer.json", vocab_size=400)
    pretokenize([corpus], tmp_path / "tokenizer.json", tmp_path / "data", seq_len=32, val_fraction=0.1,
                progress=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {hidden_size: 64, num_layers: 2, num_heads: 2, intermediate_size: 128, dropout: 0.0, "
                   "max_position_embeddings: 34}\ndata: {num_workers: 0}\ntraining: {batch_size: 16, max_steps: 60, "
                   "learning_rate: 3.0e-3, warmup_steps: 10, precision: fp32, log_interval: 50}\n")
    ckpt = tmp_path / "ckpt"
    assert main(["train", "--config_file", str(cfg), "--data_dir", str(tmp_path / "data" / "train"),
                 "--tokenizer_filepath", str(tmp_path / "tokenizer.json"), "--checkpoint_dir", str(ckpt)]) == 0
    checkpoint = ckpt / "checkpoint_00000060.pt"
    results = held_out_results(load_config(cfg), checkpoint, tmp_path / "data")
    untrained, trained = results["untrained_masks"], results["trained_masks"]
    assert trained["loss"] < untrained["loss"] - 1.0 and trained["frequency_loss"] < untrained["loss"] - 1.0
    assert trained["first_guesses"][0][0] == " spam" and trained["word_top1"] > 0.5 > untrained["word_top1"]
    assert len(results["examples"]) == 4
    capsys.readouterr()
    for e in results["examples"]:
        assert e["text"].count("<mask>") == 1 and WORD.fullmatch(e["word"]) and e["trained"][0][0] == e["word"]
        # What the demo printed is what fill-mask prints for the same text.
        assert main(["fill-mask", "--checkpoint", str(checkpoint), "--top_k", "5", e["text"]]) == 0
        assert capsys.readouterr().out == f"{e['text']}\n  mask 1: {show_guesses([tuple(g) for g in e['trained']])}\n"
    show_evaluation(results)
    out = capsys.readouterr().out
    assert "the first 4 of these words that the trained model gets right" in out
    assert out.count("        trained:   ") == 4 and out.count("        untrained: ") == 4

    work = tmp_path / "work"
    work.mkdir()
    card = Card(work / "report", work / "eval" / "demo.yaml", {}, None, None)  # no card: this test is stage 5's
    write_summary(Work(work), Progress(work / "progress.json"), results, None, card, checkpoint)
    suggested = [line for line in capsys.readouterr().out.splitlines() if "encoder-train fill-mask" in line]
    first = results["examples"][0]
    assert suggested == [f"  encoder-train fill-mask --checkpoint {checkpoint} '{first['text']}'"]


def test_nothing_in_the_trainer_imports_the_quickstart():
    """The quickstart uses the trainer as a user would; only the cli's `demo` subcommand imports it, when it runs."""
    import ast

    import encoder_train

    root = Path(encoder_train.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.parent.name == "quickstart":
            continue
        tree = ast.parse(path.read_text())
        top = set(tree.body)  # module-level statements: imported whenever the module is
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [f"{node.module}"] if isinstance(node, ast.ImportFrom) and node.module else [])
            if any(n == "encoder_train.quickstart" or n.startswith("encoder_train.quickstart.") for n in names):
                if path.name != "cli.py" or node in top:
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert found == []
