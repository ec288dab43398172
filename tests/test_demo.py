"""The quickstart, end to end at a reduced size: corpus -> tokenizer -> shards -> train -> evaluate -> fill-mask."""

import json

from encoder_train.cli import main


def test_demo_runs_end_to_end_and_resumes(capsys, tmp_path):
    work = tmp_path / "demo"
    args = ["demo", "--workdir", str(work), "--max_steps", "12", "--corpus_bytes", "150000"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for artefact in ("corpus.txt", "tokenizer.json", "data/train", "data/val", "checkpoints/checkpoint_00000012.pt",
                     "checkpoints/metrics.jsonl", "summary.json"):
        assert (work / artefact).exists(), artefact
    summary = json.loads((work / "summary.json").read_text())
    # Even 12 steps take the held-out loss clearly below an untrained model's.
    assert summary["trained_loss"] < summary["untrained_loss"] - 1.0
    assert "untrained model: loss" in out and "trained model:   loss" in out
    assert out.count("-> ") == 4  # four fill-mask examples, each with its guesses

    # Again: every stage finds its output and the training has nothing left to do.
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.count("already there") == 3 and "nothing to do" in again
    assert json.loads((work / "summary.json").read_text())["trained_loss"] == summary["trained_loss"]
