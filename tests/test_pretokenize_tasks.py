"""`pretokenize` in tasks, from a bucket to a bucket (a real S3-compatible server, moto in server mode): tasks as
separate processes, one killed by SIGKILL once it has published a shard and run again; every document exactly
once; the manifest; --verify; the bad inputs; and `tokenizer` training from a bucket glob."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from encoder_train.cli import main
from helpers.raw_corpus import corpus, documents, split_documents, task_stream, token_documents, zst_jsonl
from helpers.s3 import BUCKET

SEQ = 24
RAW = f"s3://{BUCKET}/raw"
INPUTS = [f"{RAW}/**/*.jsonl.zst", f"{RAW}/**/*.parquet"]


def upload(moto, folder: Path, written: dict[str, list[str]], prefix: str) -> None:
    for rel in written:
        moto.client.upload_file(str(folder / rel), BUCKET, f"{prefix}/{rel}")


def keys(moto, prefix: str) -> dict[str, bytes]:
    """{key under prefix: bytes} of the bucket's .pt objects."""
    listed = moto.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1:]: moto.client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
            for o in listed if o["Key"].endswith(".pt")}


def command(tokenizer: Path, output: str, *extra: str, inputs=INPUTS) -> list[str]:
    return ["pretokenize", "--input", *inputs, "--tokenizer_filepath", str(tokenizer), "--output_dir", output,
            "--seq_len", str(SEQ), "--val_fraction", "0.1", *extra]


def documents_of(shards: dict[str, bytes], tasks: int) -> list[tuple[int, ...]]:
    """Every document in the shards, task by task (each task's rows put back in order)."""
    def load(folder: str, task: int) -> list[torch.Tensor]:
        return [torch.load(io.BytesIO(shards[k]), weights_only=True) for k in sorted(shards)
                if k.startswith(f"{folder}/{task:05d}-")]

    found = []
    for task in range(tasks):
        found += split_documents(task_stream(load("train", task), load("val", task), 0.1))
    return found


@pytest.fixture
def raw(tmp_path, aws):
    """Six .jsonl.zst and three Parquet files of 40 documents each, in the bucket under raw/."""
    written = corpus(tmp_path / "local", zst_files=6, parquet_files=3, docs=40)
    prefix = f"raw-{tmp_path.name}"
    upload(aws, tmp_path / "local", written, prefix)
    return {"written": written, "local": tmp_path / "local", "url": f"s3://{BUCKET}/{prefix}",
            "inputs": [f"s3://{BUCKET}/{prefix}/**/*.jsonl.zst", f"s3://{BUCKET}/{prefix}/**/*.parquet"]}


