import os

import pytest
import torch

from encoder_train import checkpoint
from encoder_train.errors import UserError


def state(step):
    return {"model": {"w": torch.randn(3, 3)}, "step": step, "config": {"a": [1, 2]}, "rng": torch.get_rng_state()}


def test_save_load_round_trip_is_exact(tmp_path):
    s = state(7)
    path = checkpoint.save(s, tmp_path, 7)
    assert path.name == "checkpoint_00000007.pt"
    back = checkpoint.load(path)
    assert torch.equal(back["model"]["w"], s["model"]["w"]) and back["step"] == 7
    assert torch.equal(back["rng"], s["rng"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_latest_and_rotation_keep_the_newest(tmp_path):
    for step in (5, 10, 100, 20):
        checkpoint.save(state(step), tmp_path, step)
    (tmp_path / "checkpoint_notes.txt").write_text("not a checkpoint")
    assert checkpoint.latest(tmp_path).name == "checkpoint_00000100.pt"
    deleted = checkpoint.rotate(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["checkpoint_00000005.pt", "checkpoint_00000010.pt"]
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [20, 100]
    assert (tmp_path / "checkpoint_notes.txt").exists()


def test_failed_write_leaves_previous_checkpoint_and_no_partial_file(tmp_path):
    good = checkpoint.save(state(1), tmp_path, 1)
    before = good.read_bytes()

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        checkpoint.save({"model": Unsaveable(), "step": 1}, tmp_path, 1)
    assert good.read_bytes() == before
    assert os.listdir(tmp_path) == [good.name]


def test_truncated_and_foreign_checkpoints_are_user_errors(tmp_path):
    path = checkpoint.save(state(3), tmp_path, 3)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="truncated or corrupt"):
        checkpoint.load(path)
    other = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(UserError, match="not an encoder-train checkpoint"):
        checkpoint.load(other)
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")


def test_unwritable_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="not writable"):
        checkpoint.ensure_writable(blocker / "sub")
