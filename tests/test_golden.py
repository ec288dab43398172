"""Training is unchanged by refactors: a fixed-seed run reproduces values recorded from an earlier commit.

`tests/data/golden_tiny.json` was written by `python tests/test_golden.py --record` on commit b27741c,
before the structure of the training code was changed; losses, gradient norms and every parameter's
statistics after a few steps must still match it (to float tolerance: other CPUs round differently).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
GOLDEN = HERE / "data" / "golden_tiny.json"
CONFIG = """
model: {hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, max_position_embeddings: 130}
data: {num_workers: 0}
training: {batch_size: 8, gradient_accumulation_steps: 2, max_steps: 8, learning_rate: 3.0e-3, warmup_steps: 2,
           precision: PRECISION, log_interval: 1, seed: 7}
checkpoint: {checkpoint_every: 4, max_checkpoints: 1}
"""


def run(work: Path, precision: str) -> dict:
    sys.path.insert(0, str(HERE))
    from conftest import make_shards, make_tokenizer
    from encoder_train.cli import main

    cfg = work / "run.yaml"
    cfg.write_text(CONFIG.replace("PRECISION", precision))
    tok = make_tokenizer(work / "tokenizer.json")
    data = make_shards(work / "data", files=3, rows=40, width=48, seed=3)
    ckpt = work / "ckpt"
    torch.set_num_threads(1)
    assert main(["train", "--config_file", str(cfg), "--data_dir", str(data), "--tokenizer_filepath", str(tok),
                 "--checkpoint_dir", str(ckpt)]) == 0
    lines = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
    state = torch.load(ckpt / "checkpoint_00000008.pt", weights_only=True)
    return {
        "loss": [r["loss"] for r in lines],
        "grad_norm": [r["grad_norm"] for r in lines],
        "tokens_seen": [r["tokens_seen"] for r in lines],
        "params": {k: [v.double().sum().item(), v.double().abs().sum().item()] for k, v in state["model"].items()},
    }


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fixed_seed_run_matches_recorded_values(tmp_path, precision):
    want = json.loads(GOLDEN.read_text())[precision]
    got = run(tmp_path, precision)
    tol = 1e-4 if precision == "fp32" else 2e-2
    assert got["tokens_seen"] == want["tokens_seen"]
    assert got["loss"] == pytest.approx(want["loss"], rel=tol)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=tol * 10)
    assert got["params"].keys() == want["params"].keys()
    for k, (s, a) in want["params"].items():
        assert got["params"][k][1] == pytest.approx(a, rel=tol), k
        assert got["params"][k][0] == pytest.approx(s, rel=tol * 10, abs=tol * a), k


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    out = {}
    for p in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory() as d:
            out[p] = run(Path(d), p)
    GOLDEN.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
