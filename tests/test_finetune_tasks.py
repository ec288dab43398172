"""Reading fine-tuning tasks: every file layout, the label kinds, RoBERTa's framing of pairs, and each bad input
refused with one sentence and exit code 2 (no model is built: these fail before the checkpoint is read)."""

import json

import pytest
from tokenizers import Tokenizer

from conftest import BOS, EOS, make_tokenizer
from encoder_train.cli import main
from encoder_train.finetune.glue import glue_task, resolve_task, spec_for
from encoder_train.finetune.loop import encode, truncate_pair
from encoder_train.finetune.tasks import Split, TaskSpec, load_task
from helpers.finetune_data import examples, pair_examples, write_jsonl, write_table


def test_glue_tsv_with_header_keeps_quotes_as_text(tmp_path):
    rows = examples(6, 0)
    rows[0]["text"] = 'w20 "w21 w22 \'w23'  # GLUE's TSVs are not quoted: a quote is text
    train = write_table(tmp_path / "train.tsv", rows, ["text", "label"], names={"text": "sentence"})
    dev = write_table(tmp_path / "dev.tsv", examples(4, 1), ["text", "label"], names={"text": "sentence"})
    task = load_task(train, [dev])
    assert task.text_fields == ("sentence",) and task.label_field == "label"
    assert task.train.texts[0] == ('w20 "w21 w22 \'w23',)
    assert task.labels.kind == "classification" and task.labels.names == ("alpha", "beta")
    assert task.train.labels == [0 if r["label"] == "alpha" else 1 for r in rows]
    assert task.validation[0].name == "dev"


def test_csv_quoted_fields_and_named_columns(tmp_path):
    rows = examples(6, 0)
    rows[1]["text"] = "w20, w21"
    train = write_table(tmp_path / "train.csv", rows, ["index", "text", "label"], names={"text": "review"})
    dev = write_table(tmp_path / "dev.csv", examples(4, 1), ["index", "text", "label"], names={"text": "review"})
    task, metrics, defaults = resolve_task(train, [str(dev)], None, None, ["review"], None, False, None)
    assert task.train.texts[1] == ("w20, w21",) and metrics == ("accuracy",) and defaults == {}
    assert task.train.ids == [str(r["index"]) for r in rows]


def test_jsonl_integer_labels_sort_as_numbers(tmp_path):
    rows = [{"text": f"w{5 + i}", "label": label} for i, label in enumerate([10, 2, 2, 10, 7])]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "w9", "label": "7"}])  # "7" in JSON: the same class as 7
    task = load_task(train, [dev])
    assert task.labels.names == ("2", "7", "10")
    assert task.train.labels == [2, 0, 0, 2, 1] and task.validation[0].labels == [1]


def test_decimal_labels_mean_regression_and_regression_flag(tmp_path):
    rows = examples(6, 0)
    train = write_table(tmp_path / "train.csv", rows, ["text", "score"], names={"score": "label"})
    dev = write_table(tmp_path / "dev.csv", examples(3, 1), ["text", "score"], names={"score": "label"})
    task = load_task(train, [dev])
    assert task.labels.kind == "regression" and task.labels.num_outputs == 1
    assert task.train.labels == [r["score"] for r in rows]
    ints = write_jsonl(tmp_path / "ints.jsonl", [{"text": "w5", "label": i} for i in range(4)])
    task, metrics, _ = resolve_task(ints, [str(ints)], None, None, None, None, True, None)
    assert task.labels.kind == "regression" and metrics == ("pearson", "spearman")


