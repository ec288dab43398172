"""Fine-tuning with nothing but the files: a learning rate searched for on the training examples, the majority
class beside every accuracy, a warning when a classifier answers one class, test metrics averaged over seeds,
and predictions numbered as GLUE numbers them."""

from __future__ import annotations

import json

from encoder_train.cli import main
from helpers.finetune_data import examples, write_jsonl, write_table


def run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_the_learning_rate_is_searched_for_when_none_is_given(capsys, tmp_path, pretrained):  # noqa: F811
    train = write_jsonl(tmp_path / "train.jsonl", examples(120, 0))
    dev = write_jsonl(tmp_path / "dev.jsonl", examples(40, 1))
    rc, out, err = run(capsys, "finetune", "--checkpoint", pretrained, "--train_file", train, "--validation_file",
                       dev, "--output_dir", tmp_path / "out", "--epochs", "2", "--precision", "fp32")
    assert rc == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    search = results["learning_rate_search"]
    assert list(search) == ["1e-05", "3e-05", "0.0001", "0.0003", "0.001"]
    best = max(search, key=lambda lr: (search[lr], -float(lr)))
    assert results["learning_rate"] == float(best)
    assert f"learning rate {best}, the best of" in out
    # The search reads the training file only: the validation file is scored by the real run alone.
    assert not (tmp_path / "out" / "lr_search").exists()


def test_every_accuracy_has_the_majority_class_beside_it_and_test_metrics_are_averaged(capsys, tmp_path,
                                                                                      pretrained):  # noqa: F811
    train = write_jsonl(tmp_path / "train.jsonl", examples(96, 0))
    dev = write_jsonl(tmp_path / "dev.jsonl", examples(30, 1)[:27])  # 27 rows: the classes are not even
    test = write_table(tmp_path / "test.tsv", examples(10, 2), ["text", "label"])  # labelled, no index column
    rc, out, err = run(capsys, "finetune", "--checkpoint", pretrained, "--train_file", train, "--validation_file",
                       dev, "--test_file", test, "--output_dir", tmp_path / "out", "--epochs", "2", "--num_seeds",
                       "2", "--learning_rate", "5e-3", "--precision", "fp32")
    assert rc == 0, err
    labels = [json.loads(line)["label"] for line in dev.read_text().splitlines()]
    majority = max(labels.count(c) for c in set(labels)) / len(labels)
    epoch_lines = [line for line in err.splitlines() if " epoch " in line and "accuracy" in line]
    assert len(epoch_lines) == 4 and all(f"(majority class {majority:.4f})" in line for line in epoch_lines)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    per_seed = [s["test_metrics"]["accuracy"] for s in results["per_seed"]]
    assert results["test_metrics"]["accuracy"] == sum(per_seed) / 2 and "test_std" in results
    final = [line for line in out.splitlines() if line.startswith("out:") or "results in" in line][-1]
    assert "over 2 seeds; test accuracy" in final and "(majority class 0.5000)" in final
    # GLUE's numbering: the test file's row order from 0 (it has no index column).
    rows = (tmp_path / "out" / "seed_0" / "predictions_test.tsv").read_text().splitlines()
    assert rows[0] == "index\tprediction" and [r.split("\t")[0] for r in rows[1:]] == [str(i) for i in range(10)]


def test_a_classifier_that_answers_one_class_is_said_to(capsys, tmp_path, pretrained):  # noqa: F811
    train = write_jsonl(tmp_path / "train.jsonl", examples(64, 0))
    same = examples(12, 1)
    dev = write_jsonl(tmp_path / "dev.jsonl", [{**r, "text": same[0]["text"]} for r in same])  # one text, twelve times
    rc, out, err = run(capsys, "finetune", "--checkpoint", pretrained, "--train_file", train, "--validation_file",
                       dev, "--output_dir", tmp_path / "out", "--epochs", "1", "--learning_rate", "1e-4")
    assert rc == 0, err
    assert "every prediction on dev.jsonl is" in err and "has learnt only one class" in err
