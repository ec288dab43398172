"""CPU threads: the usable CPUs, a container's quota and torchrun's processes per machine decide the count; the
user's OMP_NUM_THREADS and OMP_WAIT_POLICY are kept; the count is printed at start."""

from __future__ import annotations

import os
import subprocess
import sys

from encoder_train.threads import choose, cpu_quota
from helpers.train_runs import command, config, env


def test_a_cgroup_quota_is_read_from_v2_then_v1(tmp_path):
    v2, quota, period = tmp_path / "cpu.max", tmp_path / "quota", tmp_path / "period"
    v2.write_text("150000 100000\n")
    assert cpu_quota(v2, (quota, period)) == 2  # 1.5 CPUs: rounded up
    v2.write_text("max 100000\n")
    assert cpu_quota(v2, (quota, period)) is None
    missing = tmp_path / "absent"
    quota.write_text("400000\n")
    period.write_text("100000\n")
    assert cpu_quota(missing, (quota, period)) == 4
    quota.write_text("-1\n")
    assert cpu_quota(missing, (quota, period)) is None
    assert cpu_quota(missing, (missing, missing)) is None


def test_the_count_follows_cpus_quota_processes_and_load_and_keeps_the_users_choice():
    assert choose({}, usable=8, quota=None, load=0.0)[:2] == (8, None)  # idle: OpenMP's default wait
    assert choose({}, usable=8, quota=3, load=0.0)[0] == 3
    assert choose({"LOCAL_WORLD_SIZE": "4"}, usable=8, quota=None, load=0.0)[0] == 2
    assert choose({"LOCAL_WORLD_SIZE": "16"}, usable=8, quota=None, load=0.0)[0] == 1
    # A busy machine: sleeping waits, the same count (it may change a matmul's sums: exact resume needs it fixed).
    assert choose({}, usable=2, quota=None, load=1.2)[:2] == (2, "PASSIVE")
    assert choose({}, usable=2, quota=None, load=7.0)[:2] == (2, "PASSIVE")
    threads, policy, why = choose({"OMP_NUM_THREADS": "3"}, usable=8, quota=None, load=3.0)
    assert threads is None and policy == "PASSIVE" and "OMP_NUM_THREADS=3 (yours)" in why
    assert choose({"OMP_WAIT_POLICY": "ACTIVE"}, usable=2, quota=None, load=2.0)[1] is None  # the user's, kept


def test_train_prints_its_thread_count_and_keeps_omp_num_threads(tmp_path, shard_dir, tokenizer_file):
    args = command(config(tmp_path, steps=2, every=5), shard_dir, tokenizer_file, tmp_path / "a")
    default = subprocess.run(args, capture_output=True, text=True, env={**env(), "OMP_NUM_THREADS": ""}, timeout=300)
    usable, quota = len(os.sched_getaffinity(0)), cpu_quota()
    assert default.returncode == 0, default.stderr[-2000:]
    assert f"cpu threads: {min(usable, quota or usable)} ({usable} usable CPUs" in default.stdout
    assert "wait policy" in default.stdout
    args[args.index(str(tmp_path / "a"))] = str(tmp_path / "b")
    mine = subprocess.run(args, capture_output=True, text=True, env={**env(), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert mine.returncode == 0 and "cpu threads: 1 (OMP_NUM_THREADS=1 (yours)" in mine.stdout


def test_a_busy_machine_gets_sleeping_threads_set_before_torch_loads_openmp(tmp_path):
    script = ("import os, sys\nos.getloadavg = lambda: (1.5, 1.0, 1.0)\nfrom encoder_train.threads import configure\n"
              "print(configure())\nprint(os.environ['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")},
                         timeout=120)
    assert out.stdout.split()[-1] == "PASSIVE" and "load 1.5 from other processes" in out.stdout
