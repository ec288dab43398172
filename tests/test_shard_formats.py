"""The shard-format seam (data/formats/): a second format, registered only in these tests, is listed, read,
batched and trained from exactly as the same ids saved as .pt are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import MASK, PAD, make_rows
from encoder_train.batch import MaskSpec
from encoder_train.cli import main
from encoder_train.data.formats import FORMATS, format_for
from encoder_train.data.formats.base import ID_DTYPES, ShardInfo, check_width
from encoder_train.data.formats.pt import PtFormat
from encoder_train.data.loader import BatchStream
from encoder_train.data.mixture import MLMBatches
from encoder_train.data.shards import ShardReader, scan_shards
from encoder_train.errors import UserError


class BinFormat:
    """Raw little-endian ids, one row after another, beside a JSON header NAME.bin.json holding
    {"rows", "width", "dtype"} (a memory-mappable layout, as Megatron's and nanoGPT's .bin files)."""

    def _info(self, path: str, meta: dict, max_tokens: int, store=None) -> ShardInfo:
        dtype = getattr(torch, meta["dtype"])
        check_width(path, meta["width"], max_tokens)
        return ShardInfo(path, meta["rows"], meta["width"], dtype, offset=0, row_stride=meta["width"], store=store)

    def header(self, path: str, max_tokens: int) -> ShardInfo:
        return self._info(str(path), json.loads(Path(f"{path}.json").read_text()), max_tokens)

    def remote_header(self, store, url: str, size: int, max_tokens: int) -> ShardInfo:
        return self._info(url, json.loads(store.read(f"{url}.json", 0, 1 << 16)), max_tokens, store)

    def load(self, path: str) -> torch.Tensor:
        raise AssertionError("a .bin shard is always read in place")

    def fingerprint(self, info: ShardInfo) -> str:
        return f"{info.rows}\t{info.width}\t{info.dtype}"


def write_bin(path: Path, rows: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.numpy().astype(ID_DTYPES[rows.dtype]).tofile(path)
    meta = {"rows": rows.shape[0], "width": rows.shape[1], "dtype": str(rows.dtype).removeprefix("torch.")}
    Path(f"{path}.json").write_text(json.dumps(meta))


def same_ids_twice(tmp_path: Path, files: int = 3) -> tuple[Path, Path, list[torch.Tensor]]:
    """The same rows as .pt shards in one folder and as .bin shards (same names) in another."""
    shards = [make_rows(64, 32, seed=f).to(torch.int32) for f in range(files)]
    for f, rows in enumerate(shards):
        name = Path("nested" if f % 2 else "") / f"shard_{f:03d}"
        (tmp_path / "pt" / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(rows, tmp_path / "pt" / f"{name}.pt")
        write_bin(tmp_path / "bin" / f"{name}.bin", rows)
    return tmp_path / "pt", tmp_path / "bin", shards


def batches(shards: list[ShardInfo], n: int, workers: int) -> list:
    spec = MaskSpec(pad_id=PAD, mask_id=MASK, special_ids=(0, 1, 2, 3, 4), vocab_size=128, probability=0.15)
    stream = BatchStream(MLMBatches(shards, spec, batch_size=8, seed=0, shuffle_files=2), num_workers=workers,
                         prefetch=2, pin_memory=False)
    try:
        return [next(stream) for _ in range(n)]
    finally:
        stream.close()


def test_pt_is_the_one_format_registered():
    assert list(FORMATS) == [".pt"] and isinstance(format_for("a/b.pt"), PtFormat)
    with pytest.raises(UserError, match=r"^data file a/b.bin is not a shard \(its name ends in none of \.pt\)"):
        format_for("a/b.bin")


def test_a_registered_format_is_listed_read_and_batched_as_pt_is(tmp_path, monkeypatch):
    pt_dir, bin_dir, rows = same_ids_twice(tmp_path)
    with pytest.raises(UserError, match=r"holds no \.pt files"):  # unregistered: not a shard
        scan_shards(bin_dir, 128)

    monkeypatch.setitem(FORMATS, ".bin", BinFormat())
    found = scan_shards(bin_dir, 128)  # the .bin.json headers are not listed: only claimed suffixes are
    assert [Path(s.path).relative_to(bin_dir).as_posix() for s in found] == [
        "nested/shard_001.bin", "shard_000.bin", "shard_002.bin"]
    assert [(s.rows, s.width, s.dtype) for s in found] == [(64, 32, torch.int32)] * 3
    reader = ShardReader(found[0])
    assert torch.equal(reader.rows(5, 3), rows[1][5:8].long())
    reader.close()

    # The same ids, read through either format, give the same masked batches (inline, and in a forked worker).
    from_pt, from_bin = batches(scan_shards(pt_dir, 128), 12, 0), batches(found, 12, 1)
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
               for a, b in zip(from_pt, from_bin, strict=True))

    with pytest.raises(UserError, match=r"has rows of 32 tokens but the model's positions hold at most 16"):
        scan_shards(bin_dir, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"holds no \.pt or \.bin files \(searched subfolders too\)"):
        scan_shards(tmp_path / "empty", 128)


def test_a_shard_that_changes_under_a_registered_format_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setitem(FORMATS, ".bin", BinFormat())
    _, bin_dir, _ = same_ids_twice(tmp_path, files=1)
    info = scan_shards(bin_dir, 128)[0]
    np.zeros(10, dtype="<i4").tofile(info.path)  # cut short after the header was read
    with pytest.raises(UserError, match=r"became shorter while training \(row 0 now lies past its end\)"):
        ShardReader(info).rows(0, 2)


CONFIG = """
model: {hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, max_position_embeddings: 34}
data: {num_workers: 0}  # inline; a forked worker reads the registered format in the test above
training: {batch_size: 8, max_steps: 4, learning_rate: 3.0e-3, warmup_steps: 0, precision: fp32, log_interval: 1}
"""


@pytest.mark.slow  # two training runs: about 8 s on 2 busy cores
def test_training_on_a_registered_format_matches_training_on_pt(tmp_path, monkeypatch, capsys, tokenizer_file):
    pt_dir, bin_dir, _ = same_ids_twice(tmp_path)
    monkeypatch.setitem(FORMATS, ".bin", BinFormat())
    (tmp_path / "run.yaml").write_text(CONFIG)
    losses = []
    for data in (pt_dir, bin_dir):
        ckpt = tmp_path / f"ckpt_{data.name}"
        rc = main(["train", "--config_file", str(tmp_path / "run.yaml"), "--data_dir", str(data),
                   "--tokenizer_filepath", str(tokenizer_file), "--checkpoint_dir", str(ckpt)])
        assert rc == 0, capsys.readouterr().err
        losses.append([json.loads(line)["loss"] for line in (ckpt / "metrics.jsonl").read_text().splitlines()])
    assert len(losses[0]) == 4 and losses[0] == losses[1]
