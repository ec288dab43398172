"""Training speed (tokens/s) alone and beside a competing CPU-bound process, for several thread settings.

On a shared machine (a login node, a CI runner, a laptop with a browser) another busy process takes cores that
the training's OpenMP threads expect: with OpenMP's default wait policy a thread that reaches a barrier spins
waiting for one that was descheduled, and a step can take several times longer. Each setting runs the same short
training (a bundled config, demo.yaml by default, on generated rows, through `encoder-train train`) alone,
then beside a busy loop.

    python benchmarks/threads.py [--steps 60] [--config_file demo.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = {  # name -> environment ("" leaves the variable to OpenMP's default)
    "OpenMP's default (spin a while, then sleep)": {"OMP_WAIT_POLICY": ""},
    "OMP_WAIT_POLICY=PASSIVE (sleep at once)": {"OMP_WAIT_POLICY": "PASSIVE"},
    "OMP_WAIT_POLICY=ACTIVE (spin)": {"OMP_WAIT_POLICY": "ACTIVE"},
    "GOMP_SPINCOUNT=10000 (spin briefly)": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "10000"},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
}
BUSY = "import time\nt = time.time()\nwhile time.time() - t < 3600: pass\n"


def tokens_per_second(work: Path, steps: int, env: dict[str, str], config: str) -> float:
    ckpt = work / "ckpt"
    cmd = [sys.executable, "-m", "encoder_train", "train", "--config_file", config, "--data_dir",
           str(work / "data"), "--tokenizer_filepath", str(work / "tokenizer.json"), "--checkpoint_dir", str(ckpt),
           "--max_steps", str(steps + 10), "--progress", "lines", "--set", "training.log_interval=10",
           "--set", "checkpoint.checkpoint_every=100000"]
    subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=True)
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(ckpt)
    # Each record's rate is over its own 10 steps; the first window (start-up, allocation) is left out.
    return statistics.fmean(r["tokens_per_second"] for r in records[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run (after 10 untimed)")
    parser.add_argument("--config_file", default="demo.yaml", help="bundled config of the model to train")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_shards, make_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        make_tokenizer(work / "tokenizer.json")
        make_shards(work / "data", files=2, rows=2000, width=128)
        for name, env in SETTINGS.items():
            alone = tokens_per_second(work, args.steps, env, args.config_file)
            busy = subprocess.Popen([sys.executable, "-c", BUSY])
            try:
                time.sleep(0.5)
                shared = tokens_per_second(work, args.steps, env, args.config_file)
            finally:
                busy.kill()
            rows.append((name, alone, shared))
            print(rows[-1], flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    print(f"\nmachine: {cpu}, {len(os.sched_getaffinity(0))} usable CPUs, torch {torch.__version__}; "
          f"{args.config_file}, rows of 128, {args.steps} timed steps")
    print("| setting | alone (tokens/s) | beside a busy process (tokens/s) | ratio |")
    print("|---|---|---|---|")
    for name, alone, shared in rows:
        print(f"| {name} | {alone:,.0f} | {shared:,.0f} | {shared / alone:.2f} |")


if __name__ == "__main__":
    main()
