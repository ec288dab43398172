"""`encoder-train eval`'s core on real checkpoints: the mlm kind gives `encoder-train evaluate`'s numbers; a run
folder gives one row per kept checkpoint (its phase ends and its last); a Hugging Face export and our checkpoint of
the same weights give the same numbers; a killed evaluation resumes without recomputing what it recorded; the
classification kind's protocol (the median over seeds of the best learning rate)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PRETRAIN, make_shards, make_tokenizer
from encoder_train.cli import main
from helpers.recipes import recipe, run


def write_suite(folder: Path, text: str) -> Path:
    path = folder / "suite.yaml"
    path.write_text(text)
    return path


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_mlm_numbers_are_those_of_evaluate(capsys, tmp_path, pretrained):
    pretrained = Path(shutil.copy2(pretrained, tmp_path / "model.pt"))  # this test changes its time
    make_shards(tmp_path / "val", files=2, rows=20, seed=7)
    suite = write_suite(tmp_path, "tasks:\n  held: {kind: mlm, data_dir: val, batch_size: 8}\n"
                                  "  held30: {kind: mlm, data_dir: val, batch_size: 8, mask_rate: 0.3}\n")
    out = tmp_path / "out"
    assert main(["eval", "--suite", str(suite), "--model", f"a={pretrained}", "--output_dir", str(out)]) == 0
    assert main(["evaluate", "--checkpoint", str(pretrained), "--data_dir", str(tmp_path / "val"),
                 "--batch_size", "8"]) == 0
    standalone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = report_of(out)
    got = report["results"]["a"]["held"]
    assert got["loss"] == standalone["loss"]  # the same computation
    assert got["accuracy"] == standalone["accuracy"]
    assert report["details"]["a"]["held"]["tokens"] == standalone["tokens"]
    # another mask rate masks about twice the tokens
    assert report["details"]["a"]["held30"]["tokens"] > 1.5 * standalone["tokens"]
    assert report["models"]["a"] == {"path": str(pretrained), "step": 8, "kind": "checkpoint", "group": "a"}
    details = report["details"]["a"]["held"]
    assert details["settings"]["mask_rate"] == 0.15 and details["settings"]["data_dir"] == str(tmp_path / "val")
    assert {"torch", "transformers", "sentence-transformers", "encoder-train"} <= details["versions"].keys()
    assert details["seconds"] > 0
    md = (out / "report.md").read_text()
    assert "## held (mlm)" in md and f"| a | {got['loss']:.4f} | {got['accuracy']:.4f} |" in md

    # A rerun keeps both pairs; a model file changed since (its time here) runs them again.
    assert main(["eval", "--suite", str(suite), "--model", f"a={pretrained}", "--output_dir", str(out)]) == 0
    assert capsys.readouterr().out.count("done before, kept") == 2
    os.utime(pretrained, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert main(["eval", "--suite", str(suite), "--model", f"a={pretrained}", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "done before" not in printed and "a / held: loss" in printed
    assert report_of(out)["results"]["a"] == report["results"]["a"]  # the same numbers, computed again


@pytest.mark.slow
def test_a_run_folder_gives_its_phase_ends_and_its_last_checkpoint(capsys, tmp_path):
    # Three phases of 5, 4 and 3 steps, stopped at step 7, a checkpoint every 2 steps (3 kept): 5 ends a phase, 6 is
    # an ordinary checkpoint, 7 the last.
    path = recipe(tmp_path, checkpoint={"checkpoint_every": 2, "max_checkpoints": 3})
    assert run(path, "--max_steps", "7") == 0
    ckpt = tmp_path / "ckpt"
    assert {p.name for p in ckpt.glob("checkpoint_*")} == {f"checkpoint_0000000{s}.pt" for s in (5, 6, 7)}
    suite = write_suite(tmp_path, "tasks:\n"
                        "  code: {kind: mlm, data_dir: code-val, batch_size: 4, reference: {loss: 3.0},\n"
                        "         reference_source: the paper's table 2}\n"
                        "  web: {kind: mlm, data_dir: web, max_batches: 2, batch_size: 4}\n")
    out = tmp_path / "out"
    assert main(["eval", "--suite", str(suite), "--model", f"run={ckpt}", "--output_dir", str(out)]) == 0
    report = report_of(out)
    assert list(report["results"]) == ["run@5", "run@7"]
    assert {m: (v["step"], v["group"]) for m, v in report["models"].items()} == {"run@5": (5, "run"),
                                                                                 "run@7": (7, "run")}
    assert report["results"]["run@5"]["code"]["loss"] != report["results"]["run@7"]["code"]["loss"]
    for metric in ("loss", "accuracy", "perplexity"):
        assert (out / "plots" / f"run.{metric}.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert md.index("| run@5 |") < md.index("| run@7 |")
    assert "| reference | 3.0000 |" in md and "Reference: the paper's table 2." in md
    assert "![run.loss](plots/run.loss.png)" in md
    printed = capsys.readouterr().out
    assert "run@5 / code: loss" in printed and "plot: " in printed


@pytest.mark.slow
def test_a_sharded_checkpoint_is_a_model_as_its_run_folder_is(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text(PRETRAIN)
    ckpt = tmp_path / "ckpt"
    assert main(["train", "--config_file", str(tmp_path / "c.yaml"), "--data_dir", str(make_shards(tmp_path / "data")),
                 "--tokenizer_filepath", str(make_tokenizer(tmp_path / "tok.json")), "--checkpoint_dir", str(ckpt),
                 "--set", "checkpoint.format=sharded", "--set", "training.data_parallel=ddp"]) == 0
    folder = ckpt / "checkpoint_00000008"
    assert (folder / "COMPLETE.json").is_file()
    make_shards(tmp_path / "val", files=1, rows=16, seed=7)
    suite = write_suite(tmp_path, "tasks:\n  held: {kind: mlm, data_dir: val, batch_size: 8}\n")
    out = tmp_path / "out"
    assert main(["eval", "--suite", str(suite), "--model", f"one={folder}", "--model", f"run={ckpt}",
                 "--output_dir", str(out)]) == 0
    assert main(["evaluate", "--checkpoint", str(folder), "--data_dir", str(tmp_path / "val"),
                 "--batch_size", "8"]) == 0
    standalone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = report_of(out)
    assert list(report["results"]) == ["one", "run@8"] and report["models"]["one"]["step"] == 8
    assert report["results"]["one"]["held"]["loss"] == report["results"]["run@8"]["held"]["loss"] == standalone["loss"]


def test_an_export_and_our_checkpoint_of_the_same_weights_give_the_same_numbers(capsys, tmp_path, pretrained):
    pytest.importorskip("transformers")
    assert main(["export", "--checkpoint", str(pretrained), "--output_dir", str(tmp_path / "hf")]) == 0
    make_shards(tmp_path / "val", files=1, rows=24, seed=11)
    suite = write_suite(tmp_path, "tasks:\n  held: {kind: mlm, data_dir: val, batch_size: 8}\n")
    out = tmp_path / "out"
    assert main(["eval", "--suite", str(suite), "--model", f"ours={pretrained}", "--model",
                 f"hf={tmp_path / 'hf'}", "--output_dir", str(out)]) == 0
    report = report_of(out)
    assert report["results"]["hf"]["held"] == report["results"]["ours"]["held"]
    assert report["models"]["hf"] == {"path": str(tmp_path / "hf"), "step": None, "kind": "hf", "group": "hf"}


def test_a_checkpoint_is_exported_once_and_embeds_through_sentence_transformers(tmp_path, pretrained):
    pytest.importorskip("sentence_transformers")
    import torch

    from encoder_train.evaluation.models import LoadedModel, rows_for

    (row,) = rows_for("a", pretrained)
    model = LoadedModel(row, tmp_path / "out", torch.device("cpu"))
    folder = model.hf_folder()
    assert folder == tmp_path / "out" / "models" / "a" and (folder / "model.safetensors").is_file()
    written = (folder / "model.safetensors").stat().st_mtime_ns
    again = LoadedModel(row, tmp_path / "out", torch.device("cpu"))  # a rerun reuses the complete export
    assert again.hf_folder() == folder and (folder / "model.safetensors").stat().st_mtime_ns == written
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    st = model.sentence_transformer(16)
    assert st.max_seq_length == 16
    assert model.sentence_transformer(1000).max_seq_length == 62  # the model's window: 64 positions, RoBERTa's 2
    vectors = st.encode(["w5 w6 w7", "w8"])
    assert vectors.shape == (2, 32)


@pytest.mark.slow
def test_a_killed_evaluation_resumes_without_recomputing_what_it_recorded(tmp_path, pretrained):
    # The first task is quick, the second reads 24,000 rows: the kill lands during the second.
    make_shards(tmp_path / "small", files=1, rows=8, seed=3)
    make_shards(tmp_path / "big", files=4, rows=6000, width=32, seed=4)
    suite = write_suite(tmp_path, "tasks:\n  quick: {kind: mlm, data_dir: small}\n"
                                  "  slow: {kind: mlm, data_dir: big, batch_size: 16}\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "encoder_train", "eval", "--suite", str(suite), "--model", f"a={pretrained}",
               "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "report.json").exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    first = report_of(out)
    assert child.returncode == -signal.SIGKILL and list(first["results"]["a"]) == ["quick"]

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "a / quick: done before, kept" in done.stdout and "a / slow: loss" in done.stdout
    second = report_of(out)
    assert second["details"]["a"]["quick"] == first["details"]["a"]["quick"]
    assert set(second["results"]["a"]) == {"quick", "slow"}

    # Changed task settings, or a changed model file, make the pair run again.
    suite.write_text(suite.read_text().replace("data_dir: small}", "data_dir: small, batch_size: 4}"))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert "a / quick: loss" in done.stdout and "a / slow: done before, kept" in done.stdout


def write_task(folder: Path, name: str, n: int, seed: int) -> Path:
    """A two-label task a tiny model learns in a few steps, not perfectly: label 1 texts use words w10-w24, label 0
    texts w20-w34 (a text of shared words is a guess)."""
    import random

    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for i in range(n):
        label = i % 2
        low = 10 if label else 20
        lines.append(" ".join(f"w{rng.randrange(low, low + 15)}" for _ in range(rng.randrange(2, 6))) + f"\t{label}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.slow
def test_classification_reports_the_median_over_seeds_of_the_best_learning_rate(capsys, tmp_path, pretrained):
    task = write_task(tmp_path / "task", "train.tsv", 64, seed=0)
    write_task(task, "dev.tsv", 40, seed=1)
    suite = write_suite(tmp_path, "tasks:\n  w9:\n    kind: classification\n    data_dir: task\n"
                                  "    learning_rates: [1.0e-3, 3.0e-3]\n    seeds: 2\n    epochs: 3\n"
                                  "    batch_size: 8\n    max_length: 16\n    precision: fp32\n")
    out = tmp_path / "out"
    assert main(["eval", "--suite", str(suite), "--model", f"a={pretrained}", "--output_dir", str(out)]) == 0
    report = report_of(out)
    result, details = report["results"]["a"]["w9"], report["details"]["a"]["w9"]
    grid = details["grid"]
    assert set(grid) == {"0.001", "0.003"} and details["seeds"] == [0, 1]
    # The best rate has the higher median score; its median accuracy is the result, its seeds the spread.
    best = max(grid, key=lambda lr: (grid[lr]["score"], -float(lr)))
    assert details["learning_rate"] == float(best)
    per_seed = [s["accuracy"] for s in grid[best]["per_seed"]]
    assert len(per_seed) == 2
    assert result["accuracy"] == statistics.median(per_seed)
    assert details["spread"]["accuracy"] == {"min": min(per_seed), "max": max(per_seed),
                                             "std": pytest.approx(statistics.stdev(per_seed))}
    assert (out / "work" / "a" / "w9").is_dir() and not list((out / "work").rglob("*.pt"))


def test_the_best_rate_is_the_one_of_the_highest_median_not_the_highest_mean():
    from encoder_train.evaluation.kinds.classification import summarise

    def runs(*scores):
        return [{"seed": i, "epoch": 1, "score": s, "accuracy": s} for i, s in enumerate(scores)]

    # 1e-5: one lucky seed (mean 0.70, median 0.55); 3e-5: steady (mean 0.66, median 0.65); 5e-5: ties 3e-5
    best, grid, found, spread = summarise({1e-5: runs(0.5, 0.55, 1.0), 3e-5: runs(0.6, 0.65, 0.73),
                                           5e-5: runs(0.65, 0.65, 0.66)})
    assert best == 3e-5 and found == {"accuracy": 0.65}
    assert grid["1e-05"]["score"] == 0.55 and [r["accuracy"] for r in grid["1e-05"]["per_seed"]] == [0.5, 0.55, 1.0]
    assert spread["accuracy"] == {"min": 0.6, "max": 0.73, "std": pytest.approx(statistics.stdev([0.6, 0.65, 0.73]))}


def test_without_matplotlib_the_plots_are_skipped_with_the_command_that_adds_them(tmp_path, monkeypatch):
    from encoder_train.evaluation.report import Report

    report = Report.load(tmp_path)
    for step, loss in ((5, 4.7), (9, 4.5)):
        report.data["models"][f"run@{step}"] = {"path": "x", "step": step, "kind": "checkpoint", "group": "run"}
        report.data["results"][f"run@{step}"] = {"held": {"loss": loss}}
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: importing it raises ImportError
    said = []
    assert report.plot(said.append) == []
    assert len(said) == 1 and "need matplotlib" in said[0] and "[eval]" in said[0]
    assert not (tmp_path / "plots").exists()
