"""`encoder-train eval` through the CLI with the embedding kinds: one fine-tune per (model, train file, settings)
under OUTPUT_DIR/finetuned/, zero_shot/ keys only beside a fine-tune, and no transformers chatter (progress bars, a
load report of unused weights) while a load report of missing weights, a real warning, still prints."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")

from conftest import VOCAB  # noqa: E402
from encoder_train.cli import main  # noqa: E402
from helpers.eval_models import random_export  # noqa: E402

CHATTER = ("Loading weights", "LOAD REPORT", "it/s]", "example/s]")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(5, VOCAB)}" for _ in range(n))


def write_data(folder: Path) -> None:
    """folder/beir: 12 documents, a query each (one of its words and three others); folder/triplets.tsv: 16 rows
    for the fine-tune."""
    rng = random.Random(0)
    docs = [words(rng, 10) for _ in range(12)]
    beir = folder / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n"
                                               for i, t in enumerate(docs)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"{t.split()[i % 10]} "
                                                                                   f"{words(rng, 3)}"}) + "\n"
                                                for i, t in enumerate(docs)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                             + "".join(f"q{i}\td{i}\t1\n" for i in range(12)))
    rows = [(words(rng, 3), words(rng, 8), words(rng, 8)) for _ in range(16)]
    (folder / "triplets.tsv").write_text("query\tpositive\tnegative\n" + "".join("\t".join(r) + "\n" for r in rows))


TUNE = "train_file: triplets.tsv, train_batch_size: 8, learning_rate: 1.0e-3"
SUITE = f"""tasks:
  zero: {{kind: retrieval, data_dir: beir}}
  first: {{kind: retrieval, data_dir: beir, {TUNE}}}
  second: {{kind: retrieval, data_dir: beir, batch_size: 4, {TUNE}}}
"""


def test_tasks_share_one_fine_tune_and_the_run_is_quiet(tmp_path, pretrained, capfd, caplog):
    write_data(tmp_path)
    (tmp_path / "suite.yaml").write_text(SUITE)
    out = tmp_path / "out"
    capfd.readouterr()
    assert main(["eval", "--suite", str(tmp_path / "suite.yaml"), "--model", f"a={pretrained}",
                 "--output_dir", str(out)]) == 0
    printed = "".join(capfd.readouterr())
    assert not [c for c in CHATTER if c in printed], printed
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]

    report = json.loads((out / "report.json").read_text())
    results, details = report["results"]["a"], report["details"]["a"]
    assert sorted(results["zero"]) == ["mrr@10", "ndcg@10", "recall@100"]
    assert sorted(results["first"]) == ["mrr@10", "ndcg@10", "recall@100", "zero_shot/mrr@10", "zero_shot/ndcg@10",
                                        "zero_shot/recall@100"]
    assert results["first"]["zero_shot/ndcg@10"] == results["zero"]["ndcg@10"]
    assert results["second"] == results["first"]  # the same model scored on the same data (batch_size: speed only)
    assert results["first"]["ndcg@10"] != results["first"]["zero_shot/ndcg@10"] and results["zero"]["ndcg@10"] < 1
    (key,) = (out / "finetuned" / "a").iterdir()  # trained once, by `first`; `second` loaded it
    tuned = [details[t]["fine_tune"] for t in ("first", "second")]
    assert [t["reused"] for t in tuned] == [False, True]
    assert tuned[0]["cached"] == tuned[1]["cached"] == str(key)
    assert json.loads((key / "fine_tune.json").read_text())["train_file"]["path"] == str(tmp_path / "triplets.tsv")


def test_a_load_report_of_unused_weights_is_dropped_one_of_missing_weights_prints(tmp_path, caplog):
    import torch
    from safetensors.torch import load_file, save_file

    from encoder_train.evaluation.models import LoadedModel, ModelRow
    from encoder_train.tokenizer import word_level_tokenizer

    def load(folder: Path) -> list[str]:
        caplog.clear()
        row = ModelRow("m", folder, None, "hf", "m")
        LoadedModel(row, tmp_path / "out", torch.device("cpu")).sentence_transformer(16)
        return [r.getMessage() for r in caplog.records if "LOAD REPORT" in r.getMessage()]

    folder = random_export(tmp_path / "m", word_level_tokenizer(VOCAB))
    weights = load_file(folder / "model.safetensors")
    save_file({**weights, "unused.weight": torch.zeros(2)}, folder / "model.safetensors", metadata={"format": "pt"})
    assert load(folder) == []  # a weight the model does not read: no report
    dropped = next(k for k in weights if "layer.1.output.dense.weight" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, folder / "model.safetensors",
              metadata={"format": "pt"})
    reports = load(folder)
    assert len(reports) == 1 and "MISSING" in reports[0] and dropped in reports[0]
