"""The shard manifest (data/manifest.py): its JSON both ways, its strict reading (a malformed manifest is one
sentence naming it), the ShardInfo it gives without reading a shard, and its comparison with a listing."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import make_shards
from encoder_train.data.manifest import Manifest, check_listing, shard_info
from encoder_train.data.shards import scan_shards
from encoder_train.errors import UserError
from helpers.manifests import manifest_for


@pytest.fixture
def folder(tmp_path):
    return make_shards(tmp_path / "out", files=3, rows=20, width=16)


def test_json_round_trip_is_exact(folder):
    m = manifest_for(folder, {"train": "train"})
    assert Manifest.from_json(m.to_json(), "m") == m
    body = json.loads(m.to_json())
    assert body["format"] == "encoder-train shard manifest" and body["version"] == 1
    assert [s["path"] for s in body["shards"]] == ["nested/shard_001.pt", "shard_000.pt", "shard_002.pt"]
    assert body["shards"][0]["dtype"] == "int32" and body["totals"]["rows"] == 60


def test_shard_info_is_what_the_header_gives(folder):
    m = manifest_for(folder)
    from_headers = scan_shards(folder, 64)
    from_manifest = [shard_info(e, str(folder), None, 64) for e in m.shards]
    assert from_manifest == from_headers  # path, rows, width, dtype, offset, row_stride
    with pytest.raises(UserError, match="rows of 16 tokens but the model's positions hold at most 8"):
        shard_info(m.shards[0], str(folder), None, 8)


def test_check_listing_finds_missing_unlisted_and_resized(folder):
    m = manifest_for(folder, {"train": "nested"})
    listed = [(s.path, s.bytes) for s in m.shards]
    assert not check_listing(m, listed)
    d = check_listing(m, [("shard_000.pt", 5), ("shard_002.pt", m.shards[2].bytes), ("extra.pt", 9)])
    assert (d.missing, d.unlisted, d.resized) == (["nested/shard_001.pt"], ["extra.pt"],
                                                  [("shard_000.pt", m.shards[1].bytes, 5)])
    assert d.describe() == (f"shard nested/shard_001.pt is missing, shard shard_000.pt has 5 bytes (the manifest "
                            f"says {m.shards[1].bytes:,}) and extra.pt is not in the manifest")
    assert d.describe(limit=1).endswith("and 2 more")
    # Only the folder's shards are expected in a listing of that folder.
    assert not check_listing(m, [("nested/shard_001.pt", m.shards[0].bytes)], "nested")
    assert check_listing(m, [], "nested").missing == ["nested/shard_001.pt"]


def edit(text: str, change) -> str:
    body = json.loads(text)
    change(body)
    return json.dumps(body)


@pytest.mark.parametrize("change, says", [
    (lambda b: b.update(format="something else"), '"format" is'),
    (lambda b: b.update(version=2), "reads version 1"),
    (lambda b: b.pop("totals"), "lacks the key 'totals'"),
    (lambda b: b.update(extra=1), "unknown key 'extra'"),
    (lambda b: b["shards"][0].update(rows=True), r"shards\[0\].rows is True"),
    (lambda b: b["shards"][0].update(rows=-1), r"shards\[0\].rows is -1"),
    (lambda b: b["shards"][0].update(width=0), r"shards\[0\].width is 0, not a count >= 1"),
    (lambda b: b["shards"][0].update(path="../x.pt"), "not a relative path"),
    (lambda b: b["shards"][0].update(path="s3://b/x.pt"), "not a relative path"),
    (lambda b: b["shards"][0].update(dtype="float32"), "dtype 'float32' is not one of"),
    (lambda b: b["shards"][0].update(bytes=100), "past its 100 bytes"),
    (lambda b: b["shards"][0].update(row_stride=1), "less than its width"),
    (lambda b: b["shards"][0].update(inputs=[3]), "index outside the 0 inputs"),
    (lambda b: b["shards"][0].update(task=4), "names task 4 of 1"),
    (lambda b: b["shards"][1].update(path=b["shards"][0]["path"]), "listed twice"),
    (lambda b: b["inputs"].append({"path": "s3://key:secret@b/a.jsonl", "bytes": 1, "task": 0}), "credentials"),
    (lambda b: b.update(folders={"train": "/abs"}), '"folders" must map'),
    (lambda b: b.update(shards={}), "shards is not a list"),
])
def test_a_malformed_manifest_is_one_sentence_naming_it(folder, change, says):
    text = edit(manifest_for(folder).to_json(), change)
    with pytest.raises(UserError, match=says) as e:
        Manifest.from_json(text, "s3://bucket/out/manifest.json")
    assert str(e.value).startswith("manifest s3://bucket/out/manifest.json is malformed (")
    assert "secret" not in str(e.value)


@pytest.mark.parametrize("text", ["", "{", "[1]", b"\xff\xfe"])
def test_not_a_manifest_at_all(text):
    with pytest.raises(UserError, match="manifest m.json is malformed"):
        Manifest.from_json(text, "m.json")


def test_to_json_writes_every_field(folder):
    m = manifest_for(folder)
    body = json.loads(m.to_json())
    assert set(body) == {"format", "version", *(f.name for f in dataclasses.fields(Manifest))}
