"""The shipped evaluation suites: papers.yaml's keys against the kinds' schemas (its data is a download, so its
files are not read), and every reference value with its source."""

from pathlib import Path

import pytest

from encoder_train.config import BUNDLED_CONFIG_DIR
from encoder_train.errors import UserError
from encoder_train.evaluation.suite import load_suite

PAPERS = BUNDLED_CONFIG_DIR / "eval" / "papers.yaml"


def test_the_papers_suite_parses_against_the_kinds_schemas():
    suite = load_suite(PAPERS, check_files=False)
    kinds = {t.name: t.kind for t in suite.tasks}
    assert {kinds[n] for n in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")} == {"classification"}
    assert {kinds[n] for n in ("scifact", "nfcorpus", "fiqa", "trec-covid", "arguana", "mldr-512", "mldr-8192")} \
        == {"retrieval"}
    assert kinds["stsb-embeddings"] == "sts"
    tasks = {t.name: t for t in suite.tasks}
    # MLDR twice, the window the only difference: what a context extension bought.
    assert (tasks["mldr-512"].settings.max_length, tasks["mldr-8192"].settings.max_length) == (512, 8192)
    assert tasks["mldr-512"].settings.data_dir == tasks["mldr-8192"].settings.data_dir == PAPERS.parent / "mldr-en"
    # The seven retrieval tasks fine-tune alike (file, settings, tokens per text): one fine-tune per model.
    retrieval = [t.settings for t in suite.tasks if t.kind == "retrieval"]
    tuned = {(s.train_file, s.train_max_length or s.max_length, s.epochs, s.learning_rate, s.train_batch_size, s.loss,
              s.mini_batch_size, s.scale, s.warmup_ratio, s.seed) for s in retrieval}
    assert len(retrieval) == 7 and len(tuned) == 1
    for task in suite.tasks:
        if task.reference:  # a published number always says where it was published
            source = task.reference_source or ""
            assert "arXiv" in source or "model card" in source, task.name
            assert all(0.0 < v < 1.0 for v in task.reference.values())  # as the kinds report them: fractions


def test_the_papers_suite_read_with_its_files_names_the_missing_folder():
    with pytest.raises(UserError, match=r"glue/CoLA"):
        load_suite(PAPERS)


def test_a_key_of_fixed_choices_names_them(tmp_path: Path):
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n  docs:\n    kind: retrieval\n    data_dir: beir/docs\n    loss: triplet\n")
    with pytest.raises(UserError, match=r"task docs: loss must be one of 'mnrl', 'cached_mnrl', not 'triplet'"):
        load_suite(suite, check_files=False)