def test_pair_columns_of_glue_mrpc(tmp_path):
    rows = pair_examples(8, 0)
    names = {"s1": "#1 String", "s2": "#2 String", "label": "Quality"}
    train = write_table(tmp_path / "train.tsv", rows, ["label", "s1", "s2"], names=names)
    dev = write_table(tmp_path / "dev.tsv", pair_examples(4, 1), ["label", "s1", "s2"], names=names)
    task, metrics, defaults = resolve_task(train, [str(dev)], None, "MRPC", None, None, False, None)
    assert task.text_fields == ("#1 String", "#2 String") and metrics == ("f1", "accuracy")
    assert defaults["epochs"] == 10 and task.labels.names == ("0", "1")
    # The same task saved with the usual names (sentence1, sentence2, label) reads too.
    plain = write_table(tmp_path / "plain.tsv", rows, ["s1", "s2", "label"],
                        names={"s1": "sentence1", "s2": "sentence2"})
    assert load_task(plain, [plain], spec=spec_for(glue_task("mrpc"), plain)).text_fields == ("sentence1", "sentence2")


def test_cola_without_header_and_its_test_file_with_one(tmp_path):
    rows = [{"src": "gj04", "label": i % 2, "orig": "*" if i % 2 == 0 else "", "text": f"w{5 + i} w30"}
            for i in range(6)]
    train = write_table(tmp_path / "train.tsv", rows, ["src", "label", "orig", "text"], header=False)
    dev = write_table(tmp_path / "dev.tsv", rows[:3], ["src", "label", "orig", "text"], header=False)
    test = write_table(tmp_path / "test.tsv", [{"index": i, "text": r["text"]} for i, r in enumerate(rows)],
                       ["index", "text"], names={"text": "sentence"})
    task, metrics, _ = resolve_task(train, [str(dev)], str(test), "CoLA", None, None, False, None)
    assert len(task.train.texts) == 6 and task.train.texts[0] == ("w5 w30",)  # the first line is an example
    assert metrics == ("matthews",) and task.test.labels is None and task.test.ids == [str(i) for i in range(6)]


def test_mnli_names_its_two_validation_files(tmp_path):
    rows = [{"a": "w5", "b": "w6", "label": label} for label in ("entailment", "neutral", "contradiction")]
    files = [write_table(tmp_path / f"{n}.tsv", rows, ["a", "b", "label"],
                         names={"a": "sentence1", "b": "sentence2", "label": "gold_label"})
             for n in ("train", "dev_matched", "dev_mismatched")]
    task, _, _ = resolve_task(files[0], [str(f) for f in files[1:]], None, "mnli", None, None, False, None)
    assert [s.name for s in task.validation] == ["matched", "mismatched"]
    assert task.labels.names == ("entailment", "neutral", "contradiction")  # GLUE's order, not sorted


def test_roberta_framing_and_pair_truncation(tmp_path):
    tok = Tokenizer.from_file(str(make_tokenizer(tmp_path / "t.json")))
    split = Split(tmp_path / "x.jsonl", [("w5 w6", "w7")], [1], ["0"])
    assert encode(split, tok, 16, False).ids == [[BOS, 5, 6, EOS, EOS, 7, EOS]]
    long = Split(tmp_path / "x.jsonl", [(" ".join(f"w{i}" for i in range(5, 25)),)], [0], ["0"])
    ids = encode(long, tok, 8, False).ids[0]
    assert ids == [BOS, 5, 6, 7, 8, 9, 10, EOS]
    a, b = list(range(10)), list(range(3))
    assert truncate_pair(a, b, 7) == (a[:4], b)  # the longer is cut first
    assert truncate_pair(a, list(range(8)), 7) == (a[:4], list(range(3)))  # then both, the second first
    assert truncate_pair(a, b, 20) == (a, b)


# ---- bad input: one sentence, exit code 2 ---------------------------------------------------------------------


def run_bad(capsys, tmp_path, train, dev, *extra):
    rc = main(["finetune", "--checkpoint", str(tmp_path / "unused.pt"), "--train_file", str(train),
               "--validation_file", str(dev), "--output_dir", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("encoder-train: error: ") and err.count("\n") == 1, err
    return err


def test_missing_columns(capsys, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"body": "w5", "label": "a"}, {"body": "w6", "label": "b"}])
    err = run_bad(capsys, tmp_path, train, train)
    assert "train.jsonl" in err and "'body'" in err and "--text_fields" in err
    err = run_bad(capsys, tmp_path, train, train, "--text_fields", "body", "--label_field", "gold")
    assert "no column 'gold'" in err and "--label_field" in err
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "w5", "label": "a"}])
    err = run_bad(capsys, tmp_path, train, dev, "--text_fields", "body")
    assert "dev.jsonl" in err and "'body'" in err


