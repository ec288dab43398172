"""Training data in object storage, against a real S3-compatible server: moto in server mode on localhost, with
IAM authentication on, reached by s3fs through AWS_ENDPOINT_URL as any S3-compatible store is.

The same shards in a bucket and in a local folder give the same batches: bit-identical weights and losses, exact
resume, a mixture of a local and a remote source. Every failure (a missing bucket, prefix or object, refused
credentials, an object that is not a shard, an unknown protocol, a missing library, a server that stops in the
middle of a run) is one sentence and exit 2, and no finished step is lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import MASK, PAD, make_shards, make_tokenizer
from encoder_train import checkpoint
from encoder_train.batch import MaskSpec
from encoder_train.cli import main
from encoder_train.data import shards as shards_module
from encoder_train.data.loader import RowSource
from encoder_train.data.mixture import SINGLE, Source
from encoder_train.data.shards import ShardReader, scan_shards
from encoder_train.data.store import RemoteStore
from helpers.s3 import BUCKET, Moto

boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "max_position_embeddings": 130}


@pytest.fixture(scope="module")
def data(moto, tmp_path_factory):
    """Local shards and their copies in the bucket (nested folders, one source of each kind for mixtures)."""
    root = tmp_path_factory.mktemp("local")
    web = make_shards(root / "web", files=3, rows=40, width=32, seed=1)
    code = make_shards(root / "code", files=2, rows=30, width=48, seed=2)
    return {"web": web, "code": code, "web_url": moto.upload(web, "corpus/web"),
            "code_url": moto.upload(code, "corpus/code")}


def config(tmp_path: Path, data: dict | None = None, workers: int = 0, **training) -> Path:
    body = {
        "model": MODEL,
        "data": {"num_workers": workers, **(data or {})},
        "training": {"batch_size": 8, "max_steps": 12, "learning_rate": 3e-3, "warmup_steps": 3,
                     "schedule": "constant", "precision": "fp32", "log_interval": 1, **training},
        "checkpoint": {"checkpoint_every": 1000, "max_checkpoints": 2},
    }
    path = tmp_path / f"run-{len(list(tmp_path.glob('run-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def train(capsys, cfg: Path, ckpt: Path, *extra) -> tuple[int, str]:
    tok = ckpt.parent / "tok.json"
    if not tok.exists():
        make_tokenizer(tok)
    try:
        rc = main(["train", "--config_file", str(cfg), "--tokenizer_filepath", str(tok), "--checkpoint_dir", str(ckpt),
                   *map(str, extra)])
    except SystemExit as e:  # a flag's value refused by argparse (a URL with credentials), from inside parse_args
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out + out.err


def weights(ckpt: Path, step: int) -> dict[str, torch.Tensor]:
    return checkpoint.load(checkpoint.checkpoint_path(ckpt, step))["model"]


def records(ckpt: Path) -> list[dict]:
    return [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]


def losses(ckpt: Path) -> list[float]:
    """The training and held-out losses, in the order logged."""
    return [r.get("loss", r.get("val_loss")) for r in records(ckpt)]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_sentence(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.startswith("encoder-train: error:")]
    assert "Traceback" not in text and len(lines) == 1, text[-3000:]
    return lines[0]


# ---- the same shards give the same run ------------------------------------------------------------------------


def test_headers_rows_order_and_fingerprint_match_the_local_copy(aws, tmp_path):
    # Names whose order by path parts differs from the bucket's own (string) order: a/b.pt < a-c.pt < a.pt.
    local = tmp_path / "names"
    for i, name in enumerate(["a.pt", "a-c.pt", "a/b.pt"]):
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.randint(5, 100, (9, 16), generator=torch.Generator().manual_seed(i)), local / name)
    wide = torch.randint(5, 100, (50, 64), dtype=torch.int16, generator=torch.Generator().manual_seed(9))
    torch.save(wide[:, 8:40], local / "strided.pt")  # rows 64 apart in the file, 32 read: read in place too
    url = aws.upload(local, "names") + "/"  # a trailing slash changes nothing
    here, there = scan_shards(str(local), 128), scan_shards(url, 128)
    assert [Path(s.path).relative_to(local).as_posix() for s in here] == ["a/b.pt", "a-c.pt", "a.pt", "strided.pt"]
    assert [s.path for s in there] == [f"s3://{BUCKET}/names/{n}" for n in ("a/b.pt", "a-c.pt", "a.pt", "strided.pt")]
    for a, b in zip(here, there, strict=True):
        assert (a.rows, a.width, a.dtype, a.offset, a.row_stride) == (b.rows, b.width, b.dtype, b.offset, b.row_stride)
        assert torch.equal(ShardReader(a).rows(0, a.rows), ShardReader(b).rows(0, b.rows))
        assert torch.equal(ShardReader(a).row(a.rows - 1), ShardReader(b).row(b.rows - 1))
    assert Source(SINGLE, here, None, str(local)).fingerprint() == Source(SINGLE, there, None, url).fingerprint()


def test_rows_are_fetched_a_block_at_a_time_once_per_pass(aws, data, monkeypatch):
    found = scan_shards(data["web_url"], 128)
    requests = []
    real_read = RemoteStore.read
    monkeypatch.setattr(RemoteStore, "read", lambda self, url, *a: requests.append(url) or real_read(self, url, *a))
    monkeypatch.setattr(shards_module, "BLOCK_BYTES", 8 * 32 * 4)  # 8 rows of 32 int32 ids: 5 blocks per shard
    spec = MaskSpec(pad_id=PAD, mask_id=MASK, special_ids=(0, 1, 2, 3, 4), vocab_size=128, probability=0.15)
    source = RowSource(found, spec, seed=0, shuffle_files=2)
    rows = sum(s.rows for s in found)
    remote = [source.row(p) for p in range(rows)]  # one pass, rows shuffled within windows of two files
    source.close()
    assert len(requests) == sum(-(-s.rows // 8) for s in found) == 15  # each block once, never a row alone
    local = RowSource(scan_shards(str(data["web"]), 128), spec, seed=0, shuffle_files=2)
    assert all(torch.equal(a, local.row(p)) for p, a in enumerate(remote))


def test_a_bucket_and_its_local_copy_train_alike_and_resume_exactly(capsys, aws, data, tmp_path):
    # One file per window and 20 steps of 8 rows over 120 rows: files are closed and reopened, epochs roll over.
    def cfg(workers: int = 0) -> Path:
        return config(tmp_path, {"shuffle_files": 1}, workers, max_steps=20)

    local, remote, resumed = tmp_path / "local", tmp_path / "remote", tmp_path / "resumed"
    assert train(capsys, cfg(), local, "--data_dir", data["web"])[0] == 0
    rc, out = train(capsys, cfg(workers=1), remote, "--data_dir", data["web_url"])
    assert rc == 0, out
    assert f"data_dir: {data['web_url']}" in (remote / "config.yaml").read_text()  # the URL as given
    assert losses(remote) == losses(local)
    assert same(weights(remote, 20), weights(local, 20))
    # A stop at step 5 and a resume to 20, from the bucket: the same weights as the run never stopped.
    assert train(capsys, cfg(workers=1), resumed, "--data_dir", data["web_url"], "--max_steps", 5)[0] == 0
    rc, out = train(capsys, cfg(workers=1), resumed, "--data_dir", data["web_url"], "--load_checkpoint", "latest")
    assert rc == 0, out
    assert losses(resumed) == losses(local)
    assert same(weights(resumed, 20), weights(local, 20))
    # The stored config holds the URL as given, and no credential.
    stored = json.dumps(checkpoint.load(checkpoint.checkpoint_path(resumed, 20))["config"])
    assert data["web_url"] in stored and aws.secret not in stored and aws.key not in stored


def test_a_mixture_of_a_local_and_a_remote_source(capsys, aws, data, tmp_path):
    def mix(web: str, code: str) -> Path:
        return config(tmp_path, {"sources": {"web": {"data_dir": web, "weight": 3},
                                             "code": {"data_dir": code, "val_data_dir": code}}}, eval_every=4,
                      eval_batches=1, max_steps=8)

    rc, out = train(capsys, mix(str(data["web"]), data["code_url"]), tmp_path / "mixed")
    assert rc == 0, out
    last = [r for r in records(tmp_path / "mixed") if "loss" in r][-1]
    assert last["source/web/rows"] > 0 and last["source/code/rows"] > 0
    assert sum("val/code/loss" in r for r in records(tmp_path / "mixed")) == 2  # at step 4 and 8, from the bucket
    assert train(capsys, mix(str(data["web"]), str(data["code"])), tmp_path / "local")[0] == 0
    assert losses(tmp_path / "mixed") == losses(tmp_path / "local")
    assert same(weights(tmp_path / "mixed", 8), weights(tmp_path / "local", 8))


# ---- failures: one sentence, exit 2, no checkpoint lost -------------------------------------------------------


def test_every_failure_is_one_sentence_and_keeps_the_checkpoints(capsys, aws, data, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    assert train(capsys, config(tmp_path, max_steps=3), ckpt, "--data_dir", data["web"])[0] == 0
    kept = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.pt").write_text("not a tensor\n")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(torch.ones(4, 8, dtype=torch.int32), legacy / "old.pt", _use_new_zipfile_serialization=False)
    holder = tmp_path / "holder"
    holder.mkdir()
    torch.save({"ids": torch.ones(4, 8, dtype=torch.int32)}, holder / "dict.pt")
    cases = [
        (f"s3://no-such-bucket-{os.getpid()}/web", ["bucket", "does not exist", "no-such-bucket"]),
        (f"s3://{BUCKET}/nothing-here", ["holds no .pt files", f"s3://{BUCKET}/nothing-here"]),
        (aws.upload(junk, "junk"), ["not a PyTorch file", f"s3://{BUCKET}/junk/notes.pt"]),
        (aws.upload(legacy, "legacy"), ["legacy", "read in place", f"s3://{BUCKET}/legacy/old.pt"]),
        (aws.upload(holder, "holder"), ["holds a dict, not a tensor", f"s3://{BUCKET}/holder/dict.pt"]),
        ("foo://x/y", ["protocol foo://", "foo://x/y"]),
        ("s3://Not_A_Bucket!/web", ["refused the request", "Invalid bucket name", "check the URL"]),
    ]

    def fails(url: str, words: list[str]) -> None:
        rc, out = train(capsys, config(tmp_path, max_steps=6), ckpt, "--data_dir", url, "--load_checkpoint", "latest")
        message = one_sentence(out)
        assert rc == 2 and all(w in message for w in words), message
        assert aws.secret not in out
        assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == kept

    for url, words in cases:
        fails(url, words)
    # Credentials the server refuses: a wrong secret, an unknown key.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    fails(data["web_url"], ["refused the credentials", "AWS_ACCESS_KEY_ID", data["web_url"]])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN")
    fails(data["web_url"], ["refused the credentials", data["web_url"]])
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    fails(data["web_url"], ["no credentials were found", "AWS_ACCESS_KEY_ID", data["web_url"]])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", aws.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws.secret)
    # Credentials in the URL are refused without repeating them.
    rc, out = train(capsys, config(tmp_path), ckpt, "--data_dir", f"s3://{aws.key}:{aws.secret}@{BUCKET}/corpus/web")
    assert rc == 2 and "credentials in its URL" in one_sentence(out) and aws.secret not in out
    # A protocol whose library is an extra that is not installed.
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    fails("gs://some-bucket/web", ["needs the gcsfs package", "[gcs]"])
    monkeypatch.setitem(sys.modules, "s3fs", None)
    fails(data["web_url"], ["needs the s3fs package", "[s3]"])


def test_a_server_that_stops_mid_run_ends_in_a_sentence_with_the_last_step_saved(tmp_path):
    server = Moto(tmp_path / "moto.log")
    try:
        url = server.upload(make_shards(tmp_path / "data", files=4, rows=48, width=32), "web")
        cfg = config(tmp_path, {"shuffle_files": 1}, max_steps=5000)
        ckpt = tmp_path / "ckpt"
        env = {**os.environ, **server.env(), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
               "ENCODER_TRAIN_RETRY_SECONDS": "1",  # a small retry budget: the test ends soon after the stop
               "ENCODER_TRAIN_REMOTE_CACHE_MB": "0",  # nothing kept: the run keeps reading from the server
               "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
               "AWS_EC2_METADATA_DISABLED": "true"}
        proc = subprocess.Popen([sys.executable, "-m", "encoder_train", "train", "--config_file", str(cfg),
                                 "--data_dir", url, "--tokenizer_filepath", str(make_tokenizer(tmp_path / "tok.json")),
                                 "--checkpoint_dir", str(ckpt)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=env)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            metrics = ckpt / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before the server stopped"
        server.stop()
        _, err = proc.communicate(timeout=120)
    finally:
        server.stop()
    assert proc.returncode == 2, err[-3000:]
    message = one_sentence(err)
    assert f"s3://{BUCKET}/web/" in message and "could not be read" in message and "saved in" in message, message
    saved = checkpoint.list_checkpoints(ckpt)
    assert saved and saved[-1][0] >= 3  # the finished steps were kept, though checkpoint_every is 1000
    assert checkpoint.load(saved[-1][1])["step"] == saved[-1][0]


def test_a_file_url_is_a_local_folder(capsys, tmp_path, data):
    # file:// is a local folder, read as one: the same run as its path.
    rc, out = train(capsys, config(tmp_path, max_steps=3), tmp_path / "url", "--data_dir", f"file://{data['web']}")
    assert rc == 0, out
    assert train(capsys, config(tmp_path, max_steps=3), tmp_path / "path", "--data_dir", data["web"])[0] == 0
    assert same(weights(tmp_path / "url", 3), weights(tmp_path / "path", 3))
