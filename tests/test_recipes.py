"""Pretraining recipes: data sources mixed by weight or temperature, phases, batch-size warmup and mask-rate
schedules; exact resume in every phase; changed sources on resume; the plan; the shipped recipes' tiny twins."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_shards, make_tokenizer
from encoder_train.cli import main
from encoder_train.config import BUNDLED_CONFIG_DIR, load_config
from encoder_train.data.mixture import SINGLE, MixedBatches, Source, draw_counts
from encoder_train.data.shards import scan_shards
from encoder_train.phases import Plan
from helpers.recipes import MODEL, recipe, records, run


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True)["model"]


# ---- mixtures -------------------------------------------------------------------------------------------


def test_draws_follow_the_weights_within_sampling_noise_and_repeat_exactly():
    w = [0.6, 0.3, 0.1]
    counts = [draw_counts(w, 32, seed=7, g=g) for g in range(2000)]
    assert all(sum(c) == 32 for c in counts)
    total = torch.tensor(counts).sum(0).double() / (2000 * 32)
    n = 2000 * 32
    for share, p in zip(total.tolist(), w, strict=True):
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n)  # four standard deviations
    assert counts == [draw_counts(w, 32, seed=7, g=g) for g in range(2000)]  # deterministic
    assert counts != [draw_counts(w, 32, seed=8, g=g) for g in range(2000)]  # the seed matters


def test_temperature_weights_follow_size_to_the_power(tmp_path):
    a = make_shards(tmp_path / "a", files=1, rows=80, width=32)
    b = make_shards(tmp_path / "b", files=1, rows=10, width=32)
    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump({"model": MODEL, "data": {
        "sources": {"a": {"data_dir": str(a)}, "b": {"data_dir": str(b)}}, "temperature": 0.5}}))
    config = load_config(cfg)
    sources = [Source(n, scan_shards(d, 128), None, d) for n, d in (("a", str(a)), ("b", str(b)))]
    plan = Plan(config, sources, 1)
    ratio = plan.phases[0].weights[0] / plan.phases[0].weights[1]
    assert ratio == pytest.approx(8 ** 0.5)


def test_each_source_restarts_its_own_epoch_and_batches_hold_rows_of_different_widths(tmp_path, tokenizer_file):
    big = Source("big", scan_shards(make_shards(tmp_path / "big", files=2, rows=50, width=48, seed=1), 128))
    small = Source("small", scan_shards(make_shards(tmp_path / "small", files=1, rows=6, width=16, seed=2), 128))
    from encoder_train.batch import MaskSpec

    spec = MaskSpec(1, 4, (0, 1, 2, 3, 4), 128, 0.15)

    class Half:
        def batch(self, g):
            return [4, 4], 0.15

    it = iter(MixedBatches([big, small], spec, Half(), seed=0, shuffle_files=2, start={"big": 0, "small": 0}))
    batches = [next(it) for _ in range(3)]  # 12 rows of `small`, 6 per epoch: two epochs of it
    assert all(b.input_ids.shape[0] == 8 for b in batches)
    assert batches[0].input_ids.shape[1] > 16  # big's rows of up to 48 tokens beside small's 16
    # Rows grouped by source, big first; small's real tokens are its rows' own (no row of big among them).
    real = [b.attention_mask[4:].sum().item() for b in batches]
    assert [b.source_tokens[1] for b in batches] == real
    small_rows = [tuple(r[r != 1].tolist()) for b in batches for r in b.labels[4:].where(b.labels[4:] != -100,
                                                                                       b.input_ids[4:])]
    first, second = small_rows[:6], small_rows[6:]
    assert len(set(first)) == 6 and set(first) == set(second)  # each epoch reads every row once
    assert first != second  # reshuffled for its next epoch, while big goes on


# ---- a whole recipe: phases, kill and resume in every phase ----------------------------------------------


def test_a_recipe_runs_its_phases_and_reports_each_source(tmp_path, capsys):
    path = recipe(tmp_path)
    assert run(path) == 0
    out = capsys.readouterr()
    assert "phase ext begins" in out.err and "phase decay begins" in out.err
    rows = [r for r in records(tmp_path / "ckpt") if "loss" in r]
    assert [r["phase"] for r in rows] == ["warm"] * 5 + ["ext"] * 4 + ["decay"] * 3
    # Phase ext reads only code: web's rows stand still through it.
    web = [r["source/web/rows"] for r in rows]
    assert web[4] > 0 and web[8] == web[4] and web[11] > web[8]
    code = [r["source/code/rows"] for r in rows]
    assert code[8] - code[4] == 4 * 4  # four steps of four rows
    # batch-size warmup: 2, 2, 3 rows, then 4 (web + code rows per step)
    totals = [a + b for a, b in zip(web, code, strict=True)]
    per_step = [now - before for now, before in zip(totals, [0] + totals[:-1], strict=True)]
    assert per_step[:5] == [2, 2, 3, 4, 4]
    assert all(r["source/code/tokens"] > 0 and r["source/code/epoch"] > 0 for r in rows[1:])
    # the phases' schedules (a record's lr is the rate its step's update used): warmup over 3 steps to the peak, held
    # through ext, then 1-sqrt decay over decay's 3 steps (its next step, past the end, would be at 0)
    lrs = [r["lr"] for r in rows]
    assert lrs[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3]) and lrs[3:10] == pytest.approx([1e-3] * 7)
    assert lrs[9:] == pytest.approx([1e-3, 1e-3 * (1 - math.sqrt(1 / 3)), 1e-3 * (1 - math.sqrt(2 / 3))])
    # every phase's end is checkpointed and kept despite max_checkpoints 1
    kept = sorted(p.name for p in (tmp_path / "ckpt").glob("checkpoint_*.pt"))
    assert kept == ["checkpoint_00000005.pt", "checkpoint_00000009.pt", "checkpoint_00000012.pt"]
    evals = [r for r in records(tmp_path / "ckpt") if "val_loss" in r]
    assert [r["phase"] for r in evals] == ["warm", "ext", "decay"]  # at every phase's end
    assert all(r["val_loss"] == pytest.approx(r["val/code/loss"], rel=1e-12) for r in evals)  # the one val source
    ext = torch.load(tmp_path / "ckpt" / "checkpoint_00000009.pt", weights_only=True)
    assert ext["data"]["stream"]["rows"]["code"] == code[8]


@pytest.mark.parametrize("stop_at", [3, 7, 10])
def test_stopping_in_any_phase_and_resuming_gives_the_same_weights(tmp_path, stop_at, capsys):
    whole = recipe(tmp_path / "whole")
    assert run(whole) == 0
    parts = recipe(tmp_path / "parts")
    assert run(parts, "--max_steps", str(stop_at)) == 0  # with phases, --max_steps stops a trial early
    assert run(parts, "--load_checkpoint", "latest") == 0
    a = weights(tmp_path / "whole/ckpt/checkpoint_00000012.pt")
    b = weights(tmp_path / "parts/ckpt/checkpoint_00000012.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "whole/ckpt/checkpoint_00000012.pt", weights_only=True)
    sb = torch.load(tmp_path / "parts/ckpt/checkpoint_00000012.pt", weights_only=True)
    assert sa["data"]["stream"] == sb["data"]["stream"] and sa["tokens_seen"] == sb["tokens_seen"]


def test_changed_sources_on_resume_follow_the_rules(tmp_path, capsys):
    path = recipe(tmp_path)
    assert run(path, "--max_steps", "3") == 0
    config = yaml.safe_load(path.read_text())
    # a new source starts at its beginning; a removed one is dropped (both said)
    extra = make_shards(tmp_path / "extra", files=1, rows=20, width=32, seed=9)
    config["data"]["sources"]["extra"] = {"data_dir": str(extra)}
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert run(path, "--load_checkpoint", "latest", "--max_steps", "4") == 0
    assert "source extra is new" in capsys.readouterr().out
    state = torch.load(tmp_path / "ckpt/checkpoint_00000004.pt", weights_only=True)
    assert 0 <= state["data"]["stream"]["rows"]["extra"] <= 4
    # files that changed are refused, naming the flag that restarts the source; nothing is written
    make_shards(tmp_path / "web", files=4, rows=40, width=32, seed=5)
    before = sorted((tmp_path / "ckpt").iterdir())
    assert run(path, "--load_checkpoint", "latest", "--max_steps", "5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the files of source web" in err[0] and "--restart_source web" in err[0]
    assert sorted((tmp_path / "ckpt").iterdir()) == before
    assert run(path, "--load_checkpoint", "latest", "--max_steps", "5", "--restart_source", "web") == 0
    state = torch.load(tmp_path / "ckpt/checkpoint_00000005.pt", weights_only=True)
    assert state["data"]["stream"]["rows"]["web"] <= 4  # read again from its beginning
    del config["data"]["sources"]["extra"]
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert run(path, "--load_checkpoint", "latest", "--max_steps", "6") == 0
    assert "source extra of" in capsys.readouterr().out
    # a source pointed at another folder reads that folder from its beginning
    config["data"]["sources"]["code"]["data_dir"] = str(make_shards(tmp_path / "code2", files=1, rows=30, width=48))
    path.write_text(yaml.safe_dump(config))
    assert run(path, "--load_checkpoint", "latest", "--max_steps", "7") == 0
    assert "source code now reads" in capsys.readouterr().out
    state = torch.load(tmp_path / "ckpt/checkpoint_00000007.pt", weights_only=True)
    assert state["data"]["stream"]["rows"]["code"] <= 4


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    path = recipe(tmp_path)
    assert run(path, "--dry_run") == 0
    out = capsys.readouterr().out
    assert "plan: 12 steps" in out
    for line in ("phase warm: steps 1-5", "phase ext: steps 6-9", "phase decay: steps 10-12"):
        assert line in out
    assert "mix code 100.0%" in out and "mix code 25.0%, web 75.0%" in out  # the file's order (sorted by the dump)
    assert "max_steps: 12" in out  # the resolved config: the phases' length
    assert "source code: 2 shards, 60 rows of up to 48 tokens" in out and "epochs" in out
    assert "mask rate 0.15 -> 0.05" in out
    assert not (tmp_path / "ckpt").exists()


def test_a_phase_length_in_tokens_becomes_steps(tmp_path, capsys):
    path = recipe(tmp_path, phases=[{"name": "only", "tokens": 4 * 48 * 10}], data={"sources": {
        "code": {"data_dir": str(make_shards(tmp_path / "c2", files=1, rows=30, width=48))}}})
    assert run(path, "--dry_run") == 0
    assert "phase only: steps 1-10" in capsys.readouterr().out


# ---- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, words", [
    ({"data": {"sources": {"web": {"data_dir": "x", "weight": 0}}}}, "data.sources.web.weight"),
    ({"data": {"sources": {"web": {"data_dir": "x", "weight": -1}}}}, "data.sources.web.weight"),
    ({"data": {"temperature": 0}}, "data.temperature"),
    ({"phases": [{"name": "a", "steps": 0}]}, "phases.0.steps"),
    ({"phases": [{"name": "a", "steps": 3, "data": {"sources": {"books": {}}}}]}, "unknown source 'books'"),
    ({"phases": [{"name": "a", "steps": 3, "model": {"hidden_size": 64}}]}, "model.hidden_size changes the model's"),
    ({"phases": [{"name": "a", "steps": 3, "training": {"seed": 1}}]}, "training.seed is fixed for the whole run"),
    ({"phases": [{"name": "a", "steps": 3}], "training": {"max_steps": 5}}, "disagrees with the phases"),
    ({"phases": [{"name": "a", "steps": 3}], "training": {"warmup_steps": 2}}, "schedules belong to a phase"),
    ({"phases": [{"name": "a", "steps": 3}, {"name": "a", "steps": 2}]}, "phase name 'a' is used twice"),
    ({"phases": [{"name": "a"}]}, "either steps or tokens"),
])
def test_bad_recipes_are_one_sentence_and_exit_2(tmp_path, capsys, change, words):
    path = recipe(tmp_path)
    config = yaml.safe_load(path.read_text())
    for section, values in change.items():
        if section == "phases":
            config["phases"] = values
        elif section == "data" and "sources" in values:
            config["data"]["sources"].update(values["sources"])
        else:
            config[section].update(values)
    path.write_text(yaml.safe_dump(config))
    assert run(path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "Traceback" not in err[0], err


@pytest.mark.parametrize("problem", ["missing", "empty", "too wide"])
def test_a_bad_source_folder_names_its_key(tmp_path, capsys, problem):
    path = recipe(tmp_path)
    config = yaml.safe_load(path.read_text())
    folder = tmp_path / "bad"
    if problem == "empty":
        folder.mkdir()
    elif problem == "too wide":
        make_shards(folder, files=1, rows=4, width=200)
    config["data"]["sources"]["bad"] = {"data_dir": str(folder)}
    path.write_text(yaml.safe_dump(config))
    assert run(path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder) in err[0]
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").glob("checkpoint_*.pt"))


def test_one_data_dir_is_one_source_named_data_dir(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": MODEL, "data": {"data_dir": str(make_shards(tmp_path / "d"))}}))
    plan = Plan(load_config(cfg), [Source(SINGLE, scan_shards(tmp_path / "d", 128))], 1)
    assert plan.phases[0].weights == (1.0,) and plan.batch(5) == ([32], 0.15)


# ---- the shipped recipes ----------------------------------------------------------------------------------------

RECIPES = sorted((BUNDLED_CONFIG_DIR / "recipes").glob("*.yaml"))


def test_every_recipe_has_a_tiny_twin():
    full = [p for p in RECIPES if not p.name.startswith("tiny-")]
    assert len(full) >= 3
    for p in full:
        assert (p.parent / f"tiny-{p.name}").is_file(), p.name
        assert load_config(p).phases  # a real size, with phases, validates


@pytest.mark.parametrize("twin", [p for p in RECIPES if p.name.startswith("tiny-")], ids=lambda p: p.stem)
def test_tiny_twins_run_end_to_end_and_resume(tmp_path, twin, capsys):
    """Each twin names its sources' folders relative to the working folder: the test fills them with shards."""
    config = yaml.safe_load(twin.read_text())
    tok = make_tokenizer(tmp_path / "tok.json")
    for i, src in enumerate(config["data"]["sources"].values()):
        width = min(48, 16 * (i + 1) + 16)
        for key in ("data_dir", "val_data_dir"):
            if src.get(key):
                make_shards(tmp_path / src[key], files=1, rows=24, width=width, seed=i)
    import os

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        common = ["--tokenizer_filepath", str(tok), "--checkpoint_dir", "ckpt"]
        assert main(["train", "--config_file", str(twin), *common, "--max_steps", "3"]) == 0
        assert main(["train", "--config_file", str(twin), *common, "--load_checkpoint", "latest"]) == 0
    finally:
        os.chdir(here)
    rows = [r for r in records(tmp_path / "ckpt") if "loss" in r]
    assert {r["phase"] for r in rows} == {p["name"] for p in config["phases"]}
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_trackers_and_the_log_line_carry_the_phase_and_sources(tmp_path, capsys):
    """A real offline W&B run and a real TensorBoard event file, read back; the plain progress line off a terminal."""
    from helpers.train_runs import tensorboard_steps
    from helpers.wandb_records import history

    path = recipe(tmp_path)
    assert run(path, "--wandb", "--tensorboard", "--set", "tensorboard.log_freq=1", "--wandb_log_freq", "1",
               "--progress", "lines") == 0
    err = capsys.readouterr().err
    assert "phase warm" in err and "phase decay" in err
    rows = [r for r in history(tmp_path / "ckpt" / "wandb") if "loss" in r]
    assert [r["phase"] for r in rows][-1] == "decay" and rows[-1]["source/code/rows"] > 0
    assert [s for s, _ in tensorboard_steps(tmp_path / "ckpt" / "tensorboard", "phase_index")] == list(range(1, 13))
    web = [v for _, v in tensorboard_steps(tmp_path / "ckpt" / "tensorboard", "source/web/rows")]
    assert web[4] == web[8] > 0  # phase ext reads no web rows


