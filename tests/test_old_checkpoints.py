"""Checkpoints written by an earlier encoder-train (tests/fixtures/checkpoints_v1, made at commit 16f0a8d: a RoBERTa
single file, a RoBERTa sharded folder, a ModernBERT single file trained with Muon) still load, resume and export.
The fixtures are never regenerated: they stand for the checkpoints users already hold."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_shards
from encoder_train import checkpoint
from encoder_train.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints_v1"
KINDS = {"single": "checkpoint_00000004.pt", "sharded": "checkpoint_00000004",
         "modernbert": "checkpoint_00000004.pt"}


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """A copy of the fixtures beside the data they were trained on (2 shards of 32 rows of 16 tokens, seed 0)."""
    root = tmp_path / "old"
    shutil.copytree(FIXTURES, root)
    make_shards(root / "data", files=2, rows=32, width=16)
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_old_checkpoint_resumes(old: Path, kind: str, capsys):
    before = checkpoint.load(old / kind / KINDS[kind], flag="--checkpoint")
    assert before["step"] == 4
    rc = main(["train", "--config_file", str(old / f"{kind}.yaml"), "--data_dir", str(old / "data"),
               "--tokenizer_filepath", str(old / "tokenizer.json"), "--checkpoint_dir", str(old / kind),
               "--load_checkpoint", "latest", "--set", "training.max_steps=6", "--checkpoint_every", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"{KINDS[kind]} at step 4" in out and "done: step 6" in out  # resumed, not begun again
    after = checkpoint.load(old / kind / KINDS[kind].replace("04", "06"), flag="--checkpoint")
    assert after["step"] == 6
    moved = [k for k, w in before["model"].items() if not torch.equal(w, after["model"][k])]
    assert moved, "two more steps changed no weight"
    assert checkpoint.load(old / kind / KINDS[kind], flag="--checkpoint")["step"] == 4  # nothing overwritten


@pytest.mark.parametrize("kind", ["single", "modernbert"])
def test_old_checkpoint_exports(old: Path, kind: str, tmp_path: Path):
    pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(old / kind / KINDS[kind]), "--output_dir", str(out)]) == 0
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
