"""End to end: the `encoder-train train` command on generated shards, a real tokenizer, real W&B (offline)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tokenizer
from encoder_train.cli import main
from encoder_train.model import MaskedLM, ModelDims
from helpers import wandb_records

CONFIG = """
model: {hidden_size: 64, num_layers: 2, num_heads: 2, intermediate_size: 128, max_position_embeddings: 130}
data: {num_workers: 1}
training: {batch_size: 16, max_steps: 60, learning_rate: 3.0e-3, warmup_steps: 2, precision: fp32,
           log_interval: 10}
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(CONFIG)
    return p


def train(capsys, config, data, tok, ckpt, *extra) -> tuple[int, str, str]:
    rc = main(["train", "--config_file", str(config), "--data_dir", str(data), "--tokenizer_filepath", str(tok),
               "--checkpoint_dir", str(ckpt), *map(str, extra)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def metrics(ckpt: Path) -> list[dict]:
    return [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_train_end_to_end_with_wandb(capsys, config_file, shard_dir, tokenizer_file, tmp_path):
    ckpt = tmp_path / "ckpt"
    rc, out, _ = train(capsys, config_file, shard_dir, tokenizer_file, ckpt, "--checkpoint_every", 20,
                       "--max_checkpoints", 2, "--wandb", "--wandb_log_freq", 20, "--wandb_project_name", "et-test")
    assert rc == 0
    assert f"resolved config: {ckpt / 'config.yaml'}" in out and "batch_size: 16" in (ckpt / "config.yaml").read_text()

    # Loss falls; each log line has what the README promises.
    rows = metrics(ckpt)
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_second", "tokens_seen"} <= r.keys()

    # Rotation: exactly --max_checkpoints files remain, the newest ones.
    assert sorted(p.name for p in ckpt.glob("checkpoint_*.pt")) == ["checkpoint_00000040.pt", "checkpoint_00000060.pt"]
    state = torch.load(ckpt / "checkpoint_00000060.pt", weights_only=True)
    assert state["step"] == 60 and state["config"]["training"]["batch_size"] == 16
    assert state["data"]["rows_consumed"] == 60 * 16 and state["tokens_seen"] == rows[-1]["tokens_seen"]

    # The offline W&B run holds the logged metrics, every --wandb_log_freq steps, and the config.
    history = wandb_records.history(ckpt / "wandb")
    assert [h["_step"] for h in history] == [20, 40, 60]
    assert [h["loss"] for h in history] == pytest.approx([r["loss"] for r in rows if r["step"] % 20 == 0])
    assert wandb_records.run_ids(ckpt / "wandb") == {state["wandb_run_id"]}
    assert wandb_records.config(ckpt / "wandb")["training"]["learning_rate"] == 3e-3


def test_resume_continues_exactly_and_keeps_the_wandb_run(capsys, config_file, shard_dir, tokenizer_file, tmp_path):
    straight = tmp_path / "straight"
    rc, _, _ = train(capsys, config_file, shard_dir, tokenizer_file, straight, "--checkpoint_every", 20,
                     "--max_checkpoints", 5, "--wandb", "--wandb_log_freq", 10)
    assert rc == 0

    # An interrupted run: its folder holds what the straight run had written at step 40.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("checkpoint_00000020.pt", "checkpoint_00000040.pt"):
        shutil.copy(straight / name, resumed / name)
    saved = torch.load(resumed / "checkpoint_00000040.pt", weights_only=True)
    lr_at_40 = saved["optimizer"]["param_groups"][0]["lr"]
    shutil.copytree(straight / "wandb", resumed / "wandb")

    rc, out, _ = train(capsys, config_file, shard_dir, tokenizer_file, resumed, "--checkpoint_every", 20,
                       "--max_checkpoints", 5, "--load_checkpoint", "latest", "--wandb", "--wandb_log_freq", 10)
    assert rc == 0
    assert f"resuming from {resumed / 'checkpoint_00000040.pt'} at step 40 (learning rate {lr_at_40:.3e})" in out
    after = metrics(resumed)
    assert [r["step"] for r in after] == [50, 60]
    before = {r["step"]: r for r in metrics(straight)}
    assert [r["lr"] for r in after] == [before[50]["lr"], before[60]["lr"]]
    assert [r["loss"] for r in after] == [before[50]["loss"], before[60]["loss"]]

    # Same data position, masks, dropout RNG, optimizer and schedule: bit-identical weights.
    a, b = weights(straight / "checkpoint_00000060.pt"), weights(resumed / "checkpoint_00000060.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # W&B: one run, continued.
    assert wandb_records.run_ids(resumed / "wandb") == {saved["wandb_run_id"]}
    assert [h["_step"] for h in wandb_records.history(resumed / "wandb")][-2:] == [50, 60]


def test_batch_size_and_gradient_clip_flags_take_effect(capsys, config_file, shard_dir, tokenizer_file, tmp_path):
    def run(name, *flags):
        ckpt = tmp_path / name
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(CONFIG.replace("max_steps: 60", "max_steps: 3").replace("warmup_steps: 2", "warmup_steps: 0"))
        assert train(capsys, cfg, shard_dir, tokenizer_file, ckpt, *flags)[0] == 0
        return torch.load(ckpt / "checkpoint_00000003.pt", weights_only=True)

    free = run("free", "--batch_size", 4, "--gradient_clip", 0)
    clipped = run("clipped", "--batch_size", 4, "--gradient_clip", 1e-9)
    assert free["config"]["training"]["batch_size"] == 4 and free["data"]["rows_consumed"] == 3 * 4
    assert clipped["config"]["training"]["gradient_clip"] == 1e-9

    # Same init (same seed); AdamW's eps dwarfs a gradient clipped to 1e-9, so those weights barely move.
    key = "encoder.layers.0.feed_forward.up.weight"
    torch.manual_seed(0)  # the trainer seeds with training.seed (0) before building the model
    w0 = MaskedLM(ModelDims(**free["dims"])).state_dict()[key]
    moved_free = (free["model"][key] - w0).abs().max()
    moved_clipped = (clipped["model"][key] - w0).abs().max()
    assert moved_free > 1e-3 and moved_clipped < moved_free / 100


def err_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("encoder-train: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_user_errors_exit_2_with_one_sentence(capsys, config_file, shard_dir, tokenizer_file, tmp_path):
    ok = dict(config=config_file, data=shard_dir, tok=tokenizer_file, ckpt=tmp_path / "c")

    def fails(**kw) -> str:
        a = {**ok, **kw}
        rc, _, err = train(capsys, a["config"], a["data"], a["tok"], a["ckpt"])
        assert rc == 2
        return err_line(err)

    assert "config file missing.yaml" in fails(config="missing.yaml")
    assert f"data folder {tmp_path / 'none'} does not exist" in fails(data=tmp_path / "none")
    assert f"tokenizer file {tmp_path / 'tok.json'} does not exist" in fails(tok=tmp_path / "tok.json")
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    assert "not writable" in fails(ckpt=blocker / "ckpt")

    no_mask = tmp_path / "nomask.json"
    from tokenizers import Tokenizer, models

    t = Tokenizer(models.WordLevel({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4}, unk_token="<unk>"))
    t.save(str(no_mask))
    assert "has no <mask> token" in fails(tok=no_mask)

    small_vocab = tmp_path / "small.yaml"
    small_vocab.write_text(CONFIG.replace("hidden_size: 64,", "hidden_size: 64, vocab_size: 100,"))
    said = fails(config=small_vocab)
    assert "model.vocab_size (100) is smaller than the tokenizer's vocabulary (128)" in said
    assert said.startswith(f"encoder-train: error: the config with tokenizer {tokenizer_file}:"), said


def test_mismatched_checkpoint_and_occupied_folder_are_refused_and_kept(capsys, config_file, shard_dir,
                                                                         tokenizer_file, tmp_path):
    ckpt = tmp_path / "ckpt"
    short = tmp_path / "short.yaml"
    short.write_text(CONFIG.replace("max_steps: 60", "max_steps: 4"))
    assert train(capsys, short, shard_dir, tokenizer_file, ckpt)[0] == 0
    saved = ckpt / "checkpoint_00000004.pt"
    before = saved.read_bytes()

    # A fresh run into a folder holding checkpoints would overwrite them: refused.
    rc, _, err = train(capsys, short, shard_dir, tokenizer_file, ckpt)
    assert rc == 2 and "already holds checkpoints up to step 4" in err_line(err)

    wider = tmp_path / "wider.yaml"
    wider.write_text(CONFIG.replace("hidden_size: 64", "hidden_size: 96"))
    rc, _, err = train(capsys, wider, shard_dir, tokenizer_file, ckpt, "--load_checkpoint", "latest")
    assert rc == 2 and "different model shape" in err_line(err) and "hidden_size 64 vs 96" in err
    assert saved.read_bytes() == before and sorted(p.name for p in ckpt.glob("*.pt")) == [saved.name]


def test_latest_in_an_empty_folder_starts_fresh(capsys, config_file, shard_dir, tokenizer_file, tmp_path):
    short = tmp_path / "short.yaml"
    short.write_text(CONFIG.replace("max_steps: 60", "max_steps: 2"))
    rc, out, _ = train(capsys, short, shard_dir, tokenizer_file, tmp_path / "new", "--load_checkpoint", "latest")
    assert rc == 0 and "starting a fresh run" in out
    assert (tmp_path / "new" / "checkpoint_00000002.pt").exists()


def test_module_entry_point_help_and_exit_code(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "encoder_train", "train", "--help"], capture_output=True,
                               text=True, check=True).stdout
    for flag in ("--config_file", "--config_dir", "--data_dir", "--tokenizer_filepath", "--checkpoint_dir",
                 "--load_checkpoint", "--checkpoint_every", "--max_checkpoints", "--wandb", "--wandb_run_id",
                 "--wandb_log_freq", "--wandb_project_name", "--batch_size", "--gradient_clip"):
        assert flag in help_text
    tok = make_tokenizer(tmp_path / "tok.json")
    r = subprocess.run([sys.executable, "-m", "encoder_train", "train", "--config_file", "tiny.yaml", "--data_dir",
                        str(tmp_path / "absent"), "--tokenizer_filepath", str(tok)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not exist" in r.stderr


def test_without_wandb_flag_wandb_is_never_imported(tmp_path, shard_dir, tokenizer_file):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.replace("max_steps: 60", "max_steps: 2"))
    code = (
        "import sys\n"
        "from encoder_train.cli import main\n"
        f"rc = main(['train', '--config_file', {str(cfg)!r}, '--data_dir', {str(shard_dir)!r},"
        f" '--tokenizer_filepath', {str(tokenizer_file)!r}, '--checkpoint_dir', {str(tmp_path / 'ck')!r}])\n"
        "assert rc == 0, rc\n"
        "assert 'wandb' not in sys.modules, 'wandb was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / "ck" / "wandb").exists()


def test_bf16_autocast_trains_on_cpu(capsys, shard_dir, tokenizer_file, tmp_path):
    cfg = tmp_path / "bf16.yaml"
    cfg.write_text(CONFIG.replace("precision: fp32", "precision: bf16").replace("max_steps: 60", "max_steps: 20"))
    rc, out, _ = train(capsys, cfg, shard_dir, tokenizer_file, tmp_path / "ck")
    assert rc == 0 and "precision bf16" in out
    state = torch.load(tmp_path / "ck" / "checkpoint_00000020.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in state["model"].values())  # fp32 master weights
    rows = metrics(tmp_path / "ck")
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_tensorboard_event_files_hold_loss_and_learning_rate(capsys, config_file, shard_dir, tokenizer_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt = tmp_path / "ckpt"
    rc, _, err = train(capsys, config_file, shard_dir, tokenizer_file, ckpt, "--tensorboard", "--max_steps", 30,
                       "--set", "tensorboard.log_freq=5", "--checkpoint_every", 20, "--val_data_dir", shard_dir,
                       "--set", "training.eval_every=15", "--set", "training.eval_batches=1")
    assert rc == 0, err
    # A resume continues the same event log; a second process (the resume) adds its own file.
    rc, _, err = train(capsys, config_file, shard_dir, tokenizer_file, ckpt, "--tensorboard", "--max_steps", 40,
                       "--set", "tensorboard.log_freq=5", "--load_checkpoint", "latest")
    assert rc == 0, err
    events = EventAccumulator(str(ckpt / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "grad_norm", "val_loss"} <= set(events.Tags()["scalars"])
    loss = {e.step: e.value for e in events.Scalars("loss")}
    assert sorted(loss) == [5, 10, 15, 20, 25, 30, 35, 40]
    jsonl = {r["step"]: r for r in metrics(ckpt) if "loss" in r}
    for step, value in loss.items():
        assert value == pytest.approx(jsonl[step]["loss"], rel=1e-6)
    lr = {e.step: e.value for e in events.Scalars("lr")}
    assert lr[40] == pytest.approx(jsonl[40]["lr"], abs=1e-9) and lr[5] == pytest.approx(jsonl[5]["lr"], rel=1e-6)
    assert [e.step for e in events.Scalars("val_loss")] == [15, 30]


def test_checkpoints_are_written_while_training_goes_on(capsys, config_file, shard_dir, tokenizer_file, tmp_path,
                                                         monkeypatch):
    """A save hands the snapshot to a writer thread: training continues while step 5's checkpoint is written
    (the write here waits until step 8 is logged), and the run still ends with every checkpoint on disk."""
    import time

    from encoder_train import checkpoint

    ckpt, real_save, seen = tmp_path / "ckpt", checkpoint.save, {}

    def slow_save(state, directory, step):
        if step == 5:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(r["step"] >= 8 for r in metrics_or_empty(ckpt)):
                time.sleep(0.01)
            seen["steps_logged_during_write"] = max((r["step"] for r in metrics_or_empty(ckpt)), default=0)
        return real_save(state, directory, step)

    monkeypatch.setattr(checkpoint, "save", slow_save)
    rc, _, err = train(capsys, config_file, shard_dir, tokenizer_file, ckpt, "--max_steps", 12, "--checkpoint_every",
                       5, "--max_checkpoints", 5, "--set", "training.log_interval=1")
    assert rc == 0, err
    assert seen["steps_logged_during_write"] >= 8
    assert [s for s, _ in checkpoint.list_checkpoints(ckpt)] == [5, 10, 12]
    assert checkpoint.load(checkpoint.checkpoint_path(ckpt, 5))["step"] == 5


def metrics_or_empty(ckpt: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []
