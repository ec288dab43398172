"""What a newcomer meets first: the extras that the docs, recipes and messages name install something with any pip,
the logged learning rate is the one the plan shows, a failure at start-up does not say to resume, pretokenize writes
the folders a recipe reads and cleans up after a failure, a start prints a short summary (the whole config goes
beside the checkpoints), and benchmarks/speed.py makes its --work_dir. (A CPU StableAdamW never picking Triton is
tested in test_optimizers.py.)"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_shards, make_tokenizer
from encoder_train.cli import main
from encoder_train.config import Config, load_config
from encoder_train.data.prepare import pretokenize
from encoder_train.data.store import EXTRAS
from encoder_train.errors import UserError
from encoder_train.train import write_config

ROOT = Path(__file__).parents[1]

# ---- extras ----------------------------------------------------------------------------------------------------

# Where an extra is named for a person: `pip install '...[a,b]'`, "the `a` extra", require(module, "a", ...), and in
# Markdown a bare [a] on a line about installing.
QUOTED = re.compile(r"'[^'\s]*\[([^\]'\s{}]+)\]'")
THE_EXTRA = re.compile(r"\bthe `?([\w\-]+)`? extra\b")
REQUIRE = re.compile(r"require\(\s*\"[^\"]+\",\s*\"([^\"]+)\"")
BARE = re.compile(r"(?<![\w\]\)'\"`])\[([a-z0-9_\-]+(?:,[a-z0-9_\-]+)*)\](?![(:])")
PLACEHOLDER = "extra"  # errors.install_hint's docstring: `pip install -e '<clone>[extra]'`


def declared_extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def named_extras() -> dict[str, set[str]]:
    """Every extra named anywhere a user reads: name -> the files that name it."""
    texts = [*(ROOT / "src").rglob("*.py"), *(ROOT / "src").rglob("*.yaml"), *(ROOT / "benchmarks").glob("*.py"),
             *(ROOT / "docs").glob("*.md"), ROOT / "README.md", ROOT / "quickstart.sh"]
    named: dict[str, set[str]] = {}
    for path in texts:
        text = path.read_text()
        found = [*QUOTED.findall(text), *THE_EXTRA.findall(text), *REQUIRE.findall(text)]
        if path.suffix == ".md":
            found += [m for line in text.splitlines() if "install" in line or "extra" in line
                      for m in BARE.findall(line)]
        for group in found:
            for name in set(group.split(",")) - {PLACEHOLDER}:
                named.setdefault(name.strip(), set()).add(str(path.relative_to(ROOT)))
    for _, extra in EXTRAS.values():  # a URL's protocol -> (module, the extra its message names)
        named.setdefault(extra, set()).add("encoder_train.data.store.EXTRAS")
    return named


def normalised(name: str) -> str:
    """PEP 685's form of an extra's name: what pip (23.2 too) matches a request against in built metadata."""
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_extra_is_declared_in_the_form_pip_normalises_it_to():
    declared = declared_extras()
    assert [n for n in declared if n != normalised(n)] == []


def test_every_extra_named_in_docs_recipes_and_messages_is_a_declared_one():
    declared, named = declared_extras(), named_extras()
    assert {"stable-adamw", "s3", "hf", "wandb"} <= set(named)  # the scan finds them where they are written
    assert {n: sorted(where) for n, where in named.items() if n not in declared} == {}


def test_the_s3_extra_brings_boto3_so_a_later_install_of_it_changes_nothing():
    # boto3 installed after s3fs takes the newest botocore, past the one aiobotocore pins; in the extra, bounded
    # above, pip resolves them together without backtracking through every boto3 release.
    extras = declared_extras()
    boto3 = {name: [r for r in reqs if re.match(r"boto3\b", r)] for name, reqs in extras.items()}
    assert re.match(r"boto3\b.*<", boto3["s3"][0]) and any(re.fullmatch(r"s3fs>=2026\.9.*", r) for r in extras["s3"])
    assert {name: b for name, b in boto3.items() if b and b != boto3["s3"]} == {}  # one bound wherever boto3 is


# ---- the logged learning rate ----------------------------------------------------------------------------------

PHASED = {
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 130},
    "data": {"num_workers": 0},
    "training": {"batch_size": 4, "learning_rate": 1.0e-3, "precision": "fp32", "log_interval": 1, "eval_every": 1000},
    "checkpoint": {"checkpoint_every": 1000, "max_checkpoints": 1},
    # warmup: 0.5e-3, 1e-3, then 1e-3; the second phase at its own rate, 2e-3 from its first step
    "phases": [{"name": "first", "steps": 3, "training": {"warmup_steps": 2, "schedule": "constant"}},
               {"name": "second", "steps": 3, "training": {"learning_rate": 2.0e-3, "schedule": "constant"}}],
}
PLAN_LR = re.compile(r"phase (\w+): .*; lr ([\d.e+-]+) -> peak ([\d.e+-]+) -> ([\d.e+-]+)")


def test_the_logged_lr_is_the_rate_the_step_used_as_the_dry_run_plan_shows(tmp_path, capsys):

    cfg = tmp_path / "phased.yaml"
    cfg.write_text(yaml.safe_dump(PHASED))
    args = ["train", "--config_file", str(cfg), "--data_dir", str(make_shards(tmp_path / "data", rows=16)),
            "--tokenizer_filepath", str(make_tokenizer(tmp_path / "tok.json")), "--checkpoint_dir",
            str(tmp_path / "ckpt")]
    assert main([*args, "--dry_run"]) == 0
    plan = {name: [float(x) for x in rates] for name, *rates in PLAN_LR.findall(capsys.readouterr().out)}
    assert main(args) == 0
    lines = (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()
    logged = {r["step"]: r["lr"] for r in map(json.loads, lines) if "lr" in r}
    assert logged == pytest.approx({1: 0.5e-3, 2: 1e-3, 3: 1e-3, 4: 2e-3, 5: 2e-3, 6: 2e-3})
    # the plan's first and last rate of each phase are the logged rates of its first and last step
    assert list(plan) == ["first", "second"]
    assert plan["first"] + plan["second"] == pytest.approx([0.5e-3, 1e-3, 1e-3, 2e-3, 2e-3, 2e-3])
    assert [logged[1], logged[3], logged[4], logged[6]] == pytest.approx(
        [plan["first"][0], plan["first"][2], plan["second"][0], plan["second"][2]])


# ---- what a failure says to do next --------------------------------------------------------------------------


def test_a_store_unreachable_at_start_up_says_what_to_fix_not_to_resume(tmp_path, capsys, monkeypatch):
    # Nothing started (a start, a dry run): "then resume" would send the user looking for a checkpoint.
    pytest.importorskip("s3fs", reason="the s3 extra (in dev)")

    with socket.socket() as s:  # a port nothing listens on: every connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    none = str(tmp_path / "none")
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "key",
                        "AWS_SECRET_ACCESS_KEY": "secret", "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_CONFIG_FILE": none, "AWS_SHARED_CREDENTIALS_FILE": none,
                        "ENCODER_TRAIN_RETRY_SECONDS": "1"}.items():
        monkeypatch.setenv(name, value)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": PHASED["model"], "training": {"max_steps": 2}}))
    args = ["train", "--config_file", str(cfg), "--data_dir", "s3://bucket/web", "--tokenizer_filepath",
            str(make_tokenizer(tmp_path / "t.json")), "--checkpoint_dir", str(tmp_path / "ckpt")]
    for dry in ([], ["--dry_run"]):
        assert main([*args, *dry]) == 2
        err = capsys.readouterr().err.strip()
        assert "s3://bucket/web" in err and err.endswith("check the network and the store."), err
        assert "resume" not in err and err.count("\n") == 0, err
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").glob("*.pt"))


# ---- pretokenize: where its shards go, and what a failure leaves ----------------------------------------------


def bad_jsonl(path: Path, good: int = 300) -> Path:
    """`good` documents, then a line that is not JSON: pretokenize fails after writing shards."""
    path.write_text("".join(json.dumps({"text": f"w{5 + i % 100} w{6 + i % 90} w7 w8"}) + "\n" for i in range(good))
                    + "not json\n")
    return path


def test_a_failed_pretokenize_removes_the_folders_it_made_and_no_other(tmp_path):

    tok, bad = make_tokenizer(tmp_path / "tok.json"), bad_jsonl(tmp_path / "bad.jsonl")
    run = dict(seq_len=16, rows_per_shard=5, batch_chars=200, progress=False)
    with pytest.raises(UserError, match="not valid JSON"):  # a new folder, and its missing parents
        pretokenize([bad], tok, tmp_path / "new" / "deeper" / "out", **run)
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    (mine / "train").mkdir(parents=True)
    (mine / "train" / "notes.txt").write_text("keep me")
    (mine / "empty").mkdir()
    with pytest.raises(UserError, match="not valid JSON"):  # folders that were there stay, with what they hold
        pretokenize([bad], tok, mine, **run)
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == ["empty", "train", "train/notes.txt"]


def test_pretokenize_writes_a_recipe_source_folders_and_says_how_train_reads_them(tmp_path, capsys):

    text = tmp_path / "web.txt"
    text.write_text("\n\n".join(f"w{5 + i % 100} w{9 + i % 50} w7 w8 w{20 + i % 30}" for i in range(200)) + "\n")
    common = ["pretokenize", "--input", str(text), "--tokenizer_filepath", str(make_tokenizer(tmp_path / "t.json")),
              "--output_dir", str(tmp_path / "shards"), "--seq_len", "16"]
    assert main([*common, "--folders", "web", "web-val", "--val_fraction", "0.1"]) == 0
    out = capsys.readouterr().out
    web, val = tmp_path / "shards" / "web", tmp_path / "shards" / "web-val"
    assert list(web.glob("*.pt")) and list(val.glob("*.pt")) and not (tmp_path / "shards" / "train").exists()
    assert f"{{data_dir: {web}, val_data_dir: {val}}}" in out and f"--data_dir {web} --val_data_dir {val}" in out
    # A source without held-out rows (a recipe's code: {data_dir: shards/code}) gets no empty val folder.
    assert main([*common, "--folders", "code", "code-val", "--val_fraction", "0"]) == 0
    assert "no held-out rows" in capsys.readouterr().out
    assert list((tmp_path / "shards" / "code").glob("*.pt")) and not (tmp_path / "shards" / "code-val").exists()
    for folders, word in ((["web", "web"], "share the folder web"), (["a/b", "v"], "not one folder's name")):
        assert main([*common, "--folders", *folders]) == 2
        assert word in capsys.readouterr().err


# ---- what a start prints, and the config it writes beside the checkpoints -------------------------------------


def test_a_start_prints_a_summary_and_writes_the_resolved_config_beside_the_checkpoints(tmp_path, capsys):

    cfg, ckpt = tmp_path / "run.yaml", tmp_path / "ckpt"
    cfg.write_text(yaml.safe_dump({"model": PHASED["model"], "data": {"num_workers": 0},
                                   "training": {"batch_size": 4, "max_steps": 2, "log_interval": 1}}))
    args = ["train", "--config_file", str(cfg), "--data_dir", str(make_shards(tmp_path / "data", rows=16)),
            "--tokenizer_filepath", str(make_tokenizer(tmp_path / "tok.json")), "--checkpoint_dir", str(ckpt),
            "--progress", "lines"]
    assert main(args) == 0
    out = capsys.readouterr().out
    start = [line for line in out.splitlines() if not line.startswith(("step ", "done: "))]  # printed at start
    assert f"resolved config: {ckpt / 'config.yaml'}" in start and len(start) <= 8, start
    assert any(line.startswith("model: ") for line in start) and any(line.startswith("plan: 2 steps") for line in start)
    assert "hidden_size:" not in out  # the config's 90-160 lines are in the file, not in the log
    written = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert written["training"]["max_steps"] == 2 and written["model"]["hidden_size"] == 32
    assert load_config(ckpt / "config.yaml").training.batch_size == 4  # it is a config `train` takes back

    # A resume with other settings: the new config, and the one in force until then is kept.
    assert main([*args, "--load_checkpoint", "latest", "--max_steps", "3"]) == 0
    assert "(the one before, in force until step 2, is kept as config.until_step_00000002.yaml)" in \
        capsys.readouterr().out
    assert yaml.safe_load((ckpt / "config.yaml").read_text())["training"]["max_steps"] == 3
    assert yaml.safe_load((ckpt / "config.until_step_00000002.yaml").read_text())["training"]["max_steps"] == 2


def test_writing_the_config_never_overwrites_one_that_differs(tmp_path):

    one, two = Config(), Config.model_validate({"training": {"max_steps": 7}})
    assert write_config(tmp_path, one, 0) == (tmp_path / "config.yaml", None)
    assert write_config(tmp_path, one, 5) == (tmp_path / "config.yaml", None)  # the same: nothing kept
    assert write_config(tmp_path, two, 5)[1] == tmp_path / "config.until_step_00000005.yaml"
    assert write_config(tmp_path, one, 5)[1] == tmp_path / "config.until_step_00000005.1.yaml"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.until_step_00000005.1.yaml", "config.until_step_00000005.yaml", "config.yaml"]


# ---- benchmarks/speed.py's --work_dir --------------------------------------------------------------------------


@pytest.mark.slow
def test_speed_benchmark_makes_a_missing_work_dir_and_refuses_a_file_in_one_sentence(tmp_path):
    pytest.importorskip("transformers", reason="the bench extra (in dev)")

    def speed(work: Path) -> subprocess.CompletedProcess:  # --sizes with none: no workload, the folder check only
        return subprocess.run([sys.executable, "benchmarks/speed.py", "--sizes", "--work_dir", str(work)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    made = speed(tmp_path / "new" / "deeper")
    assert made.returncode == 0 and (tmp_path / "new" / "deeper").is_dir(), made.stderr[-2000:]
    (tmp_path / "a-file").write_text("")
    refused = speed(tmp_path / "a-file" / "work")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.count("\n") == 1 and f"--work_dir {tmp_path / 'a-file' / 'work'}" in refused.stderr
