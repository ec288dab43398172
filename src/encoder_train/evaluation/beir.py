"""A retrieval task in the BEIR layout, read strictly: every mistake is one sentence naming the file and line.

    DATA_DIR/corpus.jsonl        {"_id": "d1", "title": "...", "text": "..."} per line (title optional)
    DATA_DIR/queries.jsonl       {"_id": "q1", "text": "..."} per line
    DATA_DIR/qrels/SPLIT.tsv     a header `query-id  corpus-id  score`, then one judgement per line (tab-separated)

Ids are strings (a number is read as its decimal text, as BEIR's own loader does). A document's text is its title
and text joined by a space. A judgement with score > 0 makes the document relevant to the query; 0 or below is
judged not relevant. Relevance is binary: graded scores (TREC-COVID's 1 and 2) count alike, as in
sentence-transformers' InformationRetrievalEvaluator, which scores the task.

Queries that cannot be scored are dropped, counted in `BeirTask.dropped` (the report's details), never refused:
those the split's qrels do not name (BEIR's queries.jsonl holds every split's queries) and those the qrels name
only with score <= 0 (no relevant document: every ranking scores 0, which would only dilute the mean). A qrels
line naming a query or a document that the files lack is an error, and so is a split left with no query.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from encoder_train.errors import UserError

QRELS_HEADER = ("query-id", "corpus-id", "score")
QRELS_HEADER_SHOWN = "query-id<TAB>corpus-id<TAB>score"


@dataclass(frozen=True)
class Dropped:
    """Queries of queries.jsonl left out of the scoring, and why."""

    without_qrels: int = 0
    """Queries the split's qrels do not name (another split's, or unjudged)."""
    without_relevant: list[str] = field(default_factory=list)
    """Ids of queries whose every judgement in the split has score <= 0."""


@dataclass(frozen=True)
class BeirTask:
    """A split of a BEIR folder, as the evaluator takes it."""

    corpus: dict[str, str]  # document id -> "title text"
    queries: dict[str, str]  # query id -> text, only the queries scored
    relevant: dict[str, set[str]]  # query id -> ids of its relevant documents (score > 0), never empty
    dropped: Dropped


def split_file(data_dir: Path, split: str) -> Path:
    return Path(data_dir) / "qrels" / f"{split}.tsv"


def read_beir(data_dir: Path, split: str) -> BeirTask:
    """Read and check the folder's corpus, queries and the split's qrels."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"retrieval data_dir {data_dir} is not a folder; pass a BEIR-layout folder holding "
                        "corpus.jsonl, queries.jsonl and qrels/<split>.tsv.")
    corpus = {}
    for path, number, record in _records(data_dir / "corpus.jsonl"):
        doc_id, text = _text_record(path, number, record, corpus)
        title = record.get("title") or ""
        if not isinstance(title, str):
            raise UserError(f"{path} line {number}: \"title\" is not text; give it as a string, or leave it out.")
        corpus[doc_id] = f"{title} {text}".strip() if title else text
    if not corpus:
        raise UserError(f"{data_dir / 'corpus.jsonl'} holds no document; retrieval needs at least one line "
                        '{"_id": ..., "text": ...}.')
    all_queries = {}
    for path, number, record in _records(data_dir / "queries.jsonl"):
        query_id, text = _text_record(path, number, record, all_queries)
        all_queries[query_id] = text
    judged = _qrels(split_file(data_dir, split), all_queries, corpus)
    relevant = {q: {d for d, score in docs.items() if score > 0} for q, docs in judged.items()}
    queries = {q: text for q, text in all_queries.items() if relevant.get(q)}
    dropped = Dropped(without_qrels=sum(q not in judged for q in all_queries),
                      without_relevant=sorted(q for q in judged if not relevant[q]))
    if not queries:
        raise UserError(f"{split_file(data_dir, split)} gives no query a relevant document (score > 0); a "
                        "retrieval split needs at least one, check that this is the split's qrels file.")
    return BeirTask(corpus, queries, {q: relevant[q] for q in queries}, dropped)


def _records(path: Path) -> Iterator[tuple[Path, int, dict]]:
    """(path, line number, object) for each non-blank line of a .jsonl file, streamed."""
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path} line {number} is not valid JSON ({getattr(e, 'msg', e)}); each line must be one "
                            'JSON object such as {"_id": "1", "text": "..."}.') from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {number} is not a JSON object; each line must be one object such as "
                            '{"_id": "1", "text": "..."}.')
        yield path, number, record


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) of a UTF-8 text file, streamed."""
    if not path.is_file():
        raise UserError(f"{path} does not exist; a BEIR-layout folder holds corpus.jsonl, queries.jsonl and "
                        "qrels/<split>.tsv (pass the folder as data_dir, the split as split).")
    try:
        with open(path, encoding="utf-8") as f:
            yield from enumerate(f, start=1)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; convert it to UTF-8 (e.g. with iconv).") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); check the file and its permissions.") from None


def _text_record(path: Path, number: int, record: dict, seen: dict[str, str]) -> tuple[str, str]:
    """The record's id (as text) and text, checked: both present, the text a string, the id new."""
    for key in ("_id", "text"):
        if key not in record:
            raise UserError(f"{path} line {number} has no {key!r}; every line needs \"_id\" and \"text\".")
    raw_id, text = record["_id"], record["text"]
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        raise UserError(f"{path} line {number}: \"_id\" is {raw_id!r}; give it as a string.")
    if not isinstance(text, str):
        raise UserError(f"{path} line {number}: \"text\" is not text; give it as a string.")
    item_id = str(raw_id)
    if item_id in seen:
        raise UserError(f"{path} line {number} repeats the id {item_id!r} of an earlier line; give each line its "
                        "own \"_id\".")
    return item_id, text


def _qrels(path: Path, queries: dict[str, str], corpus: dict[str, str]) -> dict[str, dict[str, int]]:
    """query id -> {document id: score} from a qrels .tsv, every id checked against the files."""
    judged: dict[str, dict[str, int]] = {}
    header_seen = False
    for number, line in _lines(path):
        if not line.strip():
            continue
        cells = line.rstrip("\r\n").split("\t")
        if not header_seen:
            if tuple(c.strip() for c in cells) != QRELS_HEADER:
                raise UserError(f"{path} line {number} is not the header {QRELS_HEADER_SHOWN!r}; "
                                "a qrels file starts with it.")
            header_seen = True
            continue
        if len(cells) != 3:
            raise UserError(f"{path} line {number} has {len(cells)} tab-separated fields; each judgement is "
                            "`query-id<TAB>corpus-id<TAB>score`.")
        query_id, doc_id, score_text = (c.strip() for c in cells)
        try:
            score = int(score_text)
        except ValueError:
            raise UserError(f"{path} line {number}: score {score_text!r} is not a whole number; relevance is "
                            "0 (not relevant) or a positive grade.") from None
        if query_id not in queries:
            raise UserError(f"{path} line {number} names query {query_id!r}, which queries.jsonl does not hold; "
                            "add the query or remove the line.")
        if doc_id not in corpus:
            raise UserError(f"{path} line {number} names document {doc_id!r}, which corpus.jsonl does not hold; "
                            "add the document or remove the line.")
        if doc_id in judged.get(query_id, {}):
            raise UserError(f"{path} line {number} judges query {query_id!r} and document {doc_id!r} again; keep "
                            "one line per pair.")
        judged.setdefault(query_id, {})[doc_id] = score
    if not header_seen:
        raise UserError(f"{path} is empty; it needs the header {QRELS_HEADER_SHOWN!r} and one judgement "
                        "per line.")
    return judged
