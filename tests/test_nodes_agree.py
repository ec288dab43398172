"""Processes that must agree: the plan a run starts with holds when it resumes with other rows per step (another
world size or batch_size), and nodes started with different configs or data are refused at start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_shards, make_tokenizer
from encoder_train.agreement import what_must_agree
from encoder_train.config import load_config
from encoder_train.data.shards import scan_shards
from encoder_train.distributed import disagreement
from encoder_train.errors import UserError
from encoder_train.phases import Plan
from encoder_train.state import world_size_note
from encoder_train.stream import scan_sources
from encoder_train.tokenizer import load_tokenizer
from helpers.launch import CONFIG
from helpers.recipes import recipe, records, run

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
    assert one.progress(2)["phases"][0] == {"name": "a", "steps": 2, "length": 6, "slots": 144.0,
                                            "rate": [1, 36.0, 4, 2, 3]}  # micro-batches, width, rows

    two = Plan(config, sources, 2, one.progress(2))
    assert [(p.start, p.steps) for p in two.phases] == [(0, 5), (5, 4)]  # b: 1152 slots at 288 a step
    assert two.progress(4)["phases"][0]["slots"] == 648.0
    again = Plan(config, sources, 1, two.progress(4))
    assert [(p.start, p.steps) for p in again.phases] == [(0, 5), (5, 8)]
    # A phase that had ended keeps its steps; the one in progress trains its remaining slots.
    later = Plan(config, sources, 2, one.progress(8))
    assert [(p.start, p.steps) for p in later.phases] == [(0, 6), (6, 5)]  # 2 x 144 done, 864 left at 288
    assert Plan(config, sources, 1, one.progress(8)).phases[1].steps == 8  # the same rows: the same plan
    # Resumed after step 1 (72 slots) at 16 processes: 72 + 2 x 16 x 36 >= 684 would end a after 2 steps, inside
    # its 3-step batch warmup: it lasts through the warmup.
    assert Plan(config, sources, 16, one.progress(1)).phases[0].steps == 3
    with pytest.raises(UserError, match="mangled plan"):
        Plan(config, sources, 1, {"phases": [{"name": "a", "steps": "x"}]})


@pytest.mark.parametrize("world_size", [1, 3])
def test_a_resume_at_the_same_rows_per_step_keeps_the_plan_at_every_step(tmp_path, world_size):
    """Weights 7 and 3 make a row's expected slots 0.7 x 32 + 0.3 x 48 = 36.8, which floating point does not hold
    exactly, and 2,208 slots are 15 steps of 147.2: summing the slots done anew on resume would end a phase a step
    away from where the uninterrupted run ends it. A resume at the rows it began with keeps its length."""
    path = recipe(tmp_path, phases=[
        {"name": "a", "tokens": 2208, "training": {"batch_size_start": 1, "batch_size_warmup_steps": 3}},
        {"name": "b", "tokens": 736}], data={"sources": {"web": {"data_dir": str(tmp_path / "web"), "weight": 7},
                                                         "code": {"data_dir": str(tmp_path / "code"), "weight": 3}}})
    config = load_config(path)
    sources = scan_sources(config.data, 128)
    plan = Plan(config, sources, world_size)
    lengths = [(p.start, p.steps) for p in plan.phases]
    for step in range(plan.total_steps + 1):
        assert [(p.start, p.steps) for p in Plan(config, sources, world_size, plan.progress(step)).phases] == lengths


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
    assert ("phases given in tokens read their tokens at this run's rows per step: phase b now lasts 5 steps "
            "(planned: 8); the run now lasts 11 steps.") in out.out
    last = torch.load(tmp_path / "ckpt/checkpoint_00000011.pt", weights_only=True)
    assert last["plan"]["phases"][1] == {"name": "b", "steps": 5, "length": 5, "slots": 8 * 144.0,
                                         "rate": [1, 36.0, 8, 1, 0]}
    rows = sum(last["data"]["stream"]["rows"].values())
    assert rows == 8 * 4 + 3 * 8  # 8 steps of 4 rows, then 3 of 8


def test_the_world_size_note_speaks_of_rows_only_when_a_step_reads_other_rows():
    two = [{"torch": None}] * 2  # a checkpoint of 2 processes has 2 RNG states
    kept = world_size_note({"rng": two, "plan": {"step_reads": "8 rows"}}, 1, "8 rows")
    assert kept.startswith("resuming 2 processes' run with 1: the data continues from the same row and each step "
                           "still takes 8 rows, but dropout is reseeded")
    halved = world_size_note({"rng": two, "plan": {"step_reads": "8 rows"}}, 1, "4 rows")
    assert "each step now takes a different number of rows (8 rows -> 4 rows)" in halved
    # A checkpoint written before the plan was stored: its config's global batch.
    old = {"rng": two, "config": {"training": {"batch_size": 4, "gradient_accumulation_steps": 1}, "data": {}}}
    assert "still takes 8 rows" in world_size_note(old, 1, "8 rows")
    budget = {"rng": two, "config": {"training": {"gradient_accumulation_steps": 2}, "data": {"batch_tokens": 64}}}
    assert "(256 token slots -> 128 token slots)" in world_size_note(budget, 1, "128 token slots")


def torchrun(*args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=300)
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
    assert "different number of rows" not in out and "phases given in tokens" not in out  # the plan is the same
    assert phases_by_step(kept) == ["a"] * 3 + ["b"] * 4

    assert run(path, "--load_checkpoint", "latest") == 0
    out = capsys.readouterr().out
    assert "each step now takes a different number of rows (8 rows -> 4 rows)" in out
    assert "phase b now lasts 7 steps (planned: 4); the run now lasts 10 steps." in out
    assert phases_by_step(tmp_path / "ckpt") == ["a"] * 3 + ["b"] * 7


# ---- nodes started alike ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A config, a tokenizer, shards, the same shards in another folder (another mount), and other shards."""
    root = tmp_path_factory.mktemp("agree")
    data = make_shards(root / "data")
    copy = root / "mounted-elsewhere"
    shutil.copytree(data, copy)
    config = root / "config.yaml"
    config.write_text(CONFIG.replace("BATCH", "8").replace("DROPOUT", "0.1").replace("PARALLEL", "ddp"))
    return {"data": data, "copy": copy, "other": make_shards(root / "other", files=2), "config": config,
            "tok": make_tokenizer(root / "tok.json")}


