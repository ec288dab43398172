"""The `tokenizer` and `pretokenize` commands feed `train` without any hand-written glue."""

import torch

from encoder_train.cli import main
from encoder_train.data.formats.pt import load_shard
from encoder_train.data.shards import check_values, scan_shards

TEXT = "\n\n".join(
    f"Document {i} talks about topic {i % 7}: the quick brown fox jumps over the lazy dog, again and again."
    for i in range(400)
)


def test_tokenizer_then_pretokenize_then_train(capsys, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "--input", str(corpus), "--output", str(tok), "--vocab_size", "400"]) == 0
    assert main(["pretokenize", "--input", str(corpus), "--tokenizer_filepath", str(tok), "--output_dir",
                 str(tmp_path / "data"), "--seq_len", "64", "--val_fraction", "0.1", "--config_file", "tiny.yaml"]) == 0
    out = capsys.readouterr().out
    assert "fill ratio" in out
    for split in ("train", "val"):
        for shard in scan_shards(tmp_path / "data" / split, max_tokens=64):
            check_values(shard.path, load_shard(shard.path), vocab_size=400)
            assert load_shard(shard.path).dtype in (torch.int32, torch.int64)
    rc = main(["train", "--config_file", "tiny.yaml", "--data_dir", str(tmp_path / "data" / "train"),
               "--val_data_dir", str(tmp_path / "data" / "val"), "--tokenizer_filepath", str(tok),
               "--checkpoint_dir", str(tmp_path / "ck")])
    assert rc == 0 and (tmp_path / "ck" / "checkpoint_00000050.pt").exists()


def test_pretokenize_errors_exit_2(capsys, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    tok = tmp_path / "tok.json"
    main(["tokenizer", "--input", str(corpus), "--output", str(tok), "--vocab_size", "300"])
    capsys.readouterr()
    out_dir = str(tmp_path / "d")
    base = ["pretokenize", "--input", str(corpus), "--tokenizer_filepath", str(tok), "--output_dir", out_dir]
    assert main([*base, "--seq_len", "600", "--config_file", "tiny.yaml"]) == 2
    assert "seq_len" in capsys.readouterr().err
    assert main([*base, "--seq_len", "32"]) == 0
    capsys.readouterr()
    assert main([*base, "--seq_len", "32"]) == 2  # shards already there
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["tokenizer", "--input", str(empty), "--output", str(tmp_path / "t2.json")]) == 2
