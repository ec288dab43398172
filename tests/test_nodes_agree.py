"""Processes that must agree: the plan a run starts with holds when it resumes with other rows per step (another
world size or batch_size), and nodes started with different configs or data are refused at start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from encoder_train.config import load_config
from encoder_train.data.mixture import scan_sources
from encoder_train.phases import Plan
from test_recipes import recipe, records, run

# Sources of the recipe helper: web rows of 32 slots at weight 3, code rows of 48 at weight 1: a row's expected
# slots are 0.75 x 32 + 0.25 x 48 = 36 (exact in floating point), so 4 rows per step read 144 slots.
TOKENS_PHASES = [{"name": "a", "tokens": 6 * 144}, {"name": "b", "tokens": 8 * 144}]


def phases_by_step(ckpt: Path) -> list[str]:
    return [r["phase"] for r in records(ckpt) if "loss" in r]


# ---- the plan holds across resumes ---------------------------------------------------------------------------


def test_phase_lengths_in_tokens_hold_across_a_resume_with_other_rows_per_step(tmp_path):
    """At 1 process of 4 rows with a batch warmup (2, 2, 3, then 4 rows: 72, 72, 108, then 144 slots a step) phase
    a's 684 slots take 6 steps. Resumed after 2 steps (144 slots) at 2 processes, the rest is 108 x 2 = 216, then
    288 a step: 144 + 216 + 2 x 288 >= 684 ends it after 5 steps. Resumed again after 4 (648 slots) at 1 process,
    its last 36 slots take one step of 144: still 5. Phase b starts after a, at the rows of the run."""
    path = recipe(tmp_path, phases=[
        {"name": "a", "tokens": 684, "training": {"batch_size_start": 2, "batch_size_warmup_steps": 3}},
        {"name": "b", "tokens": 8 * 144}])
    config = load_config(path)
    sources = scan_sources(config.data, 128)
    one = Plan(config, sources, 1)
    assert [(p.start, p.steps) for p in one.phases] == [(0, 6), (6, 8)]
    assert one.progress(2)["phases"][0] == {"name": "a", "steps": 2, "length": 6, "slots": 144.0}

    two = Plan(config, sources, 2, one.progress(2))
    assert [(p.start, p.steps) for p in two.phases] == [(0, 5), (5, 4)]  # b: 1152 slots at 288 a step
    assert two.progress(4)["phases"][0]["slots"] == 648.0
    again = Plan(config, sources, 1, two.progress(4))
    assert [(p.start, p.steps) for p in again.phases] == [(0, 5), (5, 8)]
    # A phase that had ended keeps its steps; the one in progress trains its remaining slots.
    later = Plan(config, sources, 2, one.progress(8))
    assert [(p.start, p.steps) for p in later.phases] == [(0, 6), (6, 5)]  # 2 x 144 done, 864 left at 288
    assert Plan(config, sources, 1, one.progress(8)).phases[1].steps == 8  # the same rows: the same plan


def test_a_resume_with_another_batch_size_trains_the_rest_of_the_phase_in_tokens(tmp_path, capsys):
    """Phases of 6 x 144 and 8 x 144 slots at 4 rows a step: 14 steps. Stopped 2 steps into phase b and resumed at 8
    rows a step (288 slots), b's remaining 864 slots take 3 steps: the run ends after 6 + 5 = 11, phase b complete
    there. (Recomputing the plan from step 0 at 8 rows would make it 3 + 4 = 7 steps, already past.)"""
    path = recipe(tmp_path, phases=TOKENS_PHASES)
    assert run(path, "--max_steps", "8") == 0
    assert run(path, "--load_checkpoint", "latest", "--batch_size", "8") == 0
    out = capsys.readouterr()
    assert phases_by_step(tmp_path / "ckpt") == ["a"] * 6 + ["b"] * 5
    assert "step 11: phase b complete" in out.err
    last = torch.load(tmp_path / "ckpt/checkpoint_00000011.pt", weights_only=True)
    assert last["plan"]["phases"][1] == {"name": "b", "steps": 5, "length": 5, "slots": 8 * 144.0}
    rows = sum(last["data"]["stream"]["rows"].values())
    assert rows == 8 * 4 + 3 * 8  # 8 steps of 4 rows, then 3 of 8


def torchrun(*args: str, check: bool = True, nproc: int = 2) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                        *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_a_two_process_run_resumed_by_one_keeps_its_plan_and_says_what_changed(tmp_path, capsys):
    """2 processes x 4 rows read 288 slots a step: phase a takes 3 steps, b 4. Stopped 1 step into b, then resumed by
    one process: with 8 rows, the same rows a step, so the same plan and no word of rows changing; with 4 rows,
    b's remaining 864 slots take 6 steps of 144."""
    path = recipe(tmp_path, phases=TOKENS_PHASES)
    torchrun("-m", "encoder_train", "train", "--config_file", str(path), "--max_steps", "4")
    kept = tmp_path / "kept"
    shutil.copytree(tmp_path / "ckpt", kept)
    capsys.readouterr()

    assert run(path, "--load_checkpoint", "latest", "--checkpoint_dir", str(kept), "--batch_size", "8") == 0
    out = capsys.readouterr().out
    assert "resuming 2 processes' run with 1" in out and "each step still takes 8 rows" in out
    assert "different number of rows" not in out
    assert phases_by_step(kept) == ["a"] * 3 + ["b"] * 4

    assert run(path, "--load_checkpoint", "latest") == 0
    out = capsys.readouterr().out
    assert "each step now takes a different number of rows (8 rows -> 4 rows)" in out
    assert phases_by_step(tmp_path / "ckpt") == ["a"] * 3 + ["b"] * 7
