"""Seeds derived from a run's seed and a name, the same in every process and on every machine.

At the bottom of the package (it imports nothing of it): the row order, the masks, the mixture's draws, dropout
and fine-tuning's shuffles all seed their generators here, and none of them needs the data layer for it.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from the parts, identical in every process (unlike Python's salted hash)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
