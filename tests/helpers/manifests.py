"""A shard manifest for a folder of shards already written (as `pretokenize` writes one when its tasks are done),
built from each shard's own header and bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import PAD
from encoder_train.data.formats import format_for
from encoder_train.data.formats.base import ShardInfo
from encoder_train.data.manifest import NAME, Manifest, ShardEntry, TokenizerEntry, Totals, dtype_name
from encoder_train.data.shards import ShardReader


def entry(info: ShardInfo, rel: str) -> ShardEntry:
    data = Path(info.path).read_bytes()
    reader = ShardReader(info)
    tokens = sum(int((chunk != PAD).sum()) for chunk in reader.chunks())
    reader.close()
    return ShardEntry(path=rel, task=0, rows=info.rows, width=info.width, dtype=dtype_name(info.dtype),
                      offset=info.offset, row_stride=info.row_stride, bytes=len(data), tokens=tokens,
                      sha256=hashlib.sha256(data).hexdigest(), inputs=())


def manifest_for(root: Path, folders: dict[str, str] | None = None) -> Manifest:
    """The manifest of every .pt shard under `root` (paths relative to it)."""
    shards = []
    for p in sorted(root.rglob("*.pt"), key=lambda p: p.relative_to(root).parts):
        shards.append(entry(format_for(p).header(str(p), 1 << 20), p.relative_to(root).as_posix()))
    totals = Totals(documents=0, input_bytes=0, rows=sum(s.rows for s in shards),
                    tokens=sum(s.tokens for s in shards), shards=len(shards))
    return Manifest(num_tasks=1, seq_len=max(s.width for s in shards), text_field="text",
                    tokenizer=TokenizerEntry(vocab_size=128, sha256="0" * 64), folders=folders or {},
                    inputs=(), shards=tuple(shards), totals=totals)


def write_manifest(root: Path, folders: dict[str, str] | None = None) -> Manifest:
    manifest = manifest_for(root, folders)
    (root / NAME).write_text(manifest.to_json())
    return manifest
