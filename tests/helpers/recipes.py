"""A two-source, three-phase recipe on tiny data, run in-process by the CLI; what its metrics.jsonl recorded."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import make_shards, make_tokenizer
from encoder_train.cli import main

MODEL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_position_embeddings": 130,
         "dropout": 0.1, "attention_dropout": 0.1}


def recipe(tmp_path: Path, **top) -> Path:
    """A two-source, three-phase recipe on tiny data (sources of different row widths)."""
    web = make_shards(tmp_path / "web", files=3, rows=40, width=32, seed=1)
    code = make_shards(tmp_path / "code", files=2, rows=30, width=48, seed=2)
    val = make_shards(tmp_path / "code-val", files=1, rows=8, width=48, seed=3)
    config = {
        "model": MODEL,
        "data": {"sources": {"web": {"data_dir": str(web), "weight": 3},
                             "code": {"data_dir": str(code), "weight": 1, "val_data_dir": str(val)}},
                 "tokenizer_filepath": str(make_tokenizer(tmp_path / "tok.json")), "mask_probability": 0.3},
        "training": {"batch_size": 4, "learning_rate": 1e-3, "precision": "fp32", "log_interval": 1,
                     "eval_every": 1000, "eval_batches": 1},
        "checkpoint": {"checkpoint_dir": str(tmp_path / "ckpt"), "checkpoint_every": 1000, "max_checkpoints": 1},
        "phases": [
            {"name": "warm", "steps": 5, "training": {"warmup_steps": 3, "batch_size_warmup_steps": 3,
                                                      "batch_size_start": 2}},
            {"name": "ext", "steps": 4, "data": {"sources": {"code": {}}, "mask_probability": 0.2}},
            {"name": "decay", "steps": 3, "data": {"mask_probability": 0.15, "mask_probability_end": 0.05},
             "training": {"schedule": "wsd", "decay_fraction": 1.0, "decay_shape": "1-sqrt"}},
        ],
    }
    for section, values in top.items():
        config[section] = values if section == "phases" else {**config.get(section, {}), **values}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(path: Path, *extra: str, capsys=None) -> int:
    return main(["train", "--config_file", str(path), *extra])


def records(ckpt_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]
