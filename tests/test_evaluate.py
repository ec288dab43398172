import json
import math

import pytest
import torch

from conftest import MASK, PAD, make_shards
from encoder_train.batch import MaskSpec
from encoder_train.cli import main
from encoder_train.data.shards import scan_shards
from encoder_train.evaluate import eval_batches, evaluate
from encoder_train.model import MaskedLM, ModelDims

SPEC = MaskSpec(pad_id=PAD, mask_id=MASK, special_ids=(0, 1, 2, 3, 4), vocab_size=128, probability=0.15)
DIMS = ModelDims(vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                 max_position_embeddings=64, pad_id=PAD)


def test_eval_masks_are_fixed_and_cover_every_row(shard_dir):
    shards = scan_shards(shard_dir, 62)
    a, b = list(eval_batches(shards, SPEC, 10, None)), list(eval_batches(shards, SPEC, 10, None))
    assert all(torch.equal(x.labels, y.labels) for x, y in zip(a, b, strict=True))
    assert sum(x.input_ids.shape[0] for x in a) == sum(s.rows for s in shards)
    assert len(list(eval_batches(shards, SPEC, 10, 3))) == 3


def test_evaluate_is_reproducible_and_restores_mode(shard_dir):
    shards = scan_shards(shard_dir, 62)
    torch.manual_seed(0)
    model = MaskedLM(DIMS)
    model.train()
    r1 = evaluate(model, shards, SPEC, batch_size=16, device=torch.device("cpu"))
    r2 = evaluate(model, shards, SPEC, batch_size=16, device=torch.device("cpu"))
    assert r1 == r2 and model.training
    assert r1["loss"] == pytest.approx(math.log(128), abs=0.1)  # untrained: about uniform
    assert r1["perplexity"] == pytest.approx(math.exp(r1["loss"]))
    assert 0 <= r1["accuracy"] <= 1 and r1["tokens"] > 0 and r1["rows"] == 192


CONFIG = """
model: {hidden_size: 64, num_layers: 2, num_heads: 2, intermediate_size: 128, max_position_embeddings: 130}
data: {num_workers: 0}
training: {batch_size: 16, max_steps: 40, learning_rate: 3.0e-3, warmup_steps: 2, precision: fp32,
           log_interval: 10, eval_every: 20}
"""


def test_validation_during_training_and_standalone_agree(capsys, tmp_path, shard_dir, tokenizer_file):
    val = make_shards(tmp_path / "val", files=1, rows=40, seed=99)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    ckpt = tmp_path / "ckpt"
    rc = main(["train", "--config_file", str(cfg), "--data_dir", str(shard_dir), "--tokenizer_filepath",
               str(tokenizer_file), "--checkpoint_dir", str(ckpt), "--val_data_dir", str(val), "--wandb"])
    assert rc == 0
    lines = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "val_loss" in x]
    assert [x["step"] for x in evals] == [20, 40]
    assert evals[1]["val_loss"] < math.log(128) - 0.5  # well below an untrained model's ~ln(V)
    assert "val loss" in capsys.readouterr().err

    from helpers import wandb_records

    assert [h["_step"] for h in wandb_records.history(ckpt / "wandb") if "val_loss" in h] == [20, 40]

    rc = main(["evaluate", "--checkpoint", str(ckpt / "checkpoint_00000040.pt"), "--data_dir", str(val),
               "--batch_size", "16"])
    assert rc == 0
    standalone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"loss", "accuracy", "perplexity", "tokens"} <= standalone.keys()
    assert standalone["loss"] == pytest.approx(evals[1]["val_loss"], rel=1e-6)
    assert standalone["accuracy"] == evals[1]["val_accuracy"]

    rc = main(["fill-mask", "--checkpoint", str(ckpt / "checkpoint_00000040.pt"), "--top_k", "3", "w5 <mask> w7"])
    out = capsys.readouterr().out
    assert rc == 0 and "mask 1:" in out
    probs = [float(x) for x in out.split("mask 1:")[1].split()[1::2]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6


def test_fill_mask_without_a_mask_is_a_user_error(capsys, tmp_path, shard_dir, tokenizer_file):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.replace("max_steps: 40", "max_steps: 2"))
    ckpt = tmp_path / "ckpt"
    main(["train", "--config_file", str(cfg), "--data_dir", str(shard_dir), "--tokenizer_filepath",
          str(tokenizer_file), "--checkpoint_dir", str(ckpt)])
    capsys.readouterr()
    rc = main(["fill-mask", "--checkpoint", str(ckpt / "checkpoint_00000002.pt"), "no mask here"])
    assert rc == 2 and "has no <mask>" in capsys.readouterr().err