def test_a_source_that_fails_mid_run_stops_with_a_sentence_after_saving(tmp_path, capsys):
    """A source read only from the last phase holds an id outside the vocabulary: the run stops there, saved."""
    late = make_shards(tmp_path / "late", files=1, rows=16, width=32, seed=4)
    shard = next(late.rglob("*.pt"))
    t = torch.load(shard, weights_only=True)
    t[:, 3] = 10_000
    torch.save(t, shard)
    path = recipe(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["data"]["sources"]["late"] = {"data_dir": str(late)}
    config["phases"][0]["data"] = {"sources": {"web": {}, "code": {}}}  # a phase without sources: reads them all
    config["phases"][2]["data"]["sources"] = {"late": {}}
    path.write_text(yaml.safe_dump(config))
    assert run(path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "outside the tokenizer's vocabulary" in err[-1] and "step 9 is saved in" in err[-1]
    assert torch.load(tmp_path / "ckpt/checkpoint_00000009.pt", weights_only=True)["step"] == 9


@pytest.mark.slow
def test_a_recipe_under_torchrun_stops_and_resumes_to_the_same_weights(tmp_path):
    """Two real processes (gloo), two loader workers each and accumulation: the position counts every rank's rows."""
    import os
    import subprocess
    import sys

    def launch(path: Path, *extra: str) -> None:
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "encoder_train", "train", "--config_file", str(path), *extra]
        r = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]

    settings = {"num_workers": 2}
    whole = recipe(tmp_path / "whole", data=settings, training={"gradient_accumulation_steps": 2})
    parts = recipe(tmp_path / "parts", data=settings, training={"gradient_accumulation_steps": 2})
    launch(whole)
    launch(parts, "--max_steps", "7")
    launch(parts, "--load_checkpoint", "latest")
    a = torch.load(tmp_path / "whole/ckpt/checkpoint_00000012.pt", weights_only=True)
    b = torch.load(tmp_path / "parts/ckpt/checkpoint_00000012.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["data"]["stream"] == b["data"]["stream"]
    rows = [r for r in records(tmp_path / "whole/ckpt") if "loss" in r]
    taken = [r["source/web/rows"] + r["source/code/rows"] for r in rows]
    assert taken[-1] - taken[-2] == 4 * 2 * 2  # the last step: 4 rows x 2 micro-batches x 2 processes


def test_a_phase_temperature_replaces_the_inherited_weights(tmp_path, capsys):
    path = recipe(tmp_path, phases=[{"name": "a", "steps": 2}, {"name": "b", "steps": 2, "data": {"temperature": 1.0}}])
    assert run(path, "--dry_run") == 0
    out = capsys.readouterr().out
    assert "mix code 25.0%, web 75.0%" in out  # phase a: the weights 1 and 3
    assert "mix code 42.9%, web 57.1%" in out  # phase b: by size (2,880 and 3,840 token slots)