def agreed(inputs, folder: Path | None = None, restart: frozenset = frozenset(), **sections) -> dict[str, str]:
    """what_must_agree of the inputs' config with `sections` merged in, reading the shards in `folder`."""
    raw = yaml.safe_load(inputs["config"].read_text())
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    raw["data"] = {"data_dir": str(folder or inputs["data"]), "tokenizer_filepath": str(inputs["tok"]), **raw["data"]}
    path = inputs["config"].parent / f"variant-{len(sections)}-{hash(repr(sections))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    val = scan_shards(config.data.val_data_dir, 128) if config.data.val_data_dir else None
    tokenizer = load_tokenizer(str(inputs["tok"]))
    return what_must_agree(config, scan_sources(config.data, 128), val, tokenizer, set(restart))


def test_what_may_differ_between_nodes_does_not_count(inputs):
    """Per-node things: the data at another path with the same files, the loader's workers, the checkpoint folder."""
    assert agreed(inputs) == agreed(inputs, inputs["copy"]) == agreed(
        inputs, inputs["copy"], data={"num_workers": 3, "prefetch_batches": 7},
        checkpoint={"checkpoint_dir": "/elsewhere"})


@pytest.mark.parametrize("change, first, values", [
    ({"training": {"batch_size": 4}}, "training.batch_size", ("8", "4")),
    ({"training": {"stop_at": 5}}, "training.stop_at", ("not set", "5")),
    ({"model": {"hidden_size": 64, "num_heads": 4}}, "model.hidden_size", ("32", "64")),
    ({"data_dir": "other"}, "the data of --data_dir", ("3 shards, 192 rows", "2 shards, 128 rows")),
    ({"restart": frozenset({"data_dir"})}, "--restart_source", ("none", "data_dir")),
])
def test_the_first_difference_is_named_with_each_value_rank_and_host(inputs, change, first, values):
    kwargs = dict(change)
    if "data_dir" in kwargs:
        kwargs = {"folder": inputs[kwargs.pop("data_dir")]}
    same, other = agreed(inputs), agreed(inputs, **kwargs)
    assert same != other
    message = disagreement([(same, "node-a"), (same, "node-a"), (other, "node-b"), (other, "node-b")])
    assert message.startswith("the processes of this run were started with different settings or data: "
                              f"{first} is {values[0]}")
    assert f" on rank 0 (host node-a) but {values[1]}" in message and " on ranks 2, 3 (host node-b)" in message
    assert message.endswith("start every node with the same config, flags and data (only the folders' paths may "
                            "differ between nodes).")
    assert "\n" not in message


def test_a_source_read_from_another_mount_agrees(inputs, tmp_path):
    """A source's folders are per node, whatever its name (dots included)."""
    def sources(folder: Path) -> dict:
        return {"data_dir": None, "sources": {"en.wiki": {"data_dir": str(folder), "val_data_dir": str(folder)}}}
    assert agreed(inputs, data=sources(inputs["data"])) == agreed(inputs, data=sources(inputs["copy"]))


