"""`encoder-train eval` refuses bad input in one sentence (exit 2, no traceback) and loses nothing: a misspelt or
missing suite key, a wrong type, an unknown kind, two --model with one name, a PATH that is not a model, and a task
that fails on one model while the other models' results are kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_shards
from encoder_train.cli import main
from helpers.hf_models import dims_for, write_checkpoint


def suite(folder: Path, text: str) -> Path:
    path = folder / "suite.yaml"
    path.write_text(text)
    return path


def refused(capsys, *argv: str) -> str:
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("encoder-train: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def val(tmp_path):
    return make_shards(tmp_path / "val", files=1, rows=12, seed=5)


@pytest.mark.parametrize("body, words", [
    ("kind: mlm\n    data_dir: val\n    mask_rat: 0.2", ["unknown key 'mask_rat'", "did you mean 'mask_rate'",
                                                         "max_length"]),
    ("kind: mlm\n    batch_size: 8", ["lacks the required key 'data_dir'"]),
    ("kind: mlm\n    data_dir: val\n    batch_size: eight", ["batch_size must be an integer", "'eight'"]),
    ("kind: mlm\n    data_dir: val\n    max_batches: 1.5", ["max_batches must be an integer or null"]),
    ("kind: mlm\n    data_dir: val\n    mask_rate: 1.5", ["mask_rate 1.5 must lie between 0 and 1"]),
    ("kind: mlmm\n    data_dir: val", ["kind 'mlmm' is unknown", "did you mean 'mlm'", "classification"]),
    ("data_dir: val", ["has no `kind`", "mlm, classification"]),
    ("kind: mlm\n    data_dir: missing", ["missing", "does not exist"]),
])
def test_a_bad_suite_is_one_sentence_naming_file_task_and_key(capsys, tmp_path, pretrained, val, body, words):
    path = suite(tmp_path, f"tasks:\n  held:\n    {body}\n")
    line = refused(capsys, "--suite", str(path), "--model", f"a={pretrained}", "--output_dir", str(tmp_path / "out"))
    assert str(path) in line and "held" in line
    for word in words:
        assert word in line
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_misspelt_top_level_key_and_a_task_name_that_is_no_plain_name(capsys, tmp_path, pretrained, val):
    line = refused(capsys, "--suite", str(suite(tmp_path, "taks:\n  held: {kind: mlm, data_dir: val}\n")),
                   "--model", f"a={pretrained}", "--output_dir", str(tmp_path / "out"))
    assert "no `tasks:`" in line
    line = refused(capsys, "--suite", str(suite(tmp_path, "tasks:\n  held out: {kind: mlm, data_dir: val}\n")),
                   "--model", f"a={pretrained}", "--output_dir", str(tmp_path / "out"))
    assert "'held out' is not a plain name" in line


def test_models_two_with_one_name_a_bad_name_and_paths_that_are_not_models(capsys, tmp_path, pretrained, val):
    path = suite(tmp_path, "tasks:\n  held: {kind: mlm, data_dir: val}\n")
    common = ("--suite", str(path), "--output_dir", str(tmp_path / "out"))
    line = refused(capsys, *common, "--model", f"a={pretrained}", "--model", f"a={pretrained}")
    assert "names 'a' twice" in line
    line = refused(capsys, *common, "--model", f"a@1={pretrained}")
    assert "not a plain name" in line
    line = refused(capsys, *common, "--model", str(pretrained))
    assert "is not NAME=PATH" in line
    (tmp_path / "notes.txt").write_text("not a model\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    for bad, words in ((tmp_path / "notes.txt", "is not a model"), (tmp_path / "empty", "is not a model"),
                       (tmp_path / "nowhere", "does not exist"), (tmp_path / "half", "no weights")):
        line = refused(capsys, *common, "--model", f"b={bad}")
        assert str(bad) in line and words in line
        assert "save_pretrained" in line if bad.name == "half" else "Hugging Face folder" in line
    assert not (tmp_path / "out").exists()


def test_a_task_failing_on_one_model_keeps_the_others_results(capsys, tmp_path, pretrained, val, bpe_tokenizer):
    # Model b has another vocabulary than the shards' tokenizer: the mlm task refuses it, model a is scored.
    other, _ = write_checkpoint(tmp_path / "other", bpe_tokenizer, dims_for(bpe_tokenizer.get_vocab_size()))
    tokenizer = pretrained.parent.parent / "tok.json"
    path = suite(tmp_path, f"tasks:\n  held: {{kind: mlm, data_dir: val, tokenizer: {tokenizer}}}\n"
                           "  plain: {kind: mlm, data_dir: val, max_batches: 1}\n")
    out = tmp_path / "out"
    line = refused(capsys, "--suite", str(path), "--model", f"b={other}", "--model", f"a={pretrained}",
                   "--output_dir", str(out))
    assert "task held failed on model b" in line and "does not match the vocabulary" in line
    assert "report.json" in line
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]["a"]) == {"held", "plain"}
    assert set(report["results"]["b"]) == {"plain"}  # its other task still ran
    assert "does not match the vocabulary" in report["details"]["b"]["held"]["error"]
    assert "failed: " in (out / "report.md").read_text()

    # A rerun tries the failed pair again and keeps the finished ones.
    before = report["details"]["a"]["held"]["finished"]
    refused(capsys, "--suite", str(path), "--model", f"b={other}", "--model", f"a={pretrained}",
            "--output_dir", str(out))
    again = json.loads((out / "report.json").read_text())
    assert again["details"]["a"]["held"]["finished"] == before
    assert "error" in again["details"]["b"]["held"]


def test_classification_keys_are_checked_and_yaml_1_1_exponents_read_as_numbers(capsys, tmp_path, pretrained):
    from encoder_train.evaluation.suite import load_suite

    task = tmp_path / "task"
    task.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (task / name).write_text("sentence\tlabel\nw5 w6\t0\nw7 w8\t1\n")
    # YAML 1.1 reads 1e-5 (no dot) as a text; the suite takes it as the number it means
    path = suite(tmp_path, "tasks:\n  t: {kind: classification, data_dir: task, learning_rates: [1e-5, 3.0e-5], "
                           "seeds: [3, 7]}\n")
    (loaded,) = load_suite(path).tasks
    assert loaded.settings.learning_rates == (1e-5, 3e-5) and loaded.settings.seed_list() == [3, 7]
    assert loaded.settings.data_dir == task  # resolved against the suite's folder

    for body, words in (("learning_rates: [1e-5]", "give either data_dir"),
                        ("data_dir: task, seeds: [1, 1]", "distinct seeds"),
                        ("data_dir: task, learning_rates: [fast]", "learning_rates must be a list of numbers"),
                        ("data_dir: task, metrics: [pearson]", "does not score a classification task")):
        path = suite(tmp_path, f"tasks:\n  t: {{kind: classification, {body}}}\n")
        line = refused(capsys, "--suite", str(path), "--model", f"a={pretrained}", "--output_dir", str(tmp_path / "o"))
        assert str(path) in line and "task t" in line and words in line


def test_a_checkpoint_gone_after_it_was_listed_is_recorded_and_the_others_go_on(tmp_path, pretrained, val):
    import shutil

    from encoder_train.evaluation.models import model_rows
    from encoder_train.evaluation.runner import failures_sentence, run_suite
    from encoder_train.evaluation.suite import load_suite

    copy = shutil.copy2(pretrained, tmp_path / "copy.pt")
    rows = model_rows([f"gone={copy}", f"a={pretrained}"])
    Path(copy).unlink()
    loaded = load_suite(suite(tmp_path, "tasks:\n  held: {kind: mlm, data_dir: val}\n"))
    said = []
    report = run_suite(loaded, rows, tmp_path / "out", say=said.append)
    assert "held" in report.data["results"]["a"] and "gone" in report.data["details"]["gone"]["held"]["error"]
    sentence = failures_sentence(report, rows, loaded)
    assert "task held failed on model gone" in sentence and "pass it where it is now" in sentence
    assert any(line.startswith("a / held: loss") for line in said)


def test_a_hugging_face_model_of_a_family_we_do_not_read_is_refused_for_mlm_in_one_sentence(capsys, tmp_path, val):
    transformers = pytest.importorskip("transformers")
    config = transformers.DistilBertConfig(vocab_size=128, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                           max_position_embeddings=64)
    transformers.DistilBertForMaskedLM(config).save_pretrained(tmp_path / "distil")
    path = suite(tmp_path, "tasks:\n  held: {kind: mlm, data_dir: val}\n")
    line = refused(capsys, "--suite", str(path), "--model", f"d={tmp_path / 'distil'}", "--output_dir",
                   str(tmp_path / "out"))
    assert "task held failed on model d" in line and "'distilbert'" in line and "RobertaForMaskedLM" in line
