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


# ---- compressed text that expands without bound ------------------------------------------------------------------

# Reads the documents of argv[1] (at most argv[2] of them) with the address space limited to what the process has
# after its imports plus LIMIT_MB: memory beyond that is a MemoryError, which ends the process with a traceback.
BOUNDED_READ = """
import resource, sys
from encoder_train.errors import UserError
from encoder_train.tokenizer import iter_texts
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize")) << 10
resource.setrlimit(resource.RLIMIT_AS, (size + ({limit_mb} << 20), resource.RLIM_INFINITY))
try:
    for i, text in enumerate(iter_texts([sys.argv[1]])):
        if i + 1 == int(sys.argv[2]):
            break
    print("read", i + 1, "documents")
except UserError as e:
    print("refused:", e)
"""
LIMIT_MB = 384  # a line at MAX_LINE_CHARS (64 M characters) takes ~150 MB to read; the bombs expand to 4 GB


def zstd_bomb(path: Path, line: bytes, frames: int = 64, frame_bytes: int = 64 << 20) -> Path:
    """`frames` copies of one frame of `line` repeated to `frame_bytes`: a few hundred KB on disk, 4 GB of text."""
    zstandard = pytest.importorskip("zstandard")
    frame = zstandard.ZstdCompressor().compress(line * (frame_bytes // len(line)))
    path.write_bytes(frame * frames)
    return path


def gzip_bomb(path: Path, line: bytes, total: int = 4 << 30) -> Path:
    import zlib

    chunk = line * ((16 << 20) // len(line))
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
    with open(path, "wb") as f:
        for _ in range(total // len(chunk)):
            f.write(packer.compress(chunk))
        f.write(packer.flush())
    return path


def bounded_read(path: Path, documents: int) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", BOUNDED_READ.format(limit_mb=LIMIT_MB), str(path), str(documents)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stdout.strip()


@pytest.mark.parametrize("suffix", [".txt.zst", ".jsonl.zst"])
def test_a_zstd_bomb_of_one_line_is_refused_within_bounded_memory(tmp_path, suffix):
    from encoder_train.tokenizer import MAX_LINE_CHARS

    said = bounded_read(zstd_bomb(tmp_path / f"bomb{suffix}", b"a"), 1)
    assert said == (f"refused: {tmp_path / f'bomb{suffix}'} line 1 is longer than {MAX_LINE_CHARS:,} characters "
                    "(the most one line may hold); break it into lines, or split its document into several."), said


def test_a_zstd_bomb_of_short_lines_streams_within_bounded_memory(tmp_path):
    # 40 million lines of 100 characters; the first 50 documents (of 1 M characters each) need 50 MB of text.
    assert bounded_read(zstd_bomb(tmp_path / "lines.txt.zst", b"x" * 99 + b"\n"), 50) == "read 50 documents"


def test_a_gzip_bomb_of_one_line_is_refused_within_bounded_memory(tmp_path):
    said = bounded_read(gzip_bomb(tmp_path / "bomb.txt.gz", b"a", total=72 << 20), 1)
    assert said.startswith("refused: ") and "line 1 is longer than" in said, said


def test_a_line_of_exactly_the_limit_is_read(tmp_path, monkeypatch):
    from encoder_train import tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "MAX_LINE_CHARS", 20)
    (tmp_path / "ok.txt").write_text("x" * 20 + "\r\n" + "y" * 20 + "\n\n" + "z" * 20)
    assert list(tokenizer_module.iter_texts([tmp_path / "ok.txt"])) == ["x" * 20 + "\n" + "y" * 20, "z" * 20]
    (tmp_path / "long.jsonl").write_text('{"text": "a"}\n' * 3 + '{"text": "one too long"}\n')
    with pytest.raises(UserError, match=r"long.jsonl line 4 is longer than 20 characters"):
        list(tokenizer_module.iter_texts([tmp_path / "long.jsonl"]))


def test_the_cli_names_the_line_that_is_too_long(tmp_path, capsys):
    from encoder_train.cli import main

    bomb = zstd_bomb(tmp_path / "bomb.jsonl.zst", b"a", frames=2)
    assert main(["tokenizer", "--input", str(bomb), "--output", str(tmp_path / "tok.json"), "--vocab_size", "300"]) == 2
    err = capsys.readouterr().err
    assert "bomb.jsonl.zst line 1 is longer than" in one_sentence(err)
    assert not (tmp_path / "tok.json").exists()


def test_every_zstd_frame_layout_reads_whole(tmp_path):
    """Frames with and without checksums and content sizes, from a stream (no size known), with skippable frames
    between them: all are read back exactly, a block at a time."""
    zstandard = pytest.importorskip("zstandard")
    from encoder_train.tokenizer import iter_texts

    texts = [f"document {i} " + "words " * (40_000 * i) for i in range(4)]
    plain, checked = zstandard.ZstdCompressor(write_content_size=False), zstandard.ZstdCompressor(write_checksum=True)
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345"
    streamed = checked.compressobj()
    parts = [plain.compress(texts[0].encode() + b"\n\n"), skippable, checked.compress(texts[1].encode() + b"\n\n"),
             streamed.compress(texts[2].encode() + b"\n\n") + streamed.flush(), skippable,
             zstandard.ZstdCompressor(level=9).compress(texts[3].encode())]
    (tmp_path / "frames.txt.zst").write_bytes(b"".join(parts))
    assert "".join(iter_texts([tmp_path / "frames.txt.zst"])) == "".join(texts)
    (tmp_path / "cut.txt.zst").write_bytes(b"".join(parts[:2]) + skippable[:7])  # cut inside a skippable frame
    with pytest.raises(UserError, match="cut short"):
        list(iter_texts([tmp_path / "cut.txt.zst"]))
