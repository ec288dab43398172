"""Shard formats, chosen by a file's suffix.

A data folder's shards are the files under it whose names end in a suffix of FORMATS (data/store.py lists them),
and each is parsed by the format its suffix maps to. Adding a format (Arrow IPC, a memory-mapped `.bin`, ...) is
one module in this folder implementing `ShardFormat` (base.py) and one line here.
"""

from __future__ import annotations

from pathlib import Path

from encoder_train.data.formats.base import ShardFormat
from encoder_train.data.formats.pt import PtFormat
from encoder_train.errors import UserError

FORMATS: dict[str, ShardFormat] = {
    ".pt": PtFormat(),
}


def suffixes() -> tuple[str, ...]:
    """The suffixes that make a file a shard."""
    return tuple(FORMATS)


def kinds() -> str:
    """The suffixes for a message: `.pt`, or `.pt or .bin`."""
    return " or ".join(FORMATS)


def format_for(path: str | Path) -> ShardFormat:
    """The format of a shard, by the longest suffix of FORMATS that its name ends in."""
    name = str(path)
    claimed = [s for s in FORMATS if name.endswith(s)]
    if not claimed:
        raise UserError(f"data file {name} is not a shard (its name ends in none of {', '.join(FORMATS)}); "
                        "remove it from the data folder.")
    return FORMATS[max(claimed, key=len)]
