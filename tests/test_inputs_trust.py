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
from encoder_train.textfiles import iter_texts
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
    from encoder_train.textfiles import MAX_LINE_CHARS

    said = bounded_read(zstd_bomb(tmp_path / f"bomb{suffix}", b"a"), 1)
    assert said == (f"refused: {tmp_path / f'bomb{suffix}'} line 1 is longer than {MAX_LINE_CHARS:,} characters "
                    "(the most one line may hold); break it into lines, or split its document into several."), said


def test_a_zstd_bomb_of_short_lines_streams_within_bounded_memory(tmp_path):
    # 40 million lines of 100 characters; the first 50 documents (of 1 M characters each) need 50 MB of text.
    assert bounded_read(zstd_bomb(tmp_path / "lines.txt.zst", b"x" * 99 + b"\n"), 50) == "read 50 documents"


def test_a_gzip_bomb_of_one_line_is_refused_within_bounded_memory(tmp_path):
    said = bounded_read(gzip_bomb(tmp_path / "bomb.txt.gz", b"a", total=80 << 20), 1)
    assert said.startswith("refused: ") and "line 1 is longer than" in said, said


def test_a_line_of_exactly_the_limit_is_read(tmp_path, monkeypatch):
    from encoder_train import textfiles

    monkeypatch.setattr(textfiles, "MAX_LINE_CHARS", 20)
    (tmp_path / "ok.txt").write_text("x" * 20 + "\r\n" + "y" * 20 + "\n\n" + "z" * 20)
    assert list(textfiles.iter_texts([tmp_path / "ok.txt"])) == ["x" * 20 + "\n" + "y" * 20, "z" * 20]
    (tmp_path / "long.jsonl").write_text('{"text": "a"}\n' * 3 + '{"text": "one too long"}\n')
    with pytest.raises(UserError, match=r"long.jsonl line 4 is longer than 20 characters"):
        list(textfiles.iter_texts([tmp_path / "long.jsonl"]))


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
    from encoder_train.textfiles import iter_texts

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


# ---- URLs where paths are taken, and the secrets in them ---------------------------------------------------------

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYSECRET"
URL = f"s3://AKIAEXAMPLEKEY:{SECRET}@bucket/ck"
SHOWN = "s3://***@bucket/ck"


def shows_no_secret(text: str) -> bool:
    """Not the secret, nor a piece of it (a message cut short must not show half of one)."""
    return not any(SECRET[i : i + 8] in text for i in range(len(SECRET) - 7)) and "AKIAEXAMPLEKEY" not in text


# Every flag that takes a path, by subcommand: `local` refuses a URL, `data` (a data folder) reads one.
LOCAL = {
    "train": ["--config_file", "--config_dir", "--tokenizer_filepath", "--checkpoint_dir", "--init_from_hf",
              "--load_checkpoint"],
    "evaluate": ["--checkpoint"],
    "fill-mask": ["--checkpoint", "--tokenizer_filepath"],
    "tokenizer": ["--output"],
    "pretokenize": ["--tokenizer_filepath", "--config_file"],
    "demo": ["--workdir"],
    "export": ["--checkpoint", "--output_dir"],
    "consolidate": ["--checkpoint", "--output"],
    "finetune": ["--checkpoint", "--init_from_hf", "--train_file", "--validation_file", "--test_file", "--output_dir"],
    "glue": ["--checkpoint", "--init_from_hf", "--data_dir", "--output_dir"],
    "export-classifier": ["--checkpoint", "--output_dir"],
    "eval": ["--output_dir"],
    "eval-data": ["--output_dir"],
}
DATA = {"train": ["--data_dir", "--val_data_dir"], "evaluate": ["--data_dir"], "tokenizer": ["--input"],
        "pretokenize": ["--input", "--output_dir"]}
FLAGS = [(c, f, kind) for kind, table in (("local", LOCAL), ("data", DATA)) for c, fs in table.items() for f in fs]
PATH_NAMES = ("_dir", "_file", "_filepath", "checkpoint", "input", "output", "workdir", "init_from_hf")
NOT_PATHS = {("pretokenize", "--on_bad_input")}  # named like a path, takes a choice


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from encoder_train.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors exit from inside parse_args
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_the_table_holds_every_path_flag():
    """A new flag whose name says it takes a path must be in the table above (and so be checked)."""
    from encoder_train.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    found = {(name, action.option_strings[0]) for name, parser in sub.choices.items() for action in parser._actions
             if action.option_strings and action.dest.endswith(PATH_NAMES)}
    assert found - NOT_PATHS == {(c, f) for c, f, _ in FLAGS}


