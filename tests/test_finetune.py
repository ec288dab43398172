"""Fine-tuning end to end on the CPU with tiny models and tasks made here: a task solvable only from the text,
a regression, several seeds, a test file, checkpoints and metrics.jsonl, export to
RobertaForSequenceClassification with the same logits and a working pipeline, --init_from_hf, the `glue`
command on a fake GLUE folder, and the demo's stage on a small corpus."""

from __future__ import annotations

import contextlib
import io
import json
import random
import re

import pytest
import torch

from encoder_train import checkpoint
from encoder_train.cli import main
from encoder_train.finetune.loop import FinetuneSettings, load_finetuned
from encoder_train.quickstart.docstrings import run_demo_stage, write_task
from encoder_train.state import load_trained
from helpers.finetune_data import KEYWORDS, examples, sentence, tiny_checkpoint, write_jsonl, write_table

FAST = ["--batch_size", "16", "--learning_rate", "5e-3", "--precision", "fp32"]


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def classified(tmp_path_factory, pretrained):
    """String labels from a .jsonl, two seeds, a test file: the CLI's run and its output folder."""
    root = tmp_path_factory.mktemp("classify")
    train = write_jsonl(root / "train.jsonl", examples(160, 0))
    dev = write_jsonl(root / "dev.jsonl", examples(48, 1))
    test = write_jsonl(root / "test.jsonl", [{k: r[k] for k in ("index", "text")} for r in examples(8, 2)])
    out = root / "out"
    stdout = io.StringIO()  # a module-scoped fixture has no capsys
    with contextlib.redirect_stdout(stdout):
        rc = main(["finetune", "--checkpoint", str(pretrained), "--train_file", str(train), "--validation_file",
                   str(dev), "--test_file", str(test), "--output_dir", str(out), "--epochs", "4", "--num_seeds", "2",
                   *FAST])
    assert rc == 0
    return root, out, stdout.getvalue()


def test_a_task_solvable_only_from_the_text_is_learnt(classified):
    root, out, printed = classified
    result = last_json(printed)
    assert result["task"] == root.name and result["seeds"] == [0, 1]
    assert result["metrics"]["accuracy"] >= 0.9, result
    assert result["std"]["accuracy"] >= 0 and len(result["per_seed"]) == 2
    assert json.loads((out / "results.json").read_text()) == result
    for seed in result["per_seed"]:
        ckpt = out / f"seed_{seed['seed']}"
        assert [p.name for p in ckpt.glob("checkpoint_*.pt")] == [f"checkpoint_{10 * seed['epoch']:08d}.pt"]
        records = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if "val_accuracy" in r]
        assert [r["epoch"] for r in evals] == [1, 2, 3, 4] and any("loss" in r for r in records)
        assert max(r["val_accuracy"] for r in evals) == seed["metrics"]["accuracy"]
        lines = (ckpt / "predictions_test.tsv").read_text().splitlines()
        assert lines[0] == "index\tprediction" and len(lines) == 9
        assert {x.split("\t")[1] for x in lines[1:]} <= {"alpha", "beta"}


def test_a_fine_tuned_checkpoint_loads_as_a_classifier_and_as_an_encoder(classified):
    _, out, printed = classified
    path = last_json(printed)["per_seed"][0]["checkpoint"]
    finetuned = load_finetuned(path, torch.device("cpu"))
    assert finetuned.labels.names == ("alpha", "beta") and not finetuned.model.training
    ids = torch.tensor([[0, 5, 30, 40, 2], [0, 8, 30, 40, 2]])  # <s> keyword filler </s>: alpha, then beta
    assert finetuned.model(ids, ids != 1).argmax(-1).tolist() == [0, 1]
    assert load_trained(path, torch.device("cpu")).model.dims.hidden_size == 32  # evaluate / fill-mask read it too
    # A second run into the same folder is refused rather than mixed with the first.
    rc = main(["finetune", "--checkpoint", str(path), "--train_file", str(out.parent / "train.jsonl"),
               "--validation_file", str(out.parent / "dev.jsonl"), "--output_dir", str(out)])
    assert rc == 2


