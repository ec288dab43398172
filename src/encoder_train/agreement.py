"""What every process of a run must agree on, compared at start (distributed.check_agree does the comparing).

Each node reads its own config, flags, tokenizer and data, and nothing else makes them agree: a node started with
another batch_size would train on rows at the wrong positions without a word, another set of sources would break
the first collective that counts them (gloo aborts), another model shape or stop_at would fail later with a
traceback. So before any collective of the run, every rank describes what must agree as {what: value}, in the
order a message names them: every key of the resolved config, the tokenizer, and the files of each source.

Left out are what may differ between nodes and is checked otherwise: the folders of the data, the held-out data and
the tokenizer (each node may mount the same files at another path, or keep a copy on its own disk: what they hold
is compared instead, each source's shard names, rows and widths, as a resume compares them), the checkpoint folder
(distributed.check_shared_folder checks that every node sees one folder), and the loader's speed knobs.
"""

from __future__ import annotations

import hashlib
from typing import Any

from tokenizers import Tokenizer

from encoder_train.config import Config
from encoder_train.data.formats.base import ShardInfo
from encoder_train.data.mixture import SINGLE, Source

# Config keys that may differ between nodes (see the module); a source's folders are its `data_dir` and
# `val_data_dir` under data.sources.NAME.
PER_NODE = {"data.data_dir", "data.val_data_dir", "data.tokenizer_filepath", "model.init_from_hf",
            "checkpoint.checkpoint_dir", "data.num_workers", "data.prefetch_batches"}
SOURCE_FOLDERS = ("data_dir", "val_data_dir")


def what_must_agree(config: Config, sources: list[Source], val_shards: list[ShardInfo] | None, tokenizer: Tokenizer,
                    restart_sources: set[str]) -> dict[str, str]:
    """{what: value} of everything every process must share, values short enough for a message."""
    per_node = PER_NODE | {f"data.sources.{name}.{folder}" for name in config.data.sources or {}
                           for folder in SOURCE_FOLDERS}
    values = {"the list of sources": ", ".join(s.name for s in sources)}  # first: other sources differ in many keys
    values |= {key: repr(value) for key, value in _flat(config.to_dict()) if key not in per_node}
    values["--restart_source"] = ", ".join(sorted(restart_sources)) or "none"
    values["the tokenizer"] = (f"{tokenizer.get_vocab_size()} tokens (digest "
                               f"{hashlib.blake2b(tokenizer.to_str().encode(), digest_size=6).hexdigest()})")
    for s in sources:
        values[f"the data of {_flag(s.name, 'data_dir')}"] = _files(s.shards, s.root)
        if s.val_shards:
            root = config.data.sources[s.name].val_data_dir if config.data.sources else ""
            values[f"the data of {_flag(s.name, 'val_data_dir')}"] = _files(s.val_shards, root or "")
    if val_shards:
        values["the data of --val_data_dir"] = _files(val_shards, config.data.val_data_dir or "")
    return values


def _flat(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """A nested config dict as (dotted key, leaf value) pairs; lists by index (phases[0].name)."""
    if isinstance(value, dict) and value:
        return [kv for k, v in value.items() for kv in _flat(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list) and value:
        return [kv for i, v in enumerate(value) for kv in _flat(v, f"{prefix}[{i}]")]
    return [(prefix, value)]


def _flag(source: str, folder: str) -> str:
    return f"--{folder}" if source == SINGLE else f"data.sources.{source}.{folder}"


def _files(shards: list[ShardInfo], root: str) -> str:
    """Shard names (relative to their folder), rows and widths, as a resume compares a source's files."""
    fingerprint = Source("", shards, None, root).fingerprint()
    rows = sum(s.rows for s in shards)
    return (f"{len(shards)} shard{'s' * (len(shards) != 1)}, {rows:,} rows of up to {max(s.width for s in shards)} "
            f"tokens (fingerprint {fingerprint})")
