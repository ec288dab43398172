"""The retrieval and sts kinds with the real sentence-transformers: their numbers against sentence-transformers' own
evaluators, scipy and a hand computation; the contrastive fine-tune (it raises nDCG@10 on the offline task; the
gradient-cache loss follows the plain one); the offline data; and each bad input refused with one sentence naming
the file."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")

from scipy.stats import spearmanr  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator  # noqa: E402
from sentence_transformers.sentence_transformer.losses import (  # noqa: E402
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)

from conftest import VOCAB  # noqa: E402
from encoder_train.cli import main  # noqa: E402
from encoder_train.errors import UserError  # noqa: E402
from encoder_train.evaluation.embedding_finetune import TrainSettings, fine_tune  # noqa: E402
from encoder_train.evaluation.kinds import kind_module  # noqa: E402
from encoder_train.evaluation.spec import TaskConfig  # noqa: E402
from encoder_train.tokenizer import train_tokenizer  # noqa: E402
from helpers.eval_models import FolderModel, random_export  # noqa: E402

retrieval, sts = kind_module("retrieval"), kind_module("sts")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    # Matrices of width 32: a second OpenMP thread only adds hand-offs, which cost most on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def task(kind, tmp_path: Path, **settings) -> TaskConfig:
    module = kind_module(kind)
    return TaskConfig("t", kind, module.Settings(**settings), tmp_path / "suite.yaml")


@pytest.fixture(scope="module")
def trained(pretrained, tmp_path_factory) -> FolderModel:
    """The `pretrained` fixture's checkpoint (a tiny trained encoder, words w5..w127) through `encoder-train export`."""
    out = tmp_path_factory.mktemp("export") / "hf"
    assert main(["export", "--checkpoint", str(pretrained), "--output_dir", str(out)]) == 0
    return FolderModel(out)


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("offline")
    assert main(["eval-data", "--output_dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def docstring_model(offline, tmp_path_factory) -> FolderModel:
    """A tiny random encoder whose BPE tokenizer was trained on the offline data's text."""
    folder = tmp_path_factory.mktemp("docstring_model")
    texts = [offline / "docstrings-train.tsv", offline / "sts" / "train.tsv"]
    return FolderModel(random_export(folder, train_tokenizer(texts, folder / "tokenizer.json", vocab_size=1000)))


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(5, VOCAB)}" for _ in range(n))


def write_beir(folder: Path, corpus: dict[str, str], queries: dict[str, str], qrels: list[tuple[str, str, int]],
               split: str = "test") -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n"
                                                 for i, t in corpus.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries.items()))
    (folder / "qrels" / f"{split}.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return folder


def toy_beir(folder: Path) -> Path:
    """30 documents, 8 queries judged (each 1 to 3 relevant, some score-0 judgements and a grade 2), one query the
    qrels do not name and one judged only not relevant."""
    rng = random.Random(0)
    corpus = {f"d{i}": words(rng, rng.randrange(3, 40)) for i in range(30)}
    queries = {f"q{i}": words(rng, rng.randrange(2, 8)) for i in range(10)}
    qrels = []
    for q in range(8):
        judged = rng.sample(range(30), rng.randrange(2, 5))  # the first one judged not relevant, the others graded
        qrels += [(f"q{q}", f"d{d}", 0 if i == 0 else rng.choice([1, 2])) for i, d in enumerate(judged)]
    qrels.append(("q9", "d3", 0))  # q9: judged, none relevant; q8: not in the qrels at all
    return write_beir(folder, corpus, queries, qrels)


# --- numbers against independent computations -----------------------------------------------------------------


def test_retrieval_zero_shot_equals_sentence_transformers_own_evaluator(tmp_path, trained):
    data = toy_beir(tmp_path / "beir")
    got = retrieval.run(task("retrieval", tmp_path, data_dir=data, batch_size=4), trained, tmp_path / "work")

    # Independently: the export loaded by SentenceTransformer, the qrels read here, the evaluator with its defaults
    # but for the cut-offs (its default score function: the model's cosine).
    model = SentenceTransformer(str(trained.folder), device="cpu")
    corpus = {r["_id"]: r["text"] for r in map(json.loads, (data / "corpus.jsonl").read_text().splitlines())}
    queries = {r["_id"]: r["text"] for r in map(json.loads, (data / "queries.jsonl").read_text().splitlines())}
    relevant: dict[str, set[str]] = {}
    for line in (data / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        if int(s) > 0:
            relevant.setdefault(q, set()).add(d)
    theirs = InformationRetrievalEvaluator(queries, corpus, relevant, mrr_at_k=[10], ndcg_at_k=[10],
                                           precision_recall_at_k=[100], write_csv=False)(model)
    for key in ("ndcg@10", "mrr@10", "recall@100"):
        assert got[key] == pytest.approx(theirs[f"cosine_{key}"], abs=1e-6), key
    assert not [key for key in got if key.startswith("zero_shot/")]  # without a fine-tune: no second copy of them
    assert 0 < got["ndcg@10"] < 1  # a ranking that is neither perfect nor empty: the comparison means something
    details = got["details"]
    assert details["queries"] == 8 and details["documents"] == 30 and "fine_tune" not in details
    assert details["dropped_queries"]["without_qrels"] == 1
    assert details["dropped_queries"]["without_relevant_ids"] == ["q9"]
    json.dumps(got)  # report.json takes it as it is


def test_mrr_ndcg_and_recall_by_hand_on_four_documents(tmp_path, trained):
    corpus = {"a": "w5 w6 w7", "b": "w30 w31 w32 w33", "c": "w60 w61", "d": "w90 w91 w92 w93 w94"}
    queries = {"q1": "w5 w6", "q2": "w92 w93", "q3": "w31 w60"}
    qrels = [("q1", "a", 1), ("q2", "b", 1), ("q2", "d", 1), ("q3", "c", 1)]
    data = write_beir(tmp_path / "beir", corpus, queries, qrels)
    got = retrieval.run(task("retrieval", tmp_path, data_dir=data), trained, tmp_path / "work")

    # By hand: each query's documents ranked by the cosine of plain embeddings (numpy), ties by id.
    model = SentenceTransformer(str(trained.folder), device="cpu")
    ids = sorted(corpus)
    docs = model.encode([corpus[i] for i in ids])
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    relevant = {"q1": {"a"}, "q2": {"b", "d"}, "q3": {"c"}}
    mrr, ndcg, recall_1 = [], [], []
    for q, text in queries.items():
        e = model.encode([text])[0]
        cos = docs @ (e / np.linalg.norm(e))
        ranked = sorted(ids, key=lambda i: (-cos[ids.index(i)], i))
        ranks = [ranked.index(d) + 1 for d in relevant[q]]  # 1-based
        mrr.append(1 / min(ranks))
        ideal = sum(1 / math.log2(r + 1) for r in range(1, len(ranks) + 1))
        ndcg.append(sum(1 / math.log2(r + 1) for r in ranks) / ideal)
        recall_1.append(sum(r == 1 for r in ranks) / len(ranks))
    assert got["mrr@10"] == pytest.approx(np.mean(mrr), abs=1e-6)
    assert got["ndcg@10"] == pytest.approx(np.mean(ndcg), abs=1e-6)
    assert got["details"]["zero_shot"]["recall@1"] == pytest.approx(np.mean(recall_1), abs=1e-6)
    assert got["recall@100"] == 1.0  # four documents: every relevant one is within the first 100


def test_max_length_truncates_queries_and_documents(tmp_path, trained):
    rng = random.Random(1)
    # Documents share their first 4 words with their query; the words after that tell the relevant one apart.
    shared = words(rng, 4)
    corpus = {f"d{i}": f"{shared} {words(rng, 30)}" for i in range(6)}
    queries = {f"q{i}": corpus[f"d{i}"].split(" ", 4)[4] for i in range(6)}
    data = write_beir(tmp_path / "beir", corpus, queries, [(f"q{i}", f"d{i}", 1) for i in range(6)])
    short = retrieval.run(task("retrieval", tmp_path, data_dir=data, max_length=4), trained, tmp_path / "w1")
    whole = retrieval.run(task("retrieval", tmp_path, data_dir=data, max_length=100_000), trained, tmp_path / "w2")
    assert short["details"]["max_seq_length"] == 4
    assert whole["details"]["max_seq_length"] == 62  # the export's window: 64 positions, RoBERTa's offset of 2
    # Cut at 4 tokens (4 words: this word-level tokenizer adds no <s> or </s>) every document reads the same, so
    # every query's scores tie and its documents rank by id alone.
    assert short["mrr@10"] == pytest.approx(np.mean([1 / (i + 1) for i in range(6)]))
    assert whole["mrr@10"] > short["mrr@10"]


STS_ROWS = [("w5 w6 w7", "w5 w6 w8", 4.6), ("w10 w11", "w90 w91 w92", 0.2), ("w20 \"w21", "w20 w21 w22", 3.8),
            ("w30 w31 w32", "w33 w34", 1.0), ("w40 w41", "w40 w41", 5.0), ("w50 w60 w70", "w51 w61", 2.5),
            ("w80", "w81 w82 w83", 0.8), ("w100 w101", "w100 w102", 3.1)]


def test_sts_spearman_equals_scipy_on_the_cosines(tmp_path, trained):
    # GLUE's STS-B layout: more columns than the three read, a quote that is text.
    glue = tmp_path / "dev.tsv"
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    glue.write_text(header + "".join(
        f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{s}\n" for i, (a, b, s) in enumerate(STS_ROWS)))
    plain = tmp_path / "plain.tsv"
    plain.write_text("first\tsecond\tgold\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in STS_ROWS))
    got = sts.run(task("sts", tmp_path, data_file=glue), trained, tmp_path / "work")

    model = SentenceTransformer(str(trained.folder), device="cpu")
    a, b = model.encode([r[0] for r in STS_ROWS]), model.encode([r[1] for r in STS_ROWS])
    cosines = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    expected = spearmanr([r[2] for r in STS_ROWS], cosines).statistic
    assert got["spearman"] == pytest.approx(expected, abs=1e-9) and "zero_shot/spearman" not in got
    assert got["details"]["pairs"] == len(STS_ROWS)
    assert sts.run(task("sts", tmp_path, data_file=plain), trained, tmp_path / "w2")["spearman"] == got["spearman"]


# --- the fine-tune ------------------------------------------------------------------------------------------------


def pairs_columns(n: int, seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    anchors = [words(rng, 4) for _ in range(n)]
    return {"anchor": anchors, "positive": [f"{a} {words(rng, 6)}" for a in anchors]}


def test_cached_mnrl_follows_mnrl_step_by_step_and_a_seed_repeats(tmp_path, trained):
    """The gradient cache changes memory, not arithmetic: with dropout off (the pretrained fixture's export has
    dropout 0.1, so a random export with none is used) the two losses agree at every step of a short fine-tune."""
    from encoder_train.tokenizer import word_level_tokenizer

    model = FolderModel(random_export(tmp_path / "m", word_level_tokenizer(VOCAB))).sentence_transformer(32)
    columns = pairs_columns(48)
    snapshot = {k: p.detach().clone() for k, p in model.named_parameters()}
    settings = TrainSettings(epochs=1, learning_rate=1e-3, batch_size=16, warmup_ratio=0.0, seed=3, no_duplicates=True)
    plain = fine_tune(model, columns, lambda m: MultipleNegativesRankingLoss(m), settings, tmp_path / "a")
    cached = fine_tune(model, columns, lambda m: CachedMultipleNegativesRankingLoss(m, mini_batch_size=4), settings,
                       tmp_path / "b")
    again = fine_tune(model, columns, lambda m: MultipleNegativesRankingLoss(m), settings, tmp_path / "c")
    assert len(plain.losses) == 3 and plain.losses == again.losses
    assert cached.losses == pytest.approx(plain.losses, rel=1e-4)
    assert plain.losses[-1] < plain.losses[0]
    # The copy was trained; the model given was not.
    assert all(torch.equal(p, snapshot[k]) for k, p in model.named_parameters())
    assert any(not torch.equal(p, snapshot[k]) for k, p in plain.model.named_parameters())


def test_retrieval_fine_tunes_on_triplets_with_the_gradient_cache(tmp_path, trained):
    data = toy_beir(tmp_path / "beir")
    rng = random.Random(2)
    rows = [(words(rng, 3), words(rng, 8), words(rng, 8)) for _ in range(24)]
    (tmp_path / "triplets.tsv").write_text("query\tpositive\tnegative\n" + "".join("\t".join(r) + "\n" for r in rows))
    got = retrieval.run(task("retrieval", tmp_path, data_dir=data, train_file=tmp_path / "triplets.tsv",
                             loss="cached_mnrl", mini_batch_size=4, train_batch_size=8, epochs=2, learning_rate=1e-3),
                        trained, tmp_path / "work")
    tuned = got["details"]["fine_tune"]
    assert tuned["columns"] == ["anchor", "positive", "negative"] and tuned["pairs"] == 24 and tuned["steps"] == 6
    assert tuned["settings"]["loss"] == "cached_mnrl" and tuned["settings"]["mini_batch_size"] == 4
    assert got["ndcg@10"] == got["details"]["fine_tuned"]["ndcg@10"] != got["zero_shot/ndcg@10"]


def test_tasks_with_the_same_train_file_and_settings_fine_tune_once(tmp_path, trained):
    """Two retrieval tasks of other data but the same train_file and fine-tune settings (the papers' BEIR and MLDR
    tasks) train once: the second, and a rerun, load the first's saved copy, with the numbers each gets alone."""
    rng = random.Random(4)
    rows = [(words(rng, 3), words(rng, 8), words(rng, 8)) for _ in range(24)]
    triplets = tmp_path / "triplets.tsv"
    triplets.write_text("query\tpositive\tnegative\n" + "".join("\t".join(r) + "\n" for r in rows))
    tune = {"train_file": triplets, "train_batch_size": 8, "learning_rate": 1e-3}
    first_data, second_data = toy_beir(tmp_path / "beir"), tmp_path / "beir2"
    write_beir(second_data, {f"d{i}": r[1] for i, r in enumerate(rows[:12])},
               {f"q{i}": r[0] for i, r in enumerate(rows[:12])}, [(f"q{i}", f"d{i}", 1) for i in range(12)])

    model = FolderModel(trained.folder, output_dir=tmp_path / "out")
    cache = tmp_path / "out" / "finetuned" / "tiny"
    first = retrieval.run(task("retrieval", tmp_path, data_dir=first_data, **tune), model, tmp_path / "w1")
    second = retrieval.run(task("retrieval", tmp_path, data_dir=second_data, batch_size=4, split="test", **tune),
                           model, tmp_path / "w2")
    again = retrieval.run(task("retrieval", tmp_path, data_dir=first_data, **tune), model, tmp_path / "w3")
    trained_once = [p.name for p in cache.iterdir()]
    assert len(trained_once) == 1 and not trained_once[0].startswith(".")
    tuned = [r["details"]["fine_tune"] for r in (first, second, again)]
    assert [t["reused"] for t in tuned] == [False, True, True]
    assert {t["cached"] for t in tuned} == {str(cache / trained_once[0])}
    assert tuned[0]["steps"] == tuned[1]["steps"] == 3 and tuned[1]["pairs"] == 24
    assert again["ndcg@10"] == first["ndcg@10"] != first["zero_shot/ndcg@10"]

    # Alone, in an output folder of its own (where a killed run left a half-saved copy of that key), the second
    # task trains the same copy and gets the same numbers; the half-saved folder is removed, never loaded.
    alone = FolderModel(trained.folder, output_dir=tmp_path / "alone")
    half = tmp_path / "alone" / "finetuned" / "tiny" / f".{trained_once[0]}.killed.tmp"
    half.mkdir(parents=True)
    (half / "modules.json").write_text("[")
    by_itself = retrieval.run(task("retrieval", tmp_path, data_dir=second_data, batch_size=4, **tune), alone,
                              tmp_path / "w4")
    assert not by_itself["details"]["fine_tune"]["reused"] and not half.exists()
    assert {k: v for k, v in by_itself.items() if k != "details"} == {k: v for k, v in second.items() if k != "details"}
    assert by_itself["details"]["fine_tune"]["last_loss"] == tuned[0]["last_loss"]

    # Scored at another length, trained at the same (train_max_length): the same fine-tune.
    short = retrieval.run(task("retrieval", tmp_path, data_dir=first_data, max_length=20, train_max_length=512,
                               **tune), model, tmp_path / "w6")
    assert short["details"]["fine_tune"]["reused"] and short["details"]["fine_tune"]["max_seq_length"] == 62
    assert short["details"]["max_seq_length"] == 20 and len(list(cache.iterdir())) == 1

    # Another learning rate is another fine-tune.
    other = retrieval.run(task("retrieval", tmp_path, data_dir=first_data, **{**tune, "learning_rate": 5e-4}),
                          model, tmp_path / "w5")
    assert not other["details"]["fine_tune"]["reused"] and len(list(cache.iterdir())) == 2
    assert other["details"]["fine_tune"]["last_loss"] != tuned[0]["last_loss"]


@pytest.mark.slow
def test_a_contrastive_fine_tune_raises_ndcg_on_the_offline_task(offline, docstring_model, tmp_path):
    suite = yaml.safe_load((offline / "offline.yaml").read_text())["tasks"]
    keys = suite["docstrings"]
    settings = {k: (offline / v if k in ("data_dir", "train_file") else v) for k, v in keys.items() if k != "kind"}
    settings |= {"learning_rate": 3e-3}  # a random 2-layer encoder of width 32 learns faster than the suite's model
    got = retrieval.run(task("retrieval", tmp_path, **settings), docstring_model, tmp_path / "work")
    tuned = got["details"]["fine_tune"]
    assert tuned["steps"] > 20 and tuned["last_loss"] < tuned["first_loss"] / 2
    # Measured: zero-shot nDCG@10 0.078, fine-tuned 0.113 to 0.123 (fine-tune seeds 0, 1, 2); asked: 0.015 more.
    assert got["ndcg@10"] > got["zero_shot/ndcg@10"] + 0.015
    assert got["mrr@10"] > got["zero_shot/mrr@10"]
    elsewhere = FolderModel(docstring_model.folder, output_dir=tmp_path / "elsewhere")  # no cached fine-tune there
    again = retrieval.run(task("retrieval", tmp_path, **settings), elsewhere, tmp_path / "again")
    assert not again["details"]["fine_tune"]["reused"]
    assert again["ndcg@10"] == got["ndcg@10"]  # seeded: the same batches, the same numbers


def test_sts_fine_tune_with_cosent_on_the_offline_pairs(offline, docstring_model, tmp_path):
    train = tmp_path / "train.tsv"  # the first 300 training pairs: 10 steps
    train.write_text("".join((offline / "sts" / "train.tsv").read_text().splitlines(keepends=True)[:301]))
    sts_task = task("sts", tmp_path, data_file=offline / "sts" / "test.tsv", train_file=train, max_length=32,
                    epochs=1, learning_rate=1e-3, train_batch_size=32)
    got = sts.run(sts_task, docstring_model, tmp_path / "work")
    tuned = got["details"]["fine_tune"]
    assert tuned["settings"]["loss"] == "cosent" and tuned["pairs"] == 300 and tuned["steps"] == 10
    assert got["spearman"] == got["details"]["fine_tuned"]["spearman"] != got["zero_shot/spearman"]
    assert got["zero_shot/spearman"] == sts.run(task("sts", tmp_path, data_file=offline / "sts" / "test.tsv",
                                                     max_length=32), docstring_model, tmp_path / "zero")["spearman"]


# --- the offline data ---------------------------------------------------------------------------------------------


def test_eval_data_is_deterministic_keeps_its_files_and_refuses_to_replace_an_edited_one(offline, tmp_path, capsys):
    again = tmp_path / "again"
    assert main(["eval-data", "--output_dir", str(again)]) == 0
    files = sorted(p.relative_to(offline) for p in offline.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((offline / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert main(["eval-data", "--output_dir", str(again)]) == 0  # the same files: kept, nothing to do

    edited = (again / "offline.yaml").read_text() + "# mine\n"
    (again / "offline.yaml").write_text(edited)
    capsys.readouterr()
    assert main(["eval-data", "--output_dir", str(again)]) == 2
    err = capsys.readouterr().err
    assert str(again / "offline.yaml") in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (again / "offline.yaml").read_text() == edited


def test_the_offline_suite_names_its_files_and_trains_on_other_modules(offline):
    suite = yaml.safe_load((offline / "offline.yaml").read_text())["tasks"]
    for name, keys in suite.items():
        settings = kind_module(keys["kind"]).Settings(**{k: (offline / v if k in ("data_dir", "train_file", "data_file")
                                                             else v) for k, v in keys.items() if k != "kind"})
        kind_module(keys["kind"]).check(TaskConfig(name, keys["kind"], settings, offline / "offline.yaml"))
    test_titles = [json.loads(line)["title"] for line in (offline / "docstrings" / "corpus.jsonl").open()]
    test_queries = {json.loads(line)["text"] for line in (offline / "docstrings" / "queries.jsonl").open()}
    train = [line.split("\t") for line in (offline / "docstrings-train.tsv").read_text().splitlines()[1:]]
    modules = lambda names: {n.rsplit(".", 1)[0].split(".")[0] for n in names}  # noqa: E731
    assert len(test_titles) > 200 and len(train) > 400
    assert not modules(test_titles) & modules(p.split(" ", 1)[0] for _, p in train)
    assert not test_queries & {q for q, _ in train}


# --- bad input ------------------------------------------------------------------------------------------------


def good_beir(folder: Path) -> Path:
    return write_beir(folder, {"d1": "w5 w6", "d2": "w7 w8"}, {"q1": "w5", "q2": "w7"},
                      [("q1", "d1", 1), ("q2", "d2", 1)])


BAD_BEIR = [
    ("corpus.jsonl", '{"_id": "d1", "text": "w5"}\n{"_id": "d2", "text": \n', "line 2 is not valid JSON"),
    ("corpus.jsonl", '{"_id": "d1", "text": "w5"}\n{"_id": "d2"}\n', "line 2 has no 'text'"),
    ("corpus.jsonl", '{"text": "w5"}\n', "line 1 has no '_id'"),
    ("corpus.jsonl", '{"_id": "d1", "text": "w5"}\n{"_id": "d1", "text": "w6"}\n', "line 2 repeats the id 'd1'"),
    ("corpus.jsonl", '["d1", "w5"]\n', "line 1 is not a JSON object"),
    ("corpus.jsonl", '{"_id": "d1", "text": 5}\n', "\"text\" is not text"),
    ("corpus.jsonl", "\n", "holds no document"),
    ("queries.jsonl", '{"_id": "q1", "text": "w5"}\n{"_id": "q1", "text": "w7"}\n', "repeats the id 'q1'"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td9\t1\n", "names document 'd9'"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq7\td1\t1\n", "names query 'q7'"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t0\nq2\td2\t0\n", "gives no query a relevant document"),
    ("qrels/test.tsv", "q1\td1\t1\n", "is not the header"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1 d1 1\n", "has 1 tab-separated fields"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\thigh\n", "score 'high' is not a whole number"),
    ("qrels/test.tsv", "", "is empty"),
]


@pytest.mark.parametrize(("name", "text", "says"), BAD_BEIR, ids=[f"{n}:{s}" for n, _, s in BAD_BEIR])
def test_a_bad_beir_folder_is_one_sentence_naming_the_file(tmp_path, name, text, says):
    data = good_beir(tmp_path / "beir")
    (data / name).write_text(text)
    with pytest.raises(UserError) as e:
        retrieval.check(task("retrieval", tmp_path, data_dir=data))
    message = str(e.value)
    assert str(data / name) in message and says in message and len(message.splitlines()) == 1, message


def test_missing_files_and_a_missing_split(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        retrieval.check(task("retrieval", tmp_path, data_dir=tmp_path / "nowhere"))
    data = good_beir(tmp_path / "beir")
    with pytest.raises(UserError, match=r"qrels/dev\.tsv does not exist"):
        retrieval.check(task("retrieval", tmp_path, data_dir=data, split="dev"))
    (data / "queries.jsonl").unlink()
    with pytest.raises(UserError, match=r"queries\.jsonl does not exist"):
        retrieval.check(task("retrieval", tmp_path, data_dir=data))


BAD_PAIRS = [
    ("query\tpositive\nw5\tw6\tw7\n", "line 2 has 3 tab-separated fields where the header has 2"),
    ("query\n", "the header has 1 tab-separated columns"),
    ("query\tpositive\n", "holds no pair"),
    ("query\tpositive\nw5\t \n", "line 2 has an empty field"),
]


@pytest.mark.parametrize(("text", "says"), BAD_PAIRS, ids=[s for _, s in BAD_PAIRS])
def test_a_bad_train_file_is_refused_before_any_model(tmp_path, text, says):
    (tmp_path / "train.tsv").write_text(text)
    with pytest.raises(UserError) as e:
        retrieval.check(task("retrieval", tmp_path, data_dir=good_beir(tmp_path / "beir"),
                             train_file=tmp_path / "train.tsv"))
    assert str(tmp_path / "train.tsv") in str(e.value) and says in str(e.value)


BAD_STS = [
    ("a\tb\n", "the header names neither"),
    ("sentence1\tsentence2\tscore\nw5\tw6\tgood\n", "score 'good' is not a number"),
    ("sentence1\tsentence2\tscore\nw5\tw6\t1\nw7\tw8\n", "line 3 has 2 tab-separated fields"),
    ("sentence1\tsentence2\tscore\nw5\tw6\t1\nw7\tw8\t1\n", "at least two pairs with different scores"),
    ("sentence1\tsentence2\tscore\nw5\tw6\tnan\n", "not a finite number"),
]


@pytest.mark.parametrize(("text", "says"), BAD_STS, ids=[s for _, s in BAD_STS])
def test_a_bad_sts_file_is_refused(tmp_path, text, says):
    (tmp_path / "sts.tsv").write_text(text)
    with pytest.raises(UserError) as e:
        sts.check(task("sts", tmp_path, data_file=tmp_path / "sts.tsv"))
    assert str(tmp_path / "sts.tsv") in str(e.value) and says in str(e.value)


@pytest.mark.parametrize(("change", "says"), [({"loss": "triplet"}, "loss 'triplet' is not one of mnrl, cached_mnrl"),
                                              ({"train_batch_size": 0}, "train_batch_size is 0"),
                                              ({"warmup_ratio": 1.5}, "warmup_ratio is 1.5")])
def test_settings_that_cannot_run_name_the_suite_and_task(tmp_path, change, says):
    with pytest.raises(UserError) as e:
        retrieval.check(task("retrieval", tmp_path, data_dir=good_beir(tmp_path / "beir"), **change))
    assert str(e.value).startswith(f"{tmp_path / 'suite.yaml'}: task 't': {says}")