def test_missing_label(capsys, tmp_path):
    train = write_table(tmp_path / "train.tsv", examples(4, 0), ["text", "label"])
    lines = train.read_text().splitlines()
    lines[3] = lines[3].split("\t")[0] + "\t"
    train.write_text("\n".join(lines) + "\n")
    err = run_bad(capsys, tmp_path, train, train)
    assert "train.tsv line 4 has no label in column 'label'" in err


def test_mixed_label_types(capsys, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "w5", "label": "pos"}, {"text": "w6", "label": 3}])
    err = run_bad(capsys, tmp_path, train, train)
    assert "mixes text and number labels" in err and "line 1: 'pos'" in err and "line 2: 3" in err


def test_empty_split(capsys, tmp_path):
    train = write_table(tmp_path / "train.csv", examples(4, 0), ["text", "label"])
    dev = write_table(tmp_path / "dev.csv", [], ["text", "label"])
    err = run_bad(capsys, tmp_path, train, dev)
    assert "dev.csv holds no examples" in err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "empty.jsonl holds no examples" in run_bad(capsys, tmp_path, tmp_path / "empty.jsonl", dev)


def test_validation_label_never_seen_in_training(capsys, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", examples(4, 0))
    dev = write_jsonl(tmp_path / "dev.jsonl", examples(3, 1, classes=("alpha", "gamma", "beta")))
    err = run_bad(capsys, tmp_path, train, dev)
    assert "dev.jsonl line 2: label 'gamma' never occurs in the training file" in err and "alpha, beta" in err


def test_task_name_that_is_not_glue(capsys, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", examples(4, 0))
    err = run_bad(capsys, tmp_path, train, train, "--task", "imdb")
    assert "--task 'imdb' is not a GLUE task" in err and "CoLA" in err


@pytest.mark.parametrize("case", ["suffix", "one_label", "three_fields", "not_json", "f1_on_three"])
def test_more_bad_inputs(capsys, tmp_path, case):
    rows = examples(6, 0, classes=("alpha", "beta", "gamma"))
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    extra = []
    if case == "suffix":
        train = tmp_path / "train.txt"
        train.write_text("w5\n")
    elif case == "one_label":
        train = write_jsonl(tmp_path / "train.jsonl", [{"text": "w5", "label": 1}, {"text": "w6", "label": 1}])
    elif case == "three_fields":
        extra = ["--text_fields", "a", "b", "c"]
    elif case == "not_json":
        train.write_text(json.dumps(rows[0]) + "\n{oops\n")
    else:
        extra = ["--metric", "f1"]
    if case == "f1_on_three":  # checked once the model's task is known: the checkpoint must exist
        from helpers.finetune_data import tiny_checkpoint

        ckpt = tiny_checkpoint(tmp_path / "ckpt")
        rc = main(["finetune", "--checkpoint", str(ckpt), "--train_file", str(train), "--validation_file",
                   str(train), "--output_dir", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "macro_f1" in err and err.count("\n") == 1
        return
    err = run_bad(capsys, tmp_path, train, train, *extra)
    expected = {"suffix": "not a .tsv, .csv or .jsonl file", "one_label": "at least two labels",
                "three_fields": "one column, or two", "not_json": "line 2 is not valid JSON"}[case]
    assert expected in err


def test_spec_rejects_a_label_outside_a_glue_task(tmp_path):
    rows = [{"text": "w5", "label": "2"}, {"text": "w6", "label": "1"}]
    train = write_table(tmp_path / "train.tsv", rows, ["text", "label"], names={"text": "sentence"})
    with pytest.raises(Exception, match="not one of this task's labels"):
        load_task(train, [train], spec=TaskSpec(("sentence",), "label", "classification", ("0", "1")))
