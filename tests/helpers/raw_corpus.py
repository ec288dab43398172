"""A raw corpus as open corpora ship it (.jsonl.zst and Parquet files of documents), and the documents read back out
of packed shards: rows decoded, a task's train and val rows put back in their order, the stream split at </s>."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch

BOS, PAD, EOS = 0, 1, 2
WORDS = [f"w{i}" for i in range(5, 128)]  # the word-level tokenizer's words (conftest.VOCAB)


def documents(n: int, seed: int) -> list[str]:
    """`n` documents of 3 to 60 words; the first word names the document, so every document differs."""
    rng = random.Random(seed)
    return [" ".join([WORDS[(seed * 7 + i) % len(WORDS)], WORDS[i % len(WORDS)]]
                     + [rng.choice(WORDS) for _ in range(rng.randint(1, 58))]) for i in range(n)]


def zst_jsonl(texts: list[str]) -> bytes:
    import zstandard

    lines = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)).encode()
    return zstandard.ZstdCompressor(write_checksum=True).compress(lines)


def parquet(texts: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), out, row_group_size=16)
    return out.getvalue()


def corpus(folder: Path, zst_files: int, parquet_files: int, docs: int) -> dict[str, list[str]]:
    """Write the files under `folder` (raw/a/..., raw/b/...); returns {relative path: its documents}."""
    written = {}
    for i in range(zst_files + parquet_files):
        texts = documents(docs, seed=i)
        rel = f"raw/{'ab'[i % 2]}/part-{i:03d}" + (".jsonl.zst" if i < zst_files else ".parquet")
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zst_jsonl(texts) if i < zst_files else parquet(texts))
        written[rel] = texts
    return written


def token_documents(texts: list[str], tokenizer) -> list[tuple[int, ...]]:
    return [tuple(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def task_stream(train: list[torch.Tensor], val: list[torch.Tensor], val_fraction: float) -> list[int]:
    """One task's token stream: its rows in their order (row i was val when floor((i+1)f) > floor(i f)), each
    without <s>, </s> and padding."""
    train_rows = [r for t in train for r in t.tolist()]
    val_rows = [r for t in val for r in t.tolist()]
    stream: list[int] = []
    for i in range(len(train_rows) + len(val_rows)):
        row = val_rows.pop(0) if int((i + 1) * val_fraction) > int(i * val_fraction) else train_rows.pop(0)
        assert row[0] == BOS
        body = row[1:]
        while body and body[-1] == PAD:
            body.pop()
        assert body[-1] == EOS
        stream += body[:-1]
    assert not train_rows and not val_rows
    return stream


def split_documents(stream: list[int]) -> list[tuple[int, ...]]:
    """The documents of a stream `doc </s> doc </s> doc`."""
    docs, current = [], []
    for token in stream:
        if token == EOS:
            docs.append(tuple(current))
            current = []
        else:
            current.append(token)
    docs.append(tuple(current))
    return docs