def test_other_sources_are_named_before_their_settings(inputs, tmp_path):
    web, code = make_shards(tmp_path / "web"), make_shards(tmp_path / "code", files=1)
    two = agreed(inputs, data={"data_dir": None, "sources": {"web": {"data_dir": str(web)},
                                                             "code": {"data_dir": str(code)}}})
    one = agreed(inputs, data={"data_dir": None, "sources": {"web": {"data_dir": str(code)}}})
    message = disagreement([(two, "a"), (one, "b")])
    assert "the list of sources is code, web on rank 0 (host a) but web on rank 1 (host b) (also " in message, message
    assert "the data of data.sources.web.data_dir" in message


def launch_two(inputs, tmp_path: Path, rank1: list[str], config: Path | None = None) -> subprocess.CompletedProcess:
    """One torchrun of 2 processes whose rank 1 gets `rank1` appended to its command line (the last flag wins): two
    processes started differently, as two nodes would be. `config`: a file with data.sources, in place of the
    inputs' config and --data_dir."""
    wrapper = tmp_path / "rank1_differs.py"
    wrapper.write_text("import json, os, sys\nfrom encoder_train.cli import main\n"
                       "extra = json.loads(os.environ['RANK1_ARGS']) if os.environ['RANK'] == '1' else []\n"
                       "sys.exit(main(sys.argv[1:] + extra))\n")
    data = ["--config_file", str(config)] if config else ["--config_file", str(inputs["config"]), "--data_dir",
                                                            str(inputs["data"])]
    return torchrun(str(wrapper), "train", *data, "--tokenizer_filepath", str(inputs["tok"]), "--checkpoint_dir",
                    str(tmp_path / "ckpt"), "--max_steps", "2", check=False, RANK1_ARGS=json.dumps(rank1))


def assert_refused(r: subprocess.CompletedProcess, words: str, ckpt: Path) -> None:
    """Every rank exits 2 with the one sentence, no traceback, no abort; nothing is written."""
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if "encoder-train: error:" in line]
    # Both ranks refuse; torchrun stops the other once the first has exited, so one line may be all it printed.
    assert lines and {line[:9] for line in lines} <= {"[rank 0] ", "[rank 1] "}, r.stderr[-3000:]
    assert all(words in line and "start every node with the same config" in line for line in lines), lines
    assert "exitcode: 2" in r.stderr and "SIGABRT" not in r.stderr and "EnforceNotMet" not in r.stderr
    assert "[rank0]: Traceback" not in r.stderr and "[rank1]: Traceback" not in r.stderr  # only torchrun's own
    assert not list(ckpt.glob("checkpoint_*"))


def test_a_process_started_with_another_batch_size_is_refused(inputs, tmp_path):
    r = launch_two(inputs, tmp_path, ["--batch_size", "4"])
    assert_refused(r, "training.batch_size is 8 on rank 0 (host ", tmp_path / "ckpt")
    assert "but 4 on rank 1 (host " in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("rank1, words", [
    (["--data_dir", "OTHER"], "the data of --data_dir is 3 shards, 192 rows of up to 32 tokens"),
    (["--config_file", "WIDE"], "model.hidden_size is 32 on rank 0"),
    (["--set", "training.stop_at=1"], "training.stop_at is not set on rank 0"),
    (["--config_file", "ONE_SOURCE"], "the list of sources is code, web on rank 0 (host "),
])
def test_processes_started_with_other_data_shape_stop_or_sources_are_refused(inputs, tmp_path, rank1, words):
    raw = yaml.safe_load(inputs["config"].read_text())
    files = {name: tmp_path / f"{name}.yaml" for name in ("WIDE", "TWO_SOURCES", "ONE_SOURCE")}
    files["WIDE"].write_text(yaml.safe_dump({**raw, "model": {**raw["model"], "hidden_size": 64}}))
    web, code = {"data_dir": str(inputs["data"])}, {"data_dir": str(inputs["other"])}
    files["TWO_SOURCES"].write_text(yaml.safe_dump({**raw, "data": {**raw["data"], "sources": {"web": web,
                                                                                               "code": code}}}))
    files["ONE_SOURCE"].write_text(yaml.safe_dump({**raw, "data": {**raw["data"], "sources": {"web": web}}}))
    names = {"OTHER": inputs["other"], **files}
    sources = files["TWO_SOURCES"] if "ONE_SOURCE" in rank1 else None  # both read sources, rank 1 one fewer
    r = launch_two(inputs, tmp_path, [str(names.get(a, a)) for a in rank1], sources)
    assert_refused(r, words, tmp_path / "ckpt")


@pytest.mark.slow
def test_processes_reading_the_same_files_at_other_paths_train(inputs, tmp_path):
    r = launch_two(inputs, tmp_path, ["--data_dir", str(inputs["copy"]), "--set", "data.num_workers=0"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "ckpt" / "checkpoint_00000002.pt").exists()