@pytest.mark.slow
def test_three_tasks_bucket_to_bucket_one_killed_and_rerun(aws, raw, tokenizer_file, tmp_path):
    out = f"s3://{BUCKET}/shards-{tmp_path.name}"
    prefix = out.split("/", 3)[3]
    # One row per shard: task 1 publishes many small objects, so it is still running when it is killed.
    base = [sys.executable, "-m", "encoder_train",
            *command(tokenizer_file, out, "--num_tasks", "3", "--rows_per_shard", "1", inputs=raw["inputs"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    victim = subprocess.Popen([*base, "--task_index", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(k.startswith("train/00001-") for k in keys(aws, prefix)):
        assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    before = {k: hashlib.sha256(v).hexdigest() for k, v in keys(aws, prefix).items() if k.startswith("train/00001-")}
    assert before

    for task in (0, 2):
        r = subprocess.run([*base, "--task_index", str(task)], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    assert "2 of 3 tasks are not done" not in r.stdout and "1 of 3 tasks are not done yet" in r.stdout
    rerun = subprocess.run([*base, "--task_index", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "all 3 tasks are done" in rerun.stdout

    shards = keys(aws, prefix)
    # The dead task's shards were rewritten under the same names, with the same bytes.
    assert {k: hashlib.sha256(shards[k]).hexdigest() for k in before} == before
    # The manifest lists exactly what is in the bucket.
    manifest = json.loads(aws.client.get_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json")["Body"].read())
    assert sorted(s["path"] for s in manifest["shards"]) == sorted(shards)
    assert all(s["sha256"] == hashlib.sha256(shards[s["path"]]).hexdigest() for s in manifest["shards"])
    assert manifest["totals"]["shards"] == len(shards) and manifest["num_tasks"] == 3
    assert aws.secret not in json.dumps(manifest)
    # Each shard names inputs of its own task, and every input is named by some shard.
    assert all(k % 3 == s["task"] for s in manifest["shards"] for k in s["inputs"])
    assert {k for s in manifest["shards"] for k in s["inputs"]} == set(range(len(raw["written"])))
    assert [i["path"] for i in manifest["inputs"]] == sorted(
        f"{raw['url']}/{rel}" for rel in raw["written"] if rel.endswith(".zst")) + sorted(
        f"{raw['url']}/{rel}" for rel in raw["written"] if rel.endswith(".parquet"))

    # Every input document's tokens appear exactly once, and they are those of a one-task local run.
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    expected = sorted(d for texts in raw["written"].values() for d in token_documents(texts, tokenizer))
    assert sorted(documents_of(shards, 3)) == expected
    local = tmp_path / "local-out"
    assert main(command(tokenizer_file, str(local), "--num_tasks", "1",
                        inputs=[str(raw["local"] / "raw/**/*.jsonl.zst"), str(raw["local"] / "raw/**/*.parquet")])) == 0
    one = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*.pt")}
    assert sorted(documents_of(one, 1)) == expected

    # A finished task run again does nothing, and says so.
    again = subprocess.run([*base, "--task_index", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "was done before" in again.stdout
    assert keys(aws, prefix) == shards


def test_verify_names_a_deleted_and_a_truncated_shard(aws, raw, tokenizer_file, tmp_path, capsys):
    out = f"s3://{BUCKET}/verify-{tmp_path.name}"
    prefix = out.split("/", 3)[3]
    for task in (0, 1):
        assert main(command(tokenizer_file, out, "--num_tasks", "2", "--task_index", str(task),
                            "--rows_per_shard", "16", inputs=raw["inputs"])) == 0
    capsys.readouterr()
    assert main(["pretokenize", "--verify", "--output_dir", out]) == 0
    assert "matches its manifest" in capsys.readouterr().out

    names = sorted(keys(aws, prefix))
    deleted, truncated = names[0], names[-1]
    aws.client.delete_object(Bucket=BUCKET, Key=f"{prefix}/{deleted}")
    body = aws.client.get_object(Bucket=BUCKET, Key=f"{prefix}/{truncated}")["Body"].read()
    aws.client.put_object(Bucket=BUCKET, Key=f"{prefix}/{truncated}", Body=body[:-100])
    assert main(["pretokenize", "--verify", "--output_dir", out]) == 2
    err = capsys.readouterr().err
    assert f"missing: {out}/{deleted}" in err and f"damaged: {out}/{truncated}" in err
    assert err.strip().splitlines()[-1].startswith("encoder-train: error:") and "1 missing, 1 damaged" in err


def test_local_tasks_verify_a_changed_byte_and_an_unlisted_shard(raw, tokenizer_file, tmp_path, capsys):
    out = tmp_path / "out"
    local = [str(raw["local"] / "raw/**/*.jsonl.zst")]
    assert main(command(tokenizer_file, str(out), "--num_tasks", "1", "--rows_per_shard", "16", inputs=local)) == 0
    shard = sorted(out.rglob("*.pt"))[0]
    data = bytearray(shard.read_bytes())
    data[-30] ^= 1
    shard.write_bytes(bytes(data))
    (out / "train" / "extra.pt").write_bytes(b"x")
    capsys.readouterr()
    assert main(["pretokenize", "--verify", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"damaged: {out}/{shard.relative_to(out).as_posix()} (its sha256 differs" in err
    assert f"unlisted: {out}/train/extra.pt" in err


def error_of(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs_and_outputs_are_one_sentence(aws, raw, tokenizer_file, tmp_path, capsys, monkeypatch):
    out = f"s3://{BUCKET}/bad-{tmp_path.name}"
    assert "matches no object" in error_of(capsys, command(tokenizer_file, out, inputs=[f"{raw['url']}/**/*.txt"]))
    assert "does not exist" in error_of(capsys, command(tokenizer_file, out, inputs=["s3://no-such-bucket/**/*.zst"]))
    assert "the bucket s3://no-such-bucket does not exist" in error_of(
        capsys, command(tokenizer_file, "s3://no-such-bucket/out", inputs=raw["inputs"]))
    assert "add --num_tasks 1" in error_of(capsys, command(tokenizer_file, str(tmp_path / "one"), "--on_bad_input",
                                                           "skip", inputs=raw["inputs"]))
    assert "outside --num_tasks 3" in error_of(
        capsys, command(tokenizer_file, out, "--num_tasks", "3", "--task_index", "3", inputs=raw["inputs"]))

    # An output that holds another run's shards (no plan of ours).
    other = tmp_path / "other"
    (other / "train").mkdir(parents=True)
    torch.save(torch.zeros(2, SEQ, dtype=torch.int32), other / "train" / "shard_00000.pt")
    assert "of another run" in error_of(capsys, command(tokenizer_file, str(other), "--num_tasks", "1",
                                                        inputs=raw["inputs"]))
    assert (other / "train" / "shard_00000.pt").exists()

    # Wrong credentials: refused in one sentence that never shows the secret.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    err = error_of(capsys, command(tokenizer_file, f"{out}-2", inputs=raw["inputs"]))
    assert "wrong-secret-value" not in err and "credentials" in err

    # No credentials at all (and no instance metadata to ask): one sentence naming what to set.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    assert "AWS_ACCESS_KEY_ID" in error_of(capsys, command(tokenizer_file, f"{out}-3", inputs=raw["inputs"]))


def test_other_settings_into_one_output_are_refused_and_nothing_is_destroyed(aws, raw, tokenizer_file, tmp_path,
                                                                              capsys):
    out = f"s3://{BUCKET}/plan-{tmp_path.name}"
    # Two task counts into one output: the second is refused, and the first one's shards stay.
    assert main(command(tokenizer_file, out, "--num_tasks", "2", "--task_index", "0", inputs=raw["inputs"])) == 0
    prefix = out.split("/", 3)[3]
    written = keys(aws, prefix)
    assert "other --num_tasks (2 recorded, 3 now)" in error_of(
        capsys, command(tokenizer_file, out, "--num_tasks", "3", "--task_index", "1", inputs=raw["inputs"]))
    assert "other the input files" in error_of(
        capsys, command(tokenizer_file, out, "--num_tasks", "2", "--task_index", "1", inputs=raw["inputs"][:1]))
    assert keys(aws, prefix) == written
    assert "other seq_len (24 recorded, 32 now)" in error_of(
        capsys, command(tokenizer_file, out, "--num_tasks", "2", "--task_index", "1", "--seq_len", "32",
                        inputs=raw["inputs"]))


def test_a_damaged_input_stops_its_task_or_is_skipped(aws, raw, tokenizer_file, tmp_path, capsys):
    # The second .jsonl.zst file, cut short: task 1 of 2 reads it.
    name = sorted(raw["written"])[1]
    data = (raw["local"] / name).read_bytes()
    prefix = raw["url"].split("/", 3)[3]
    aws.client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=data[: len(data) // 2])
    inputs = raw["inputs"][:1]
    out = f"s3://{BUCKET}/damaged-{tmp_path.name}"
    err = error_of(capsys, command(tokenizer_file, out, "--num_tasks", "2", "--task_index", "1", inputs=inputs))
    assert f"task 1: input file {raw['url']}/{name}" in err and "--on_bad_input skip" in err

    skip = f"{out}-skip"
    for task in (0, 1):
        assert main(command(tokenizer_file, skip, "--num_tasks", "2", "--task_index", str(task), "--on_bad_input",
                            "skip", inputs=inputs)) == 0
    record = json.loads(aws.client.get_object(Bucket=BUCKET, Key=f"{skip.split('/', 3)[3]}/.pretokenize/tasks/"
                                              "00001.json")["Body"].read())
    assert [s["path"] for s in record["skipped"]] == [f"{raw['url']}/{name}"]
    assert "manifest.json" in capsys.readouterr().out


def test_an_input_gone_after_listing_is_one_sentence(aws, raw):
    from encoder_train.data.inputs import expand_inputs
    from encoder_train.errors import UserError
    from encoder_train.textfiles import iter_texts

    inputs = expand_inputs(raw["inputs"][:1])
    first = str(inputs[0]).split("/", 3)[3]
    aws.client.delete_object(Bucket=BUCKET, Key=first)
    with pytest.raises(UserError, match=f"input file {inputs[0]}"):
        list(iter_texts(inputs))


def test_an_input_deleted_while_it_is_read_is_one_sentence(aws, tmp_path, monkeypatch):
    from encoder_train.data import inputs as inputs_module
    from encoder_train.errors import UserError
    from encoder_train.textfiles import iter_texts

    monkeypatch.setattr(inputs_module, "REMOTE_READ_BYTES", 1024)  # many ranged reads per file
    key = f"gone-{tmp_path.name}/big.jsonl.zst"
    aws.client.put_object(Bucket=BUCKET, Key=key, Body=zst_jsonl(documents(4000, seed=1)))  # several zstd blocks
    texts = iter_texts(inputs_module.expand_inputs([f"s3://{BUCKET}/{key}"]))
    next(texts)
    aws.client.delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(UserError) as refused:
        list(texts)
    assert str(refused.value).startswith(f"input file s3://{BUCKET}/{key} vanished while it was read (past line ")


def test_pretokenize_on_one_machine_reads_a_bucket(aws, raw, tokenizer_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(command(tokenizer_file, str(out), inputs=raw["inputs"])) == 0
    assert (out / "train" / "shard_00000.pt").exists()  # no task flags, a local output: the one-machine path
    shards = {f"{p.parent.name}/00000-{p.stem[-6:]}.pt": p.read_bytes() for p in out.rglob("*.pt")}
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    expected = sorted(d for texts in raw["written"].values() for d in token_documents(texts, tokenizer))
    assert sorted(documents_of(shards, 1)) == expected


def test_tokenizer_trains_from_a_bucket_glob(aws, raw, tmp_path, capsys):
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "--input", *raw["inputs"], "--output", str(out), "--vocab_size", "300"]) == 0
    tokenizer = Tokenizer.from_file(str(out))
    assert "Ġw" in tokenizer.get_vocab()  # merges learnt from the bucket's words: " w5 w17 ..."
    assert len(tokenizer.encode(" w1 w1 w1 w1").ids) < len(" w1 w1 w1 w1")


def test_slurm_array_variables_pick_the_task_and_progress_is_plain_lines(raw, tokenizer_file, tmp_path, capsys,
                                                                         monkeypatch):
    from encoder_train.data import tasks

    monkeypatch.setattr(tasks, "PROGRESS_SECONDS", 0.0)  # a line for every batch
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    out = tmp_path / "out"
    local = [str(raw["local"] / "raw/**/*.jsonl.zst")]
    assert main(command(tokenizer_file, str(out), "--rows_per_shard", "16", inputs=local)) == 0
    captured = capsys.readouterr()
    assert "task 1 of 2: wrote" in captured.out and "1 of 2 tasks are not done yet" in captured.out
    assert {p.name[:6] for p in out.rglob("*.pt")} == {"00001-"}
    line = captured.err.strip().splitlines()[-1]
    assert line.startswith("task 1 of 2: ") and " documents, " in line and " tokens, " in line and "MB/s" in line
    assert "ETA" in line


@pytest.mark.slow
def test_a_huge_line_in_a_small_remote_zst_is_refused_in_bounded_memory(aws, tokenizer_file, tmp_path):
    import zstandard

    # One 1 GiB line, 32 KB compressed; compressed in pieces, so this process never holds it either.
    compressor = zstandard.ZstdCompressor().compressobj()
    chunk = b"a" * (1 << 20)
    body = compressor.compress(b'{"text": "') + b"".join(compressor.compress(chunk) for _ in range(1 << 10))
    body += compressor.compress(b'"}\n') + compressor.flush()
    aws.client.put_object(Bucket=BUCKET, Key=f"bomb-{tmp_path.name}/x.jsonl.zst", Body=body)
    argv = command(tokenizer_file, str(tmp_path / "out"), inputs=[f"s3://{BUCKET}/bomb-{tmp_path.name}/x.jsonl.zst"])
    # The peak resident memory of the command's own process (VmHWM: this process image's, not the parent's).
    script = ("import sys\nfrom encoder_train.cli import main\nrc = main(sys.argv[1:])\n"
              "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\nsys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "longer than" in r.stderr, r.stderr
    peak_mb = int(r.stdout.split()[-1]) / 1024
    print(f"peak {peak_mb:.0f} MB")
    assert peak_mb < 900, peak_mb  # the line is never held whole (it would be 1,024 MB as text alone)


def test_two_first_tasks_with_different_plans_one_wins(aws, tmp_path):
    from encoder_train.data.tasks import Output

    for out in (f"s3://{BUCKET}/race-{tmp_path.name}", str(tmp_path / "race")):
        output = Output(out)
        assert output.create(".pretokenize/plan.json", b'{"num_tasks": 2}')
        assert not output.create(".pretokenize/plan.json", b'{"num_tasks": 3}')
        assert output.read_text(".pretokenize/plan.json") == '{"num_tasks": 2}'