@pytest.mark.parametrize(("command", "flag", "kind"), FLAGS, ids=[f"{c}{f}" for c, f, _ in FLAGS])
def test_a_url_where_a_path_is_taken_is_refused_without_its_secret(tmp_path, monkeypatch, capsys, command, flag,
                                                                   kind):
    monkeypatch.chdir(tmp_path)
    rc, out = run_cli([command, flag, URL], capsys)
    line = one_sentence(out)
    assert rc == 2 and SHOWN in line and shows_no_secret(out), out
    assert ("is a URL, but this takes a local path" if kind == "local" else "carries credentials in its URL") in line
    assert list(tmp_path.iterdir()) == []  # no folder named `s3:`


@pytest.mark.parametrize("flag", ["--checkpoint_dir", "--tokenizer_filepath", "--load_checkpoint", "--init_from_hf"])
def test_a_plain_url_where_a_path_is_taken_is_refused(tmp_path, monkeypatch, capsys, flag):
    monkeypatch.chdir(tmp_path)
    rc, out = run_cli(["train", "--config_file", "tiny.yaml", flag, "gs://bucket/x"], capsys)
    assert rc == 2 and "gs://bucket/x is a URL, but this takes a local path" in one_sentence(out)
    rc, out = run_cli(["train", "--config_file", "tiny.yaml", flag, "file:///srv/x"], capsys)
    assert rc == 2 and "write it as /srv/x" in one_sentence(out)
    assert list(tmp_path.iterdir()) == []


