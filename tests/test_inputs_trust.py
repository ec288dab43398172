"""Hostile inputs: files and settings that claim more than they hold, or carry what must not be shown.

Each is refused in one sentence naming the file, flag or variable (exit 2, no traceback) before it costs memory,
time or a secret: shards whose header claims more rows than their bytes store, compressed text that expands without
bound, URLs where paths are taken and the credentials inside them, an unreachable Hub, a bad cache setting, a
dangling link where the TensorBoard folder goes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from encoder_train.data.shards import scan_shards
from encoder_train.errors import UserError
from test_object_storage import aws, moto  # noqa: F401 - the real moto server, as fixtures


def one_sentence(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.startswith("encoder-train: error:")]
    assert "Traceback" not in text and len(lines) == 1, text[-3000:]
    return lines[0]


# ---- shards whose shape claims more ids than the file stores ----------------------------------------------------

# Every way torch.save writes fewer bytes than [rows, width] x itemsize: it saves a view's storage, not its shape.
SMALL = torch.arange(5, 105, dtype=torch.int32)  # 100 ids, 400 bytes
CLAIMS = {
    "expanded_rows": lambda: SMALL[:8].view(1, 8).expand(10**12, 8),  # row stride 0: 8 TB claimed
    "hang_sized": lambda: SMALL[:8].view(1, 8).expand(5 * 10**7, 8),  # would hang ordering and checking rows
    "overlapping_rows": lambda: SMALL.as_strided((90, 8), (1, 1)),  # row i starts one id after row i-1
    "half_overlapping": lambda: SMALL.as_strided((20, 8), (4, 1)),
    "broadcast_column": lambda: SMALL.view(100, 1).expand(100, 8),  # one id repeated along each row
    "offset_view": lambda: SMALL.as_strided((12, 8), (0, 1), 90),  # a slice near the storage's end, repeated
}


def save_claims(folder: Path, name: str, legacy: bool = False) -> Path:
    folder.mkdir(parents=True)
    torch.save(CLAIMS[name](), folder / f"{name}.pt", _use_new_zipfile_serialization=not legacy)
    return folder


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_a_shard_claiming_more_rows_than_it_stores_is_refused_locally(tmp_path, name, legacy):
    folder = save_claims(tmp_path / "data", name, legacy)
    with pytest.raises(UserError, match="claims .* rows .* stores only") as e:
        scan_shards(str(folder), 128)
    assert f"{name}.pt" in str(e.value) and "\n" not in str(e.value)


def test_views_that_store_every_row_still_read(tmp_path):
    """A slice of a wider tensor stores more than its shape (the rest of each row): accepted and read in place."""
    wide = torch.randint(5, 100, (30, 16), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    (tmp_path / "d").mkdir()
    torch.save(wide[:, 4:12], tmp_path / "d" / "cols.pt")
    torch.save(wide[10:20], tmp_path / "d" / "rows.pt")
    torch.save(wide.t().contiguous().t(), tmp_path / "d" / "colmajor.pt")
    assert [(s.rows, s.width) for s in scan_shards(str(tmp_path / "d"), 128)] == [(30, 16), (30, 8), (10, 16)]


@pytest.mark.parametrize("name", ["expanded_rows", "overlapping_rows", "broadcast_column"])
def test_a_shard_claiming_more_rows_than_it_stores_is_refused_in_object_storage(aws, tmp_path, name):  # noqa: F811
    url = aws.upload(save_claims(tmp_path / "data", name), f"claims-{name}")
    with pytest.raises(UserError, match="claims .* rows .* stores only") as e:
        scan_shards(url, 128)
    assert f"{url}/{name}.pt" in str(e.value)
