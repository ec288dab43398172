"""How many CPU threads the compute uses, chosen before torch starts OpenMP.

On a machine shared with other busy processes (a login node, a CI runner, a laptop), OpenMP's default wait policy
lets a thread that reaches a barrier spin for its neighbour, which the kernel may have descheduled to run the other
process: a training step then takes several times longer (benchmarks/threads.py, 2 cores beside one busy loop:
3.5x slower with the default, 1.7x with waiting threads asleep, 1.4x with one thread). Alone, though, sleeping
threads cost ~25% on small models (waking them takes longer than a short spin). So, unless the user chose:
- as many threads as the CPUs this process may run on (its affinity mask, e.g. from taskset or SLURM's cgroup)
  and its container's CPU quota allow, divided among the processes torchrun starts on this machine;
- when the machine is already busy at start (a 1-minute load average of 0.5 or more, before this process has
  done anything), OMP_WAIT_POLICY=PASSIVE (waiting threads sleep); it must be in the environment before torch
  loads OpenMP. An idle machine keeps OpenMP's default, the fastest alone.
The thread count never depends on the load: the count can change how a matmul splits its sums, and a resumed run
must compute what the interrupted one would have (exact resume); the wait policy changes timing only.
An OMP_NUM_THREADS the user set is kept, as is an OMP_WAIT_POLICY.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def cpu_quota(v2: Path = CGROUP_V2, v1: tuple[Path, Path] = CGROUP_V1) -> int | None:
    """CPUs the container's quota allows (rounded up), or None without a quota."""
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        quota, period = (int(p.read_text()) for p in v1)
        return None if quota <= 0 or period <= 0 else max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def choose(env: dict[str, str], usable: int, quota: int | None, load: float) -> tuple[int | None, str | None, str]:
    """(threads to set or None to keep the user's, the wait policy to set or None, the start-up line's reason)."""
    local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
    busy = load >= 0.5  # other processes keep a CPU busy
    policy = None if "OMP_WAIT_POLICY" in env else ("PASSIVE" if busy else None)
    wait = (env.get("OMP_WAIT_POLICY") or policy or "OpenMP's default").lower().replace("openmp's", "OpenMP's")
    wait = f"wait policy {wait}"
    if env.get("OMP_NUM_THREADS"):
        return None, policy, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} (yours), {wait}"
    threads = max(1, min(usable, quota or usable) // local)
    why = f"{usable} usable CPUs" + (f", container quota {quota}" if quota else "")
    why += f", load {load:.1f} from other processes" if busy else ""
    why += f", {local} processes on this machine" if local > 1 else ""
    return threads, policy, f"{why}, {wait}"


def configure() -> str:
    """Set the wait policy (before torch is imported) and the thread count; returns the start-up line."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    threads, policy, why = choose(dict(os.environ), usable_cpus(), cpu_quota(), load)
    if policy is not None:
        os.environ["OMP_WAIT_POLICY"] = policy
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return f"cpu threads: {torch.get_num_threads()} ({why})"