def test_regression_reaches_a_high_pearson_correlation(capsys, tmp_path, pretrained):
    columns = ["text", "score"]  # 1.0 or 4.0 after the keyword, +- 0.25 of noise
    train = write_table(tmp_path / "train.csv", examples(160, 0, ("alpha", "gamma")), columns)
    dev = write_table(tmp_path / "dev.csv", examples(48, 1, ("alpha", "gamma")), columns)
    rc = main(["finetune", "--checkpoint", str(pretrained), "--train_file", str(train), "--validation_file", str(dev),
               "--label_field", "score", "--output_dir", str(tmp_path / "out"), "--epochs", "4", *FAST])
    assert rc == 0
    result = last_json(capsys.readouterr().out)
    assert set(result["metrics"]) == {"pearson", "spearman"}
    assert result["metrics"]["pearson"] >= 0.9, result


def test_export_gives_the_same_logits_and_serves_a_pipeline(tmp_path, classified):
    from transformers import AutoTokenizer, RobertaForSequenceClassification, pipeline

    _, _, printed = classified
    path = last_json(printed)["per_seed"][1]["checkpoint"]
    assert main(["export-classifier", "--checkpoint", str(path), "--output_dir", str(tmp_path / "hf")]) == 0
    theirs = RobertaForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    ours = load_finetuned(path, torch.device("cpu")).model
    assert theirs.config.id2label == {0: "alpha", 1: "beta"}
    texts = [("w5 w30 w41 w50",), ("w9 w22",), ("w20 w21 w22 w23 w24 w25 w26 w12",)]
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    batch = tok([t[0] for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ours(batch["input_ids"], batch["attention_mask"].bool())
        got = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert batch["input_ids"][0, 0] == 0 and batch["input_ids"][0, 5] == 2  # <s> ... </s>: our framing
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    served = pipeline("text-classification", model=str(tmp_path / "hf"))(["w5 w30 w41", "w9 w30 w41"])
    assert [s["label"] for s in served] == ["alpha", "beta"]
    # Pairs frame as fine-tuning framed them: <s> A </s></s> B </s>.
    assert tok("w5 w6", "w7")["input_ids"] == [0, 5, 6, 2, 2, 7, 2]


def test_export_refuses_a_pretraining_checkpoint_and_a_broken_head_leaving_the_folder(capsys, tmp_path, classified,
                                                                                      pretrained):
    _, _, printed = classified
    state = checkpoint.load(last_json(printed)["per_seed"][0]["checkpoint"])
    del state["task"]["labels"]  # a head whose labels are gone: one sentence, not a KeyError
    (tmp_path / "broken").mkdir()
    broken = checkpoint.save(state, tmp_path / "broken", 3)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for path, says in ((broken, "incomplete or foreign classification head"), (pretrained, "holds no classification")):
        rc = main(["export-classifier", "--checkpoint", str(path), "--output_dir", str(out), "--overwrite"])
        err = capsys.readouterr().err
        assert rc == 2 and says in err and str(path) in err and "Traceback" not in err
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_init_from_hf_and_an_untrained_encoder(capsys, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    assert main(["export", "--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "mlm")]) == 0
    train = write_jsonl(tmp_path / "train.jsonl", [{**r, "label": ["alpha", "beta"].index(r["label"])}
                                                   for r in examples(64, 0)])  # integer labels
    rc = main(["finetune", "--init_from_hf", str(tmp_path / "mlm"), "--train_file", str(train),
               "--validation_file", str(train), "--output_dir", str(tmp_path / "out"), "--epochs", "1", *FAST])
    assert rc == 0
    state = torch.load(next((tmp_path / "out" / "seed_0").glob("checkpoint_*.pt")), weights_only=True)
    assert state["task"]["labels"] == {"kind": "classification", "names": ["0", "1"]}
    assert state["finetune"]["source"] == str(tmp_path / "mlm")


def test_glue_command_on_a_fake_glue_folder(capsys, tmp_path, pretrained):
    glue = tmp_path / "glue"
    for folder in ("CoLA", "STS-B", "MNLI", "SST-2"):
        (glue / folder).mkdir(parents=True)
    for split, n, seed in (("train", 64, 0), ("dev", 24, 1)):  # CoLA: no header, 0/1 labels
        rows = [{"src": "gj04", "label": int(r["label"] == "beta"), "orig": "", "text": r["text"]}
                for r in examples(n, seed)]
        write_table(glue / "CoLA" / f"{split}.tsv", rows, ["src", "label", "orig", "text"], header=False)
        rows = [{"i": i, "a": r["text"], "b": sentence(random.Random(i), None), "score": r["score"]}
                for i, r in enumerate(examples(n, seed, ("alpha", "beta", "gamma")))]
        write_table(glue / "STS-B" / f"{split}.tsv", rows, ["i", "a", "b", "score"],
                    names={"i": "index", "a": "sentence1", "b": "sentence2"})
    nli = {"alpha": "entailment", "beta": "neutral", "gamma": "contradiction"}
    for split, seed in (("train", 0), ("dev_matched", 1), ("dev_mismatched", 2)):
        rows = [{"a": r["text"], "b": "w30", "label": nli[r["label"]]}
                for r in examples(72 if split == "train" else 24, seed, ("alpha", "beta", "gamma"))]
        write_table(glue / "MNLI" / f"{split}.tsv", rows, ["a", "b", "label"],
                    names={"a": "sentence1", "b": "sentence2", "label": "gold_label"})
    rc = main(["glue", "--checkpoint", str(pretrained), "--data_dir", str(glue), "--tasks", "cola", "STS-B", "mnli",
               "--output_dir", str(tmp_path / "runs"), "--epochs", "2", *FAST])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = last_json(out)
    assert list(summary["tasks"]) == ["CoLA", "STS-B", "MNLI"]  # SST-2 was left out by --tasks
    assert set(summary["tasks"]["MNLI"]["metrics"]) == {"matched_accuracy", "mismatched_accuracy"}
    assert set(summary["tasks"]["STS-B"]["metrics"]) == {"pearson", "spearman"}
    assert set(summary["tasks"]["CoLA"]["metrics"]) == {"matthews"}
    scores = [t["score"] for t in summary["tasks"].values()]
    assert summary["average"] == pytest.approx(sum(scores) / 3)
    assert re.search(r"\| GLUE average \(3 tasks\) \| \| -?\d+\.\d \|", out)
    assert "| MNLI | matched_accuracy" in out and json.loads((tmp_path / "runs" / "glue.json").read_text())
    assert (tmp_path / "runs" / "STS-B" / "seed_0" / "metrics.jsonl").is_file()
    # A folder with no GLUE task in it is one sentence.
    rc = main(["glue", "--checkpoint", str(pretrained), "--data_dir", str(tmp_path / "runs" / "CoLA")])
    assert rc == 2 and "holds none of GLUE's task folders" in capsys.readouterr().err


def corpus_text(per_class: int) -> str:
    """The demo corpus's layout: a help() topic, then one paragraph of docstrings per module."""
    rng = random.Random(0)
    paragraphs = ["Assignment statements\n*********************\nw20 w21 w22"]
    for package, keywords in (("alphalib", KEYWORDS["alpha"]), ("betalib", KEYWORDS["beta"])):
        lines = [f"{package}: The {package} module."]
        for i in range(per_class):
            lines += [f"{package}.thing{i}: {sentence(rng, rng.choice(keywords))}", sentence(rng, None)]
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs) + "\n"


def test_demo_stage_builds_its_task_and_compares_pretrained_with_untrained(tmp_path):
    work = tmp_path / "demo"
    work.mkdir()
    (work / "corpus.txt").write_text(corpus_text(per_class=2))
    said = []
    assert run_demo_stage(work, tiny_checkpoint(work / "ckpt"), 0, said.append) is None  # too few docstrings
    assert "skipped" in said[0]

    (work / "corpus.txt").write_text(corpus_text(per_class=50))
    task = write_task(work / "corpus.txt", tmp_path / "task")
    assert task.classes == ("alphalib", "betalib") and task.per_class == 50  # the module docstring is too short
    rows = [json.loads(x) for x in task.train.read_text().splitlines()]
    assert len(rows) == 80 and not any("alphalib" in r["text"] or "betalib" in r["text"] for r in rows)
    settings = FinetuneSettings(learning_rate=5e-3, batch_size=16, epochs=2, precision="fp32", max_length=64)
    said = []
    results = run_demo_stage(work, work / "ckpt" / "checkpoint_00000001.pt", 0, said.append, settings)
    assert results["classes"] == ["alphalib", "betalib"] and results["chance"] == 0.5
    assert 0 <= results["pretrained"]["accuracy"] <= 1 and 0 <= results["untrained"]["accuracy"] <= 1
    assert any("  trained model:" in s for s in said) and any("untrained model:" in s for s in said)
    said = []
    assert run_demo_stage(work, work / "ckpt" / "checkpoint_00000001.pt", 0, said.append, settings) == results
    assert "fine-tuned before" in said[0]


def test_modernbert_family_gets_its_own_head_and_export(capsys, tmp_path):
    from transformers import ModernBertForSequenceClassification

    from conftest import PAD, VOCAB
    from encoder_train.config import ModelConfig
    from encoder_train.state import model_dims

    config = ModelConfig(family="modernbert", hidden_size=32, num_layers=3, num_heads=2, intermediate_size=48,
                         max_position_embeddings=64, local_attention=8)
    ckpt = tiny_checkpoint(tmp_path / "ckpt", model_dims(config, VOCAB, PAD, "test"))
    train = write_jsonl(tmp_path / "train.jsonl", examples(48, 0))
    args = ["finetune", "--checkpoint", str(ckpt), "--train_file", str(train), "--validation_file", str(train),
            "--epochs", "1", *FAST]
    assert main([*args, "--output_dir", str(tmp_path / "out"), "--pooling", "mean"]) == 0
    path = last_json(capsys.readouterr().out)["per_seed"][0]["checkpoint"]
    assert main(["export-classifier", "--checkpoint", path, "--output_dir", str(tmp_path / "hf")]) == 0
    theirs = ModernBertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.classifier_pooling == "mean"
    ours = load_finetuned(path, torch.device("cpu")).model
    ids = torch.tensor([[0, *range(5, 25), 2], [0, 5, 30, 41, 2, *[PAD] * 17]])  # past the local window, and padded
    with torch.no_grad():
        expected = ours(ids, ids != PAD)
        got = theirs(input_ids=ids, attention_mask=(ids != PAD).long()).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    # RoBERTa's head has one pooling only, and says so.
    roberta = tiny_checkpoint(tmp_path / "roberta")
    assert main([*args[:2], str(roberta), *args[3:], "--output_dir", str(tmp_path / "r"), "--pooling", "mean"]) == 2
    assert "reads the <s> token only" in capsys.readouterr().err


def test_an_output_folder_in_use_is_refused_naming_output_dir(capsys, tmp_path, pretrained):
    import subprocess
    import sys

    train = write_jsonl(tmp_path / "train.jsonl", examples(16, 0))
    out = tmp_path / "out"
    holder = subprocess.Popen(  # another process holds the folder, as a running fine-tuning would
        [sys.executable, "-c", "import sys, time; from encoder_train.checkpoint import FolderLock; "
         f"FolderLock({str(out)!r}).__enter__(); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = main(["finetune", "--checkpoint", str(pretrained), "--train_file", str(train), "--validation_file",
                   str(train), "--output_dir", str(out), "--epochs", "1", *FAST])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert rc == 2 and f"checkpoint folder {out} is in use" in err and "pass another --output_dir" in err, err
    assert "--checkpoint_dir" not in err and not list(out.glob("seed_*"))