CONFIG_CASES = {
    "checkpoint": ({"checkpoint": {"checkpoint_dir": URL}}, "checkpoint.checkpoint_dir", "is a URL"),
    "resume": ({"checkpoint": {"load_checkpoint": URL}}, "checkpoint.load_checkpoint", "is a URL"),
    "tokenizer": ({"data": {"tokenizer_filepath": URL}}, "data.tokenizer_filepath", "is a URL"),
    "init": ({"model": {"init_from_hf": URL}}, "model.init_from_hf", "is a URL"),
    "data": ({"data": {"data_dir": URL}}, "data.data_dir", "credentials in its URL"),
    "in_a_list": ({"data": {"data_dir": [URL]}}, "data.data_dir", "valid string"),
    "long_in_a_list": ({"data": {"data_dir": [URL.replace("bucket", "b" * 80)]}}, "data.data_dir", "valid string"),
    "source": ({"data": {"sources": {"web": {"data_dir": "s3://b/x", "val_data_dir": URL}}}},
               "data.sources.web.val_data_dir", "credentials in its URL"),
    "query": ({"data": {"val_data_dir": f"https://host/val?X-Amz-Signature={SECRET}&X-Amz-Date=1"}},
              "data.val_data_dir", "X-Amz-Signature=***&X-Amz-Date=1"),
    "token": ({"data": {"data_dir": f"hf://datasets/org/x?token={SECRET}"}}, "data.data_dir", "token=***"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_a_url_in_the_config_file_is_refused_without_its_secret(tmp_path, monkeypatch, capsys, case):
    import yaml

    body, key, words = CONFIG_CASES[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(body))
    rc, out = run_cli(["train", "--config_file", "c.yaml"], capsys)
    line = one_sentence(out)
    assert rc == 2 and key in line and words in line and shows_no_secret(out), out
    assert not (tmp_path / "s3:").exists()


def test_a_url_set_with_set_is_refused_without_its_secret(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out = run_cli(["train", "--config_file", "tiny.yaml", "--set", f"checkpoint.checkpoint_dir={URL}"], capsys)
    assert rc == 2 and SHOWN in one_sentence(out) and shows_no_secret(out)


def test_redact_hides_credentials_and_keeps_paths():
    from encoder_train.urls import redact

    assert redact(f"data file {URL}/x.pt, and 's3://KEY@b/y'") == f"data file {SHOWN}/x.pt, and 's3://***@b/y'"
    assert redact("https://h/x?token=abc&page=2&api_key=k;sig=s") == "https://h/x?token=***&page=2&api_key=***;sig=***"
    for kept in ("s3://bucket/a@b.pt", "s3://bucket/k:v/x.pt", "/data/user@host:8/x", "gs://b/x?page=2"):
        assert redact(kept) == kept
    error = UserError(f"cannot read {URL}")
    assert str(error) == f"cannot read {SHOWN}"
    import pickle  # a loader worker's error crosses to the training process pickled

    assert str(pickle.loads(pickle.dumps(error))) == f"cannot read {SHOWN}"


# ---- settings and places that were tracebacks --------------------------------------------------------------------


def test_an_unreachable_hub_is_retried_then_one_sentence(tmp_path):
    """huggingface_hub's own client (httpx2 in hub 1.x and later, requests before) wraps the refused connection in
    its library's error class: it is retried as any network error is, then named in one sentence."""
    import os
    import subprocess

    from conftest import make_tokenizer
    from helpers.launch import free_port

    pytest.importorskip("huggingface_hub")
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "ENCODER_TRAIN_RETRY_SECONDS": "1",
           "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_TOKEN", None)
    url = "hf://datasets/someone/corpus/train"
    done = subprocess.run(["encoder-train", "train", "--config_file", "tiny.yaml", "--data_dir", url,
                           "--tokenizer_filepath", str(make_tokenizer(tmp_path / "tok.json")),
                           "--checkpoint_dir", str(tmp_path / "ckpt")],
                          env=env, capture_output=True, text=True, timeout=300)
    line = one_sentence(done.stderr)
    assert done.returncode == 2 and f"data folder {url} could not be read" in line, done.stderr[-3000:]
    assert "ENCODER_TRAIN_RETRY_SECONDS" in line


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400", "-1", "lots", "0x10"])
@pytest.mark.parametrize("variable", ["ENCODER_TRAIN_REMOTE_CACHE_MB", "ENCODER_TRAIN_RETRY_SECONDS"])
def test_a_storage_setting_that_is_not_a_finite_number_is_one_sentence(monkeypatch, variable, value):
    from encoder_train.data.blocks import cache_budget
    from encoder_train.data.store import retry_seconds

    monkeypatch.setenv(variable, value)
    read = cache_budget if variable.endswith("_MB") else retry_seconds
    with pytest.raises(UserError, match=rf"^{variable}='{value}' is not a finite number of \w+ >= 0; set e\.g\. "):
        read()


def test_storage_settings_that_are_numbers_are_read(monkeypatch):
    from encoder_train.data.blocks import cache_budget
    from encoder_train.data.store import retry_seconds

    monkeypatch.setenv("ENCODER_TRAIN_REMOTE_CACHE_MB", " 1.5 ")
    monkeypatch.setenv("ENCODER_TRAIN_RETRY_SECONDS", "0")
    assert (cache_budget(), retry_seconds()) == (3 << 19, 0.0)
    monkeypatch.setenv("ENCODER_TRAIN_REMOTE_CACHE_MB", "")
    assert cache_budget() == 512 << 20


@pytest.mark.parametrize(("sink", "folder"), [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_dangling_link_where_a_sink_writes_is_one_sentence(tmp_path, monkeypatch, sink, folder):
    from encoder_train.tracking import Tracker, TrackerSettings

    monkeypatch.delenv("WANDB_DIR", raising=False)
    (tmp_path / folder).symlink_to(tmp_path / "unmounted" / "disk")
    settings = TrackerSettings(log_interval=1, **{sink: True})
    with pytest.raises(UserError, match=rf"--{sink} writes into \S*{folder}, a symbolic link to \S*unmounted/disk, "
                                        "which does not exist; create that folder, remove the link"):
        Tracker(directory=tmp_path, total_steps=3, start_step=0, fresh=True, settings=settings)
    assert (tmp_path / folder).is_symlink() and not (tmp_path / "unmounted").exists()  # nothing made or removed


def test_consolidate_makes_the_folder_of_its_output(tmp_path, capsys):
    from conftest import make_shards, make_tokenizer
    from encoder_train import checkpoint
    from encoder_train.cli import main

    make_shards(tmp_path / "data", files=1, rows=16, width=16)
    (tmp_path / "c.yaml").write_text(
        "model: {hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32, max_position_embeddings: 40}\n"
        "data: {num_workers: 0}\n"
        "training: {batch_size: 4, max_steps: 2, warmup_steps: 1, precision: fp32}\n"
        "checkpoint: {format: sharded}\n")
    assert main(["train", "--config_file", str(tmp_path / "c.yaml"), "--data_dir", str(tmp_path / "data"),
                 "--tokenizer_filepath", str(make_tokenizer(tmp_path / "tok.json")),
                 "--checkpoint_dir", str(tmp_path / "ckpt")]) == 0
    folder = tmp_path / "ckpt" / "checkpoint_00000002"
    out = tmp_path / "new" / "deeper" / "step2.pt"
    assert main(["consolidate", "--checkpoint", str(folder), "--output", str(out)]) == 0
    assert checkpoint.load(out)["step"] == 2
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    assert main(["consolidate", "--checkpoint", str(folder), "--output", str(tmp_path / "afile" / "x.pt")]) == 2
    line = one_sentence(capsys.readouterr().err)
    assert "--output" in line and "cannot be created" in line and "afile" in line
