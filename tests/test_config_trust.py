"""A config never drops a word, and a dry run tells the truth: typos at every depth are one sentence, every `--set`
item reaches its key or is refused, names are names, mixture arithmetic cannot overflow, and a plan that cannot run
or makes no sense says so before any time is spent."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from encoder_train.config import describe_error, load_config, parse_set
from encoder_train.errors import UserError


def write(tmp_path: Path, config: dict | str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    return p


def with_sets(path: Path, *items: str):
    parsed = parse_set(list(items))
    return load_config(path, {k: v for k, (v, _) in parsed.items()}, {k: o for k, (_, o) in parsed.items()})


def refusal(fn, *args) -> str:
    with pytest.raises(UserError) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message
    return message


RECIPE = {"data": {"sources": {"web": {"data_dir": "w"}, "code": {"data_dir": "c", "weight": 2}}},
          "phases": [{"name": "stable", "steps": 2}, {"name": "decay", "steps": 3}]}


# ---- typos at every depth of the schema ------------------------------------------------------------------------


@pytest.mark.parametrize("text, key, hint", [
    ("optimiser: {x: 1}\n", "optimiser", None),
    ("training: {learnin_rate: 1}\n", "training.learnin_rate", "training.learning_rate"),
    ("data: {sources: {web: {data_dir: w, weigth: 2}}}\n", "data.sources.web.weigth", "data.sources.web.weight"),
    ("data: {sources: {web: {data_dri: w}}}\n", "data.sources.web.data_dri", "data.sources.web.data_dir"),
    ("phases: [{name: a, steps: 2, foo: 1}]\n", "phases.0.foo", None),
    ("phases: [{name: a, steps: 2}, {name: b, step: 2}]\n", "phases.1.step", "phases.1.steps"),
    ("wandb: {projekt: x}\n", "wandb.projekt", "wandb.project"),
])
def test_a_typo_at_any_depth_is_one_sentence_with_the_nearest_key(tmp_path, text, key, hint):
    p = write(tmp_path, text)
    message = refusal(load_config, p)
    assert message.startswith(f"{p}: unknown key {key};")
    if hint:
        assert f"did you mean {hint}?" in message


@pytest.mark.parametrize("loc", [("model", "nope", "deeper"), ("phases", 7, "data", "x", "y"),
                                 ("data", "sources", "web", "weight", "z"), ("nothing",), ()])
def test_the_error_formatter_never_raises_on_a_path_beyond_the_schema(loc):
    message = describe_error({"type": "extra_forbidden", "loc": loc, "msg": "extra", "input": 1}, "c.yaml")
    assert message.startswith("c.yaml: unknown key")
    for kind in ("missing", "value_error", "int_type", "model_type"):
        assert describe_error({"type": kind, "loc": (*loc, "[key]"), "msg": "bad", "input": None}, "c.yaml")


# ---- names ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a/b cé", "é", "web code", "-web", ".hidden", "a" * 65, "x" * 10_000, "tab\t",
                                  "new\nline", "", "a:b"])
def test_source_and_phase_names_are_whole_words(tmp_path, name):
    source = refusal(load_config, write(tmp_path, {"data": {"sources": {name: {"data_dir": "w"}}}}))
    phase = refusal(load_config, write(tmp_path, {"phases": [{"name": name, "steps": 1}]}))
    for message in (source, phase):
        assert "a name must be 1 to 64 ASCII letters" in message and len(message) < 400
    assert "data.sources names the source" in source and "phases.0.name" in phase


def test_names_that_are_words_pass(tmp_path):
    names = ["web", "books-long", "en.wiki", "c4_2024", "7", "a" * 64]
    cfg = load_config(write(tmp_path, {"data": {"sources": {n: {"data_dir": "w"} for n in names}},
                                       "phases": [{"name": n, "steps": 1} for n in names]}))
    assert list(cfg.data.sources) == names and [p.name for p in cfg.phases] == names


# ---- --set reaches any depth, drops nothing -------------------------------------------------------------------------


def test_set_reaches_sources_by_name_and_phases_by_index_or_name(tmp_path):
    p = write(tmp_path, RECIPE)
    cfg = with_sets(p, "data.sources.web.data_dir=s3://bucket/web", "phases.1.steps=4",
                    "phases.stable.training.learning_rate=1e-4", "data.sources.books.data_dir=b",
                    "data.sources.books.weight=0.5", "phases.decay.data.sources={web: {}, books: {weight: 3}}",
                    "training.seed=9")
    assert cfg.data.sources["web"].data_dir == "s3://bucket/web"
    assert (cfg.data.sources["books"].data_dir, cfg.data.sources["books"].weight) == ("b", 0.5)
    assert [p.steps for p in cfg.phases] == [2, 4]
    assert cfg.phase_config(0).training.learning_rate == 1e-4
    assert cfg.phase_config(1).data.sources["books"].weight == 3
    assert cfg.training.seed == 9


@pytest.mark.parametrize("item, words", [
    ("phases.x=1", ["--set phases.x=1", "no phases entry 'x'", "0 stable, 1 decay"]),
    ("phases.2.steps=1", ["--set phases.2.steps=1", "no phases entry '2'"]),
    ("phases.0.stepz=1", ["--set phases.0.stepz=1", "unknown key phases.0.stepz", "did you mean phases.0.steps?"]),
    ("data.sourcs.web.data_dir=x", ["unknown key data.sourcs", "did you mean data.sources?"]),
    ("data.sources.web.weigth=2", ["unknown key data.sources.web.weigth", "did you mean data.sources.web.weight?"]),
    ("data.sources.new.weight=2", ["--set data.sources.new.weight=2", "data.sources.new.data_dir is required"]),
    ("training.seed.x=1", ["training.seed is a value"]),
    ("data.sources.a/b.data_dir=x", ["--set data.sources.a/b.data_dir=x", "'a/b'", "a name must be"]),
])
def test_set_refuses_what_it_cannot_set_in_one_sentence_naming_the_item(tmp_path, item, words):
    message = refusal(with_sets, write(tmp_path, RECIPE), item, "training.seed=3")
    assert all(w in message for w in words), message


def test_set_finds_names_that_hold_dots(tmp_path):
    p = write(tmp_path, {"data": {"sources": {"en.wiki": {"data_dir": "w"}, "en": {"data_dir": "e"}}},
                         "phases": [{"name": "v1.5", "steps": 2}, {"name": "1", "steps": 3}]})
    cfg = with_sets(p, "data.sources.en.wiki.weight=2", "data.sources.en.weight=3", "phases.v1.5.steps=4",
                    "phases.1.steps=5")
    assert (cfg.data.sources["en.wiki"].weight, cfg.data.sources["en"].weight) == (2, 3)
    assert [p.steps for p in cfg.phases] == [4, 5]  # phases.1 is the index 1 (the phase named 1 is also there)
    # A new name is one part: a new source named with a dot is added in the file.
    assert "unknown key data.sources.de.wiki" in refusal(with_sets, p, "data.sources.de.wiki.data_dir=d")


def test_no_set_item_after_a_refused_or_odd_one_is_dropped(tmp_path):
    # phases is a list: before, an item under it ended the loop and every later item was ignored.
    cfg = with_sets(write(tmp_path, RECIPE), "phases.0.steps=5", "training.seed=3", "data.mask_probability=0.2")
    assert (cfg.phases[0].steps, cfg.training.seed, cfg.data.mask_probability) == (5, 3, 0.2)


def test_set_twice_for_one_key_is_refused(tmp_path):
    p = write(tmp_path, RECIPE)
    assert "both set training.seed" in refusal(parse_set, ["training.seed=1", "training.seed=2"])
    assert "both set phases.0.steps" in refusal(with_sets, p, "phases.stable.steps=1", "phases.0.steps=2")
    # A whole mapping after one of its keys would drop that key.
    message = refusal(with_sets, p, "data.sources.web.data_dir=x", "data.sources.web={data_dir: y}")
    assert message.startswith("--set data.sources.web.data_dir=x and --set data.sources.web={data_dir: y} both set")
    assert with_sets(p, "data.sources.web={data_dir: y}", "data.sources.web.weight=4").data.sources["web"].weight == 4


def test_set_through_a_section_the_file_wrote_as_a_value_is_refused(tmp_path):
    message = refusal(with_sets, write(tmp_path, "training: {seed: 1}\ndata: [1, 2]\n"), "data.data_dir=x")
    assert message.startswith("--set data.data_dir=x: the file's data is [1, 2], not a mapping")


# ---- mixture arithmetic: no overflow, no silent one-source mix -------------------------------------------------------


def plan_of(tmp_path: Path, data: dict, phases: list | None = None, **training):
    from encoder_train.config import Config
    from encoder_train.phases import Plan
    from encoder_train.stream import scan_sources

    length = {} if phases else {"max_steps": 10}
    config = Config.model_validate({"data": data, "phases": phases or [],
                                    "training": {"batch_size": 4, **length, **training}})
    config.check_consistency("c.yaml")
    return Plan(config, scan_sources(config.data, 128), 1)


@pytest.fixture
def two_folders(tmp_path):
    """Two sources: 3 x 64 rows of 32 tokens (6,144 token slots) and 2 x 30 rows of 48 (2,880)."""
    from conftest import make_shards

    return str(make_shards(tmp_path / "big", files=3, rows=64, width=32)), \
        str(make_shards(tmp_path / "small", files=2, rows=30, width=48, seed=5))


@pytest.mark.parametrize("big, small", [(1e308, 1e308), (1.7e308, 1.0), (3.0, 1.0), (1e-300, 1e-300), (5e-324, 1.0)])
def test_weights_anywhere_in_the_float_range_mix_as_their_ratio(tmp_path, two_folders, big, small):
    from fractions import Fraction

    plan = plan_of(tmp_path, {"sources": {"big": {"data_dir": two_folders[0], "weight": big},
                                          "small": {"data_dir": two_folders[1], "weight": small}}})
    exact = Fraction(big) / (Fraction(big) + Fraction(small))
    assert plan.phases[0].weights == pytest.approx((float(exact), float(1 - exact)), rel=1e-12, abs=0)
    assert all(w > 0 for w in plan.phases[0].weights)


def test_a_weight_whose_share_rounds_to_zero_is_refused(tmp_path, two_folders):
    message = refusal(plan_of, tmp_path, {"sources": {"big": {"data_dir": two_folders[0], "weight": 1e300},
                                                      "small": {"data_dir": two_folders[1], "weight": 1e-300}}})
    assert "share of source small rounds to 0" in message and "never be read" in message


@pytest.mark.parametrize("temperature", [1.0, 0.3, 25.0, 100.0, 900.0])
def test_temperature_shares_are_the_exact_powers_without_overflow(tmp_path, two_folders, temperature):
    from fractions import Fraction

    plan = plan_of(tmp_path, {"sources": {"big": {"data_dir": two_folders[0]},
                                          "small": {"data_dir": two_folders[1]}}, "temperature": temperature})
    ratio = (2880 / 6144) ** temperature  # small's weight over big's: a float power of a ratio below 1 is exact enough
    exact = 1 / (1 + Fraction(ratio))
    assert plan.phases[0].weights == pytest.approx((float(exact), float(1 - exact)), rel=1e-9, abs=0)


def test_temperature_on_real_corpus_sizes_does_not_overflow():
    from encoder_train.data.mixture import normalise, temperature_weights

    sizes = [2 * 10**12, 3 * 10**11, 10**9]  # token slots of web, code and a small language
    for t in (0.3, 1.0, 26.0, 100.0):
        shares = normalise(temperature_weights(sizes, t))
        expected = [(s / sizes[0]) ** t for s in sizes]
        assert shares == pytest.approx([e / sum(expected) for e in expected], rel=1e-9, abs=1e-300)


def test_a_temperature_that_leaves_a_source_unread_is_refused(tmp_path, two_folders):
    message = refusal(plan_of, tmp_path, {"sources": {"big": {"data_dir": two_folders[0]},
                                                      "small": {"data_dir": two_folders[1]}}, "temperature": 1e6})
    assert "share of source small rounds to 0" in message and "temperature 1e+06" in message


@pytest.mark.parametrize("weight", [0, -1, ".inf", "-.inf", ".nan", "1e400", "true"])
def test_non_finite_or_non_positive_weights_are_refused_in_one_sentence(tmp_path, weight):
    top = f"data: {{sources: {{web: {{data_dir: w, weight: {weight}}}, code: {{data_dir: c}}}}}}\n"
    message = refusal(load_config, write(tmp_path, top))
    assert "data.sources.web.weight" in message
    phase = top.replace(f"weight: {weight}", "weight: 1") + \
        f"phases: [{{name: a, steps: 1, data: {{sources: {{web: {{weight: {weight}}}}}}}}}]\n"
    message = refusal(load_config, write(tmp_path, phase))
    assert "phases[0] (a)" in message and "data.sources.web.weight" in message


# ---- phases that would silently do nothing ------------------------------------------------------------------------


@pytest.mark.parametrize("model, phase, key", [
    ({}, {"model": {"rope_theta": 320000.0}}, "model.rope_theta"),  # learned positions: no rotary base
    ({}, {"model": {"local_rope_theta": 20000.0}}, "model.local_rope_theta"),
    ({"family": "modernbert", "global_attention_every": 1}, {"model": {"local_rope_theta": 20000.0}},
     "model.local_rope_theta"),  # rotary, but every layer global: no local base
    ({}, {"training": {"decay_shape": "cosine"}}, "training.decay_shape"),  # the phase's schedule is constant
    ({}, {"training": {"schedule": "linear", "decay_fraction": 0.5}}, "training.decay_fraction"),
    ({}, {"training": {"batch_size_start": 2}}, "training.batch_size_start"),  # no batch-size warmup
])
def test_a_phase_key_that_would_do_nothing_is_refused(tmp_path, model, phase, key):
    text = {"model": model, "phases": [{"name": "a", "steps": 4}, {"name": "ext", "steps": 4, **phase}]}
    message = refusal(load_config, write(tmp_path, text))
    assert message.startswith(f"phases[1] (ext): {key} does nothing here")


def test_the_same_phase_keys_pass_where_they_act(tmp_path):
    cfg = load_config(write(tmp_path, {"model": {"family": "modernbert"}, "phases": [
        {"name": "ext", "steps": 4, "model": {"rope_theta": 320000.0, "local_rope_theta": 20000.0},
         "training": {"schedule": "wsd", "decay_shape": "cosine", "batch_size_start": 2,
                      "batch_size_warmup_steps": 2}}]}))
    assert cfg.phase_config(0).model.rope_theta == 320000.0


@pytest.mark.parametrize("data, training, words", [
    ({"mask_probability": 0.001}, {}, ["the config: data.mask_probability 0.001", "0.12 tokens per micro-batch",
                                       "4 rows of up to 32 tokens"]),
    ({"mask_probability": 0.005}, {"batch_size": 1}, ["0.15 tokens"]),
    ({"mask_probability": 0.001, "mask_probability_end": 0.2}, {}, ["data.mask_probability 0.001"]),
    ({"mask_probability": 0.2, "mask_probability_end": 0.0001}, {"max_steps": 1000},
     ["data.mask_probability_end 0.0001", "0.036 tokens"]),  # the last step's rate: 0.2 - 0.1999 x 999 / 1000
])
def test_a_mask_rate_that_selects_less_than_a_token_per_micro_batch_is_refused(tmp_path, shard_dir, data, training,
                                                                               words):
    message = refusal(lambda: plan_of(tmp_path, {"data_dir": str(shard_dir), **data}, None, **training))
    assert all(w in message for w in words) and "train at loss 0" in message, message


def test_a_phase_mask_rate_is_checked_in_that_phase(tmp_path, shard_dir):
    phases = [{"name": "a", "steps": 2}, {"name": "late", "steps": 2, "data": {"mask_probability": 0.002}}]
    message = refusal(plan_of, tmp_path, {"data_dir": str(shard_dir)}, phases)
    assert message.startswith("phases[1] (late): data.mask_probability 0.002 selects about 0.24 tokens")
    assert plan_of(tmp_path, {"data_dir": str(shard_dir), "mask_probability": 0.01}).total_steps == 10


# ---- --dry_run tells the truth ---------------------------------------------------------------------------------------


def dry_run(capsys, *args) -> tuple[int, str, str]:
    from encoder_train.cli import main

    rc = main(["train", *[str(a) for a in args], "--dry_run"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def warnings_in(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("warning: ")]


@pytest.fixture
def tiny_run(tmp_path, shard_dir, tokenizer_file):
    """A tiny.yaml run on three shards of 64 rows of 32 tokens, with a 128-token tokenizer."""
    return ["--config_file", "tiny.yaml", "--data_dir", shard_dir, "--tokenizer_filepath", tokenizer_file,
            "--checkpoint_dir", tmp_path / "ckpt"]


def test_a_sensible_dry_run_warns_of_nothing(capsys, tiny_run):
    rc, out, err = dry_run(capsys, *tiny_run)
    assert rc == 0, err
    assert warnings_in(out) == [] and "dry run: nothing was trained or written." in out


@pytest.mark.parametrize("setting, module, words", [
    ("training.optimizer=stable_adamw", "optimi", "training.optimizer stable_adamw needs the optimi package"),
    ("wandb.enabled=true", "wandb", "--wandb needs the wandb package"),
    ("tensorboard.enabled=true", "tensorboard", "--tensorboard needs the tensorboard package"),
])
def test_a_dry_run_refuses_a_plan_whose_package_is_missing(capsys, monkeypatch, tmp_path, tiny_run, setting, module,
                                                            words):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # what `import module` meets when it is not installed
    rc, out, err = dry_run(capsys, *tiny_run, "--set", setting)
    assert rc == 2 and words in err and "pip install" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "ckpt").exists()


def test_a_dry_run_warns_of_a_vocabulary_far_larger_than_the_tokenizers(capsys, tiny_run):
    rc, out, err = dry_run(capsys, *tiny_run, "--set", "model.vocab_size=768")
    assert rc == 0, err
    assert warnings_in(out) == ["warning: model.vocab_size 768 is 6.0x the tokenizer's 128 tokens: 640 embedding rows "
                                "(40,960 parameters) are never trained; remove model.vocab_size to take the "
                                "tokenizer's size."]  # 640 rows x hidden_size 64
    assert warnings_in(dry_run(capsys, *tiny_run, "--set", "model.vocab_size=256")[1]) == []  # 2x: padding


def test_a_dry_run_warns_of_a_source_read_millions_of_epochs(capsys, tiny_run):
    # 192 rows; 36,000,000 steps of 16 rows read them 3,000,000 times over.
    rc, out, err = dry_run(capsys, *tiny_run, "--max_steps", 36_000_000)
    assert rc == 0, err
    assert any("data.data_dir is read about 3,000,000 times over" in w and "Muennighoff" in w
               for w in warnings_in(out)), out
    assert warnings_in(dry_run(capsys, *tiny_run, "--max_steps", 150)[1]) == []  # 12.5 epochs


def test_a_dry_run_warns_of_rows_far_shorter_than_the_models_positions(capsys, tiny_run):
    # Rows of 32 tokens for a model of 512: positions 33 to 512 would never be trained.
    rc, out, err = dry_run(capsys, *tiny_run, "--set", "model.max_position_embeddings=514")
    assert rc == 0, err
    assert any(w.startswith("warning: the run reads rows of at most 32 tokens, under a quarter of the 512")
               for w in warnings_in(out)), out


def test_a_long_context_phase_fed_short_rows_is_warned_of_but_a_short_first_stage_is_not(capsys, tmp_path,
                                                                                         tokenizer_file):
    from conftest import make_shards

    short = make_shards(tmp_path / "short", files=1, rows=64, width=32)
    long = make_shards(tmp_path / "long", files=1, rows=64, width=200, seed=3)
    model = {"family": "modernbert", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 256, "rope_theta": 10000.0}

    def recipe(last: str) -> Path:
        return write(tmp_path, {"model": model, "data": {
            "sources": {"short": {"data_dir": str(short)}, "long": {"data_dir": str(long)}}},
            "training": {"batch_size": 2},
            "phases": [{"name": "stable", "steps": 2, "data": {"sources": {"short": {}}}},
                       {"name": "extension", "steps": 2, "data": {"sources": {last: {}}},
                        "model": {"rope_theta": 160000.0}}]})

    args = ["--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", tmp_path / "ckpt"]
    rc, out, err = dry_run(capsys, "--config_file", recipe("short"), *args)
    assert rc == 0, err
    assert [w[:90] for w in warnings_in(out)] == [
        "warning: phases stable, extension read rows of at most 32 tokens, under a quarter of the 256"[:90]]
    rc, out, err = dry_run(capsys, "--config_file", recipe("long"), *args)
    assert rc == 0 and warnings_in(out) == [], out


def test_a_dry_run_refuses_a_mask_rate_that_masks_nothing(capsys, tiny_run):
    rc, out, err = dry_run(capsys, *tiny_run, "--set", "data.mask_probability=0.0001")
    assert rc == 2 and "data.mask_probability 0.0001 selects about 0.048 tokens per micro-batch" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_set_items_on_the_command_line_reach_the_plan_or_stop_it_in_one_line(capsys, tmp_path, tokenizer_file):
    from conftest import make_shards

    folder = make_shards(tmp_path / "web")
    recipe = write(tmp_path, {"data": {"sources": {"web": {"data_dir": str(folder)}}},
                              "training": {"batch_size": 2},
                              "phases": [{"name": "stable", "steps": 2}, {"name": "decay", "steps": 3}]})
    args = ["--config_file", recipe, "--tokenizer_filepath", tokenizer_file, "--checkpoint_dir", tmp_path / "ckpt"]
    rc, out, err = dry_run(capsys, *args, "--set", "phases.decay.steps=4", "--set", "training.seed=7")
    assert rc == 0, err
    assert "phase decay: steps 3-6 (4)" in out and "seed: 7" in out
    rc, out, err = dry_run(capsys, *args, "--set", "phases.x.steps=4", "--set", "training.seed=7")
    assert rc == 2 and err.startswith("encoder-train: error: --set phases.x.steps=4: the file has no phases entry")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
