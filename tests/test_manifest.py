"""The shard manifest (data/manifest.py): its JSON both ways, its strict reading (a malformed manifest is one
sentence naming it), the ShardInfo it gives without reading a shard, and its comparison with a listing; and `train`
with one, locally and from a real S3-compatible server (moto): no shard header read, the same batches, weights and
data fingerprint as without it, and a folder that disagrees with its manifest refused with exit 2."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_shards, make_tokenizer
from encoder_train import checkpoint
from encoder_train.cli import main
from encoder_train.data.formats.pt import PtFormat
from encoder_train.data.manifest import NAME, Manifest, check_listing, shard_info
from encoder_train.data.mixture import SINGLE, Source
from encoder_train.data.shards import scan_shards
from encoder_train.data.store import RemoteStore
from encoder_train.errors import UserError
from helpers.manifests import manifest_for, write_manifest


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
    from_manifest = [shard_info(e, str(folder / e.path), None, 64) for e in m.shards]
    assert from_manifest == from_headers  # path, rows, width, dtype, offset, row_stride
    with pytest.raises(UserError, match="rows of 16 tokens but the model's positions hold at most 8"):
        shard_info(m.shards[0], str(folder / m.shards[0].path), None, 8)


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


# ---- train with a manifest -------------------------------------------------------------------------------------


def split_output(root: Path) -> Path:
    """A pretokenize-shaped output folder: train/ and val/ shards, the manifest at the root."""
    make_shards(root / "train", files=3, rows=40, width=32, seed=1)
    make_shards(root / "val", files=1, rows=16, width=32, seed=9)
    write_manifest(root, {"train": "train", "val": "val"})
    return root


def test_local_scan_with_a_manifest_reads_no_header_and_matches_the_scan(tmp_path, monkeypatch):
    out = split_output(tmp_path / "out")
    headers = {d: scan_shards(out / d, 64) for d in ("train", "val")}
    (out / NAME).rename(tmp_path / NAME)  # the same scan without the manifest...
    assert {d: scan_shards(out / d, 64) for d in ("train", "val")} == headers
    (tmp_path / NAME).rename(out / NAME)
    monkeypatch.setattr(PtFormat, "header", lambda *a: pytest.fail("a shard header was read"))
    for d in ("train", "val"):  # ... and with it, from the parent's manifest
        found = scan_shards(out / d, 64)
        assert found == headers[d]
        assert Source(SINGLE, found, None, str(out / d)).fingerprint() == Source(
            SINGLE, headers[d], None, str(out / d)).fingerprint()
    assert len(scan_shards(out, 64)) == 4  # the whole output folder, from its own manifest
    monkeypatch.chdir(out / "train")  # a relative data folder, "." included: the paths a header scan gives
    assert scan_shards(".", 64) == [dataclasses.replace(s, path=str(Path(s.path).relative_to(out / "train")))
                                    for s in headers["train"]]


def test_local_folder_that_disagrees_with_its_manifest(tmp_path):
    out = split_output(tmp_path / "out")
    shard = out / "train" / "nested" / "shard_001.pt"
    kept = shard.read_bytes()
    shard.unlink()
    with pytest.raises(UserError, match=f"data folder {out / 'train'} disagrees with its manifest {out / NAME}: "
                                        "shard train/nested/shard_001.pt is missing; check it with `encoder-train "
                                        f"pretokenize --verify --output_dir {out}`"):
        scan_shards(out / "train", 64)
    shard.write_bytes(kept[:-10])
    with pytest.raises(UserError, match=f"shard train/nested/shard_001.pt has {len(kept) - 10:,} bytes "
                                        f"\\(the manifest says {len(kept):,}\\)"):
        scan_shards(out / "train", 64)
    shard.write_bytes(kept)
    torch.save(torch.ones(2, 4, dtype=torch.int32), out / "train" / "stray.pt")
    with pytest.raises(UserError, match="train/stray.pt is not in the manifest"):
        scan_shards(out / "train", 64)
    assert shard.read_bytes() == kept  # nothing touched
    (out / "train" / "stray.pt").unlink()
    assert len(scan_shards(out / "train", 64)) == 3
    # A folder the manifest does not name is read from its shards' headers, as without one.
    shutil.copytree(out / "train", out / "other")
    assert len(scan_shards(out / "other", 64)) == 3


def config(tmp_path: Path, steps: int = 12) -> Path:
    body = {
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                  "max_position_embeddings": 130},
        "data": {"num_workers": 0, "shuffle_files": 1},
        "training": {"batch_size": 8, "max_steps": steps, "learning_rate": 3e-3, "warmup_steps": 3,
                     "schedule": "constant", "precision": "fp32", "log_interval": 1, "eval_every": 6,
                     "eval_batches": 1},
        "checkpoint": {"checkpoint_every": 6, "max_checkpoints": 3},
    }
    path = tmp_path / f"run-{steps}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def train(capsys, tmp_path: Path, ckpt: Path, data: str, val: str, *extra) -> tuple[int, str]:
    tok = tmp_path / "tok.json"
    if not tok.exists():
        make_tokenizer(tok)
    rc = main(["train", "--config_file", str(config(tmp_path)), "--tokenizer_filepath", str(tok), "--checkpoint_dir",
               str(ckpt), "--data_dir", data, "--val_data_dir", val, *map(str, extra)])
    out = capsys.readouterr()
    return rc, out.out + out.err


def weights(ckpt: Path, step: int) -> dict[str, torch.Tensor]:
    return checkpoint.load(checkpoint.checkpoint_path(ckpt, step))["model"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_resumes_across_adding_a_manifest(capsys, tmp_path):
    out = split_output(tmp_path / "out")
    (out / NAME).unlink()
    data, val = str(out / "train"), str(out / "val")
    assert train(capsys, tmp_path, tmp_path / "straight", data, val)[0] == 0
    assert train(capsys, tmp_path, tmp_path / "resumed", data, val, "--max_steps", 6)[0] == 0
    write_manifest(out, {"train": "train", "val": "val"})  # the data fingerprint stays: the resume is accepted
    rc, text = train(capsys, tmp_path, tmp_path / "resumed", data, val, "--load_checkpoint", "latest")
    assert rc == 0, text
    assert same(weights(tmp_path / "resumed", 12), weights(tmp_path / "straight", 12))


def upload(moto, folder: Path, prefix: str) -> str:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            moto.client.upload_file(str(p), "shards", f"{prefix}/{p.relative_to(folder).as_posix()}")
    return f"s3://shards/{prefix}"


def test_training_from_a_bucket_with_a_manifest_reads_no_header_and_matches_a_local_copy(
        capsys, aws, tmp_path, monkeypatch):
    out = split_output(tmp_path / "out")
    url = upload(aws, out, "pretokenized")
    offsets = {f"{url}/{s.path}": s.offset for s in Manifest.from_json((out / NAME).read_text(), "m").shards}
    reads: list[tuple[str, int, int]] = []
    wholes: list[str] = []
    listings: list[str] = []
    read, read_whole, listing = RemoteStore.read, RemoteStore.read_whole, RemoteStore.list

    def counted_read(self, u, start, length, where=""):
        reads.append((u, start, length))
        return read(self, u, start, length, where)

    def counted_whole(self, u, denied_is_absent=False):
        wholes.append(u)
        return read_whole(self, u, denied_is_absent)

    def counted_list(self):
        listings.append(self.root)
        return listing(self)

    monkeypatch.setattr(RemoteStore, "read", counted_read)
    monkeypatch.setattr(RemoteStore, "read_whole", counted_whole)
    monkeypatch.setattr(RemoteStore, "list", counted_list)
    rc, text = train(capsys, tmp_path, tmp_path / "remote", f"{url}/train", f"{url}/val")
    assert rc == 0, text
    # Per data folder (train, val) one listing and one manifest read, and every ranged read lies inside a shard's
    # rows: no header is read, before the first step or after.
    assert listings == [f"{url}/train", f"{url}/val"]
    assert wholes == [f"{url}/manifest.json"] * 2
    assert reads and all(start >= offsets[u] for u, start, _ in reads), reads[:5]
    assert train(capsys, tmp_path, tmp_path / "local", str(out / "train"), str(out / "val"))[0] == 0
    assert same(weights(tmp_path / "remote", 12), weights(tmp_path / "local", 12))
    # Without the manifest the same bucket is scanned from the headers (the count above would see them).
    aws.client.delete_object(Bucket="shards", Key="pretokenized/manifest.json")
    reads.clear()
    scan_shards(f"{url}/train", 64)
    assert any(start == 0 for _, start, _ in reads)


def test_a_bucket_that_disagrees_with_its_manifest_is_exit_2(capsys, aws, tmp_path):
    out = split_output(tmp_path / "out")
    url = upload(aws, out, "damaged")
    aws.client.delete_object(Bucket="shards", Key="damaged/train/shard_002.pt")
    rc, text = train(capsys, tmp_path, tmp_path / "ckpt", f"{url}/train", f"{url}/val")
    assert rc == 2
    errors = [line for line in text.splitlines() if line.startswith("encoder-train: error:")]
    assert "Traceback" not in text and len(errors) == 1, text[-2000:]
    assert (f"data folder {url}/train disagrees with its manifest {url}/manifest.json: shard "
            f"train/shard_002.pt is missing; check it with `encoder-train pretokenize --verify --output_dir {url}`"
            ) in errors[0]
    assert aws.secret not in text
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").glob("checkpoint_*"))
