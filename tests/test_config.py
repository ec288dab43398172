from pathlib import Path

import pytest
import yaml

from encoder_train.config import (
    BUNDLED_CONFIG_DIR,
    Config,
    load_config,
    resolve_config_path,
)
from encoder_train.errors import UserError

BUNDLED = sorted(BUNDLED_CONFIG_DIR.glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_bundled_configs_ship_and_validate():
    assert {p.name for p in BUNDLED} >= {"tiny.yaml", "small.yaml", "base.yaml", "large.yaml"}
    for p in BUNDLED:
        cfg = load_config(p)
        assert isinstance(cfg, Config)


def test_base_and_large_are_robertas_published_shapes():
    base, large = load_config(BUNDLED_CONFIG_DIR / "base.yaml"), load_config(BUNDLED_CONFIG_DIR / "large.yaml")
    assert (base.model.hidden_size, base.model.num_layers, base.model.num_heads, base.model.intermediate_size) == (
        768, 12, 12, 3072)
    assert (large.model.hidden_size, large.model.num_layers, large.model.num_heads, large.model.intermediate_size) == (
        1024, 24, 16, 4096)
    for cfg, lr in ((base, 6e-4), (large, 4e-4)):
        t = cfg.training
        assert t.learning_rate == lr
        assert t.batch_size * t.gradient_accumulation_steps == 8192
        assert (t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay) == (0.9, 0.98, 1e-6, 0.01)
        assert t.max_steps == 500_000
        assert cfg.model.max_position_embeddings == 514


def test_bundled_name_resolves_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("base.yaml", None) == BUNDLED_CONFIG_DIR / "base.yaml"
    own = write(tmp_path, "training: {batch_size: 3}\n", "mine.yaml")
    assert resolve_config_path("mine.yaml", str(tmp_path)) == own
    assert resolve_config_path(str(own), None) == own  # an existing path works as --config_file
    with pytest.raises(UserError, match="nope.yaml"):
        resolve_config_path("nope.yaml", None)


def test_unknown_key_names_file_key_and_nearest(tmp_path):
    p = write(tmp_path, "training:\n  learnin_rate: 0.1\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "training.learnin_rate" in msg and "did you mean training.learning_rate" in msg


def test_unknown_section_is_rejected(tmp_path):
    with pytest.raises(UserError, match="unknown key optimizer.*valid keys: model, data, training"):
        load_config(write(tmp_path, "optimizer: {lr: 1}\n"))


@pytest.mark.parametrize(
    "text, key",
    [
        ("training: {batch_size: many}\n", "training.batch_size"),
        ("training: {batch_size: 0}\n", "training.batch_size"),
        ("training: {learning_rate: -1.0}\n", "training.learning_rate"),
        ("training: {precision: fp8}\n", "training.precision"),
        ("data: {mask_probability: 1.5}\n", "data.mask_probability"),
        ("model: {num_layers: 2.5}\n", "model.num_layers"),
        ("checkpoint: {max_checkpoints: 0}\n", "checkpoint.max_checkpoints"),
    ],
)
def test_wrong_type_or_range_names_the_key(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_config(p)
    assert key in str(e.value) and str(p) in str(e.value)


def test_yaml_syntax_error_names_line(tmp_path):
    p = write(tmp_path, "model:\n  hidden_size: [64\n")
    with pytest.raises(UserError, match=r"not valid YAML at line \d+"):
        load_config(p)


def test_heads_must_divide_hidden(tmp_path):
    with pytest.raises(UserError, match="divisible by model.num_heads"):
        load_config(write(tmp_path, "model: {hidden_size: 65, num_heads: 2}\n"))


def test_precedence_defaults_yaml_flags(tmp_path):
    p = write(tmp_path, "training: {batch_size: 7, learning_rate: 0.01}\n")
    cfg = load_config(p, {"training.batch_size": 3})
    assert cfg.training.batch_size == 3  # flag beats YAML
    assert cfg.training.learning_rate == 0.01  # YAML beats default
    assert cfg.training.warmup_steps == Config().training.warmup_steps  # default where neither speaks


def section_models():
    """(prefix, model) for every section and nested section of the schema (phases[], data.sources.NAME)."""
    from encoder_train import docgen

    return [(name, docgen.NESTED.get(name) or field.annotation) for name, field in Config.model_fields.items()] + \
        [("data.sources.NAME", docgen.NESTED["data.sources"])]


def test_every_field_is_documented():
    assert Config.model_fields["phases"].description
    for _, model in section_models():
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"


def test_resolved_config_round_trips_through_yaml():
    cfg = Config()
    assert Config.model_validate(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_the_configuration_page_is_generated_from_the_schema():
    from encoder_train import docgen
    from encoder_train.config import FLAG_TO_KEY

    page = docgen.configuration_page()
    assert docgen.PAGE.read_text() == page, "docs/configuration.md is stale: run `python -m encoder_train.docgen`"
    for prefix, model in section_models():
        for name in model.model_fields:
            assert f"`{prefix}.{name}`" in page or f"`{prefix}[].{name}`" in page
    for flag in FLAG_TO_KEY:
        assert f"`--{flag}`" in page


# ---- hostile configs: one sentence each, naming the file and key ------------------------------------------


def test_an_empty_or_comment_only_file_is_refused(tmp_path):
    for text in ("", "# just a comment\n", "---\n"):
        with pytest.raises(UserError, match="is empty: it sets nothing"):
            load_config(write(tmp_path, text))


def test_a_yaml_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path):
    import time

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = "training:\n  seed: 1\nbomb: &bomb\n" + "".join(f"  {line}\n" for line in lines)
    text += "model:\n  dropout: *a8\n"
    start = time.monotonic()
    with pytest.raises(UserError, match="aliases") as e:
        load_config(write(tmp_path, text))
    assert time.monotonic() - start < 5
    assert len(str(e.value)) < 400


def test_a_huge_value_is_shortened_in_the_message(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, "training: {batch_size: [" + ", ".join(["1"] * 2000) + "]}\n"))
    assert "training.batch_size" in str(e.value) and len(str(e.value)) < 400


@pytest.mark.parametrize("text, key", [
    ("training: {batch_size: true}", "training.batch_size"),
    ("training: {learning_rate: true}", "training.learning_rate"),
    ("training: {learning_rate: .inf}", "training.learning_rate"),
    ("training: {learning_rate: .nan}", "training.learning_rate"),
    ("model: {dropout: -.inf}", "model.dropout"),
    ("training: {max_steps: 10.5}", "training.max_steps"),
    ("model: {hidden_size: 1e20}", "model.hidden_size"),  # YAML 1.1 reads 1e20 (no dot) as text
    ("model: {hidden_size: 2**40}", "model.hidden_size"),
    ("training: {compile: 'yes'}", "training.compile"),
    ("training: {seed: -1}", "training.seed"),
])
def test_values_of_the_wrong_kind_are_refused(tmp_path, text, key):
    p = write(tmp_path, text + "\n")
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as e:
        load_config(p)
    assert str(p) in str(e.value)


def test_floats_still_parse_from_yaml_text_forms(tmp_path):
    cfg = load_config(write(tmp_path, "training: {learning_rate: 1e-3, adam_eps: 1.0e-8, gradient_clip: 2}\n"))
    assert cfg.training.learning_rate == 1e-3 and cfg.training.adam_eps == 1e-8 and cfg.training.gradient_clip == 2.0


def test_set_overrides_any_key_and_reports_like_the_file(tmp_path):
    from encoder_train.config import parse_set

    p = write(tmp_path, "training: {max_steps: 50, learning_rate: 0.01}\n")
    items = parse_set(["training.max_steps=200", "data.mask_probability=0.3", "training.schedule=cosine",
                       "data.val_data_dir="])
    cfg = load_config(p, {k: v for k, (v, _) in items.items()}, {k: o for k, (_, o) in items.items()})
    assert (cfg.training.max_steps, cfg.data.mask_probability, cfg.training.schedule) == (200, 0.3, "cosine")
    assert cfg.training.learning_rate == 0.01 and cfg.data.val_data_dir is None

    def bad(item: str) -> str:
        parsed = parse_set([item])
        with pytest.raises(UserError) as e:
            load_config(p, {k: v for k, (v, _) in parsed.items()}, {k: o for k, (_, o) in parsed.items()})
        return str(e.value)

    assert "did you mean training.learning_rate?" in bad("training.learnin_rate=3e-4")
    assert bad("training.batch_size=true").startswith("--set training.batch_size=true is invalid")
    assert "finite" in bad("training.learning_rate=.inf")
    for item, pattern in [("training=3", "section.key=value"), ("trainin.max_steps=3", "did you mean training"),
                          ("training.max_steps=[", "not valid YAML")]:
        with pytest.raises(UserError, match=pattern):
            parse_set([item])
