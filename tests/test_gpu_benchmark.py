"""benchmarks/gpu.py, the benchmark prepared for a lent GPU, runs end to end here at toy sizes (--smoke).

No timing is asserted: the smoke run keeps the script from rotting between the sessions that have a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="the Hugging Face Trainer needs accelerate (pip install -e '.[bench]')")

ROOT = Path(__file__).resolve().parents[1]
ROWS = {"roberta-base-128", "roberta-base-512", "roberta-large-512", "modernbert-base-1024"}


@pytest.mark.slow
def test_smoke_run_writes_every_row(tmp_path: Path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| model | seq | batch | encoder-train tok/s | HF Trainer tok/s | ratio |" in r.stdout
    assert "machine: " in r.stdout and "encoder-train options: " in r.stdout

    rows = json.loads(out.read_text())
    assert {row["row"] for row in rows} == ROWS and len(rows) == len(ROWS)
    assert {row["model"] for row in rows} == {"roberta-base", "roberta-large", "modernbert-base"}
    for row in rows:
        for key in ("seq_len", "batch_size", "ours_tokens_per_second", "hf_tokens_per_second", "ratio",
                    "mfu_spec", "hf_mfu_spec", "mfu_matmul", "ours_peak_memory_gb", "ours_step_s",
                    "ours_step_with_save_s", "save_stall_s", "commit"):
            assert key in row, (row["row"], key)
        assert row["smoke"] and row["seq_len"] > 0 and row["batch_size"] > 0
        assert row["ours_tokens_per_second"] > 0 and row["hf_tokens_per_second"] > 0
        assert row["ratio"] == pytest.approx(row["ours_tokens_per_second"] / row["hf_tokens_per_second"],
                                             rel=1e-3, abs=1e-3)
        assert row["mfu_spec"] > 0 and row["ours_step_s"] > 0 and row["ours_step_with_save_s"] > 0
        assert row["checkpoint_mb"] > 0  # the save inside the timed steps was written
    modern = next(row for row in rows if row["model"] == "modernbert-base")
    assert modern["family"] == "modernbert"
