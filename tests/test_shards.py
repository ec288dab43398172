from pathlib import Path

import pytest
import torch

from conftest import BOS, EOS, PAD, make_rows
from encoder_train.data.formats.base import ShardInfo
from encoder_train.data.formats.pt import check_header, load_shard
from encoder_train.data.order import RowOrder
from encoder_train.data.shards import ShardReader, check_values, scan_shards
from encoder_train.data.store import find_shards
from encoder_train.errors import UserError


def test_recursive_discovery_sorted(tmp_path):
    for rel in ["b.pt", "a/z.pt", "a/deeper/y.pt", "notes.txt"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save(make_rows(2, 8), p) if rel.endswith(".pt") else p.write_text("x")
    found = find_shards(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/deeper/y.pt", "a/z.pt", "b.pt"]
    infos = scan_shards(tmp_path, max_tokens=8)
    assert [(i.rows, i.width) for i in infos] == [(2, 8)] * 3


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        find_shards(tmp_path / "nope")
    with pytest.raises(UserError, match="holds no .pt files"):
        find_shards(tmp_path)


def save(tmp_path: Path, obj, name="bad.pt") -> Path:
    p = tmp_path / name
    torch.save(obj, p)
    return p


@pytest.mark.parametrize(
    "obj, pattern",
    [
        ({"ids": torch.zeros(2, 2)}, "holds a dict, not a tensor"),
        (torch.zeros(2, 4), "holds a float32 tensor"),
        (torch.zeros(2, 4, dtype=torch.bool), "holds a bool tensor"),
        (torch.zeros(8, dtype=torch.long), "1-D tensor"),
        (torch.zeros(2, 2, 2, dtype=torch.long), "3-D tensor"),
        (torch.zeros(2, 33, dtype=torch.long), "rows of 33 tokens but the model's positions hold at most 32"),
        (torch.zeros(0, 4, dtype=torch.long), "empty tensor"),
    ],
)
def test_header_errors_name_file_and_problem(tmp_path, obj, pattern):
    p = save(tmp_path, obj)
    with pytest.raises(UserError, match=pattern) as e:
        check_header(p, load_shard(p), max_tokens=32)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("bad, pattern", [(128, "token id 128, outside the tokenizer's vocabulary of 128"),
                                          (-3, "negative token id -3")])
def test_id_range(tmp_path, bad, pattern):
    t = make_rows(4, 8)
    t[2, 3] = bad
    p = save(tmp_path, t)
    with pytest.raises(UserError, match=pattern):
        check_values(p, load_shard(p), vocab_size=128)


def test_truncated_file(tmp_path):
    p = save(tmp_path, make_rows(64, 32))
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(UserError, match="truncated"):
        load_shard(p)


class Boom:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = Boom()
    evil.target = str(marker)
    p = tmp_path / "evil.pt"
    torch.save({"x": evil}, p)
    with pytest.raises(UserError, match="not a plain tensor file"):
        load_shard(p)
    assert not marker.exists()


def test_int16_and_int32_shards_load(tmp_path):
    for dtype in (torch.int16, torch.int32, torch.int64):
        p = save(tmp_path, make_rows(3, 8).to(dtype), f"{dtype}.pt")
        assert check_header(p, load_shard(p), 8).rows == 3


def order(rows, seed=0, window=2):
    return RowOrder([ShardInfo(f"f{i}", n, 8) for i, n in enumerate(rows)], seed, window)


def test_row_order_is_a_permutation_per_epoch_and_differs_between_epochs():
    rows = [5, 7, 3, 9]
    o = order(rows)
    total = sum(rows)
    epoch0 = [o.locate(p) for p in range(total)]
    epoch1 = [o.locate(p) for p in range(total, 2 * total)]
    everything = {(f, r) for f, n in enumerate(rows) for r in range(n)}
    assert set(epoch0) == everything and set(epoch1) == everything
    assert epoch0 != epoch1
    assert epoch0 != sorted(epoch0)  # shuffled


def test_row_order_is_random_access():
    rows = [5, 7, 3, 9]
    forward = [order(rows).locate(p) for p in range(60)]
    o = order(rows)
    backward = [o.locate(p) for p in reversed(range(60))][::-1]
    assert forward == backward
    assert order(rows, seed=1).locate(0) != forward[0] or order(rows, seed=1).locate(1) != forward[1]


# ---- rows are read with pread, never through a memory map ------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: make_rows(37, 16).to(torch.int16),
    lambda: make_rows(37, 16).to(torch.uint8),
    lambda: make_rows(37, 16).to(torch.int32),
    lambda: make_rows(60, 16)[5:42],  # a view: its rows start inside the saved storage
    lambda: make_rows(37, 24)[:, :16],  # rows with a stride longer than their width
    lambda: make_rows(16, 37).t().contiguous().t(),  # columns contiguous: read whole, in memory
])
def test_reader_gives_the_saved_rows_for_every_layout(tmp_path, make):
    t = make()
    p = save(tmp_path, t)
    info = check_header(p, load_shard(p), 64)
    reader = ShardReader(info)
    assert torch.equal(reader.rows(0, info.rows), t.long())
    assert torch.equal(reader.row(11), t[11].long())
    assert torch.equal(torch.cat(list(reader.chunks(max_bytes=100))), t.long())
    reader.close()


def test_legacy_format_is_read_whole(tmp_path):
    t = make_rows(9, 8)
    p = tmp_path / "legacy.pt"
    torch.save(t, p, _use_new_zipfile_serialization=False)
    info = check_header(p, load_shard(p), 64)
    assert info.offset is None
    assert torch.equal(ShardReader(info).rows(0, 9), t)


def test_a_file_truncated_while_open_is_one_sentence_not_sigbus(tmp_path):
    t = make_rows(400, 32)
    p = save(tmp_path, t)
    info = check_header(p, load_shard(p), 64)
    reader = ShardReader(info)
    assert torch.equal(reader.row(399), t[399])
    with open(p, "r+b") as f:  # shrink the open file, as a re-run of pretokenize or a full disk would
        f.truncate(info.offset + 100 * 32 * 8)
    assert torch.equal(reader.row(10), t[10])
    with pytest.raises(UserError, match="became shorter while training") as e:
        reader.row(399)
    assert str(p) in str(e.value)


def test_rows_all_padding_and_rows_with_nothing_to_mask_are_refused(tmp_path):
    t = make_rows(6, 8)
    t[3] = PAD
    p = save(tmp_path, t)
    with pytest.raises(UserError, match=r"all padding \(row 3 is the first\)"):
        check_values(p, ShardReader(check_header(p, load_shard(p), 64)), 128, PAD, (0, 1, 2, 3, 4))
    only_specials = torch.tensor([[BOS, EOS, PAD, PAD]] * 5)
    p = save(tmp_path, only_specials, "specials.pt")
    with pytest.raises(UserError, match="nothing to mask"):
        check_values(p, ShardReader(check_header(p, load_shard(p), 64)), 128, PAD, (0, 1, 2, 3, 4))


def test_a_file_where_a_folder_is_expected(tmp_path):
    p = save(tmp_path, make_rows(2, 8))
    with pytest.raises(UserError, match="is a file, not a folder"):
        find_shards(p)
