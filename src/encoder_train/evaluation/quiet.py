"""Loading and saving a model without transformers' chatter: its progress bars (loading, writing shards) and a
load report that lists only weights the embedder leaves unused (an export's masked-LM head). A report that names
weights the model lacks (MISSING: initialised at random), a shape mismatch or a failed conversion is a real warning
and still prints."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

REAL = ("MISSING", "MISMATCH", "CONVERSION")  # a load report's statuses that say the weights are not what was saved


class _OnlyRealLoadReports(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "LOAD REPORT" not in message or any(status in message for status in REAL)


@contextmanager
def transformers_quietly() -> Iterator[None]:
    """Within: no progress bars from transformers, no load report of unused weights; restored after."""
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    logger = logging.getLogger("transformers.modeling_utils")  # the logger that writes the load report
    only_real = _OnlyRealLoadReports()
    logger.addFilter(only_real)
    try:
        yield
    finally:
        logger.removeFilter(only_real)
        if bars:
            transformers_logging.enable_progress_bar()
