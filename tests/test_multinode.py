"""Two nodes on one host: two `torchrun` launchers joined by a c10d rendezvous, gloo over loopback, sharing one
checkpoint folder as nodes share a file system. Real processes and signals; the weights are compared with those of
the same two processes under one launcher, which must be bit-identical."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import make_shards, make_tokenizer, tree
from encoder_train import checkpoint
from encoder_train.distributed import SHARED_TOKEN
from helpers.launch import TORCHRUN, config, free_port, run

WAIT = 120  # seconds a launcher may take before the test calls it hung (a whole run here takes about 10)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("multinode")
    return make_shards(root / "data"), make_tokenizer(root / "tok.json")


@dataclass
class Node:
    """One node: a torchrun launcher in a process group of its own, its output in files."""

    proc: subprocess.Popen
    out: Path
    err: Path

    @property
    def stdout(self) -> str:
        return self.out.read_text()

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def wait(self, timeout: float = WAIT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"launcher still running after {timeout} s (hung):\n{self.stderr[-3000:]}")

    def die(self) -> None:
        """SIGKILL everything on this node, as when the machine dies: the launcher's process group, and each
        worker's too, since torchrun starts every worker in a session of its own (killing the launcher alone
        leaves its workers training on)."""
        if self.proc.poll() is not None:
            return
        workers = tree(self.proc.pid)
        os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def two_nodes(tmp_path, inputs):
    """two_nodes(cfg, ckpt0, ckpt1, *extra) -> [node 0, node 1]: one launcher per node, as on two machines,
    each with its own --checkpoint_dir (the same folder, for nodes that share a file system). Whatever is still
    running when the test ends is killed."""
    started: list[Node] = []

    def start(cfg: Path, ckpt0: Path, ckpt1: Path, *extra: str) -> list[Node]:
        port, rdzv = free_port(), f"test-{uuid.uuid4().hex[:12]}"
        data, tok = inputs
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        nodes = []
        for rank, ckpt in enumerate([ckpt0, ckpt1]):
            # Node 0 hosts the rendezvous (is_host), as the machine named in --rdzv_endpoint would.
            args = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                    "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                    "--rdzv_id", rdzv, "--rdzv_conf", f"is_host={int(rank == 0)}", "--max_restarts", "0",
                    "-m", "encoder_train", "train", "--config_file", str(cfg), "--data_dir", str(data),
                    "--tokenizer_filepath", str(tok), "--checkpoint_dir", str(ckpt), *extra]
            name = f"launch{len(started) // 2}-node{rank}"
            out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
            with out.open("w") as o, err.open("w") as e:
                node = Node(subprocess.Popen(args, env=env, start_new_session=True, stdout=o, stderr=e), out, err)
            started.append(node)
            nodes.append(node)
        return nodes

    yield start
    for node in started:
        node.die()


def finish(nodes: list[Node]) -> str:
    """Wait for both launchers to succeed; their stdout together (rank 0 prints, on whichever node it is)."""
    for i, node in enumerate(nodes):
        assert node.wait() == 0, f"node {i}:\n{node.stderr[-3000:]}"
    return nodes[0].stdout + nodes[1].stdout


def final_weights(ckpt: Path, step: int) -> dict[str, torch.Tensor]:
    """The model of the checkpoint of `step`: a file, or (FSDP2's default) a sharded folder, joined."""
    found = dict(checkpoint.list_checkpoints(ckpt))
    assert step in found, f"no checkpoint of step {step} in {ckpt}: {sorted(found)}"
    return checkpoint.load(found[step])["model"]


def assert_same_weights(one: Path, nodes: Path, step: int) -> None:
    a, b = final_weights(one, step), final_weights(nodes, step)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"the two-node run differs from the one-launcher run in {differ}"


def long_config(tmp_path: Path, name: str, parallel: str = "ddp") -> Path:
    """The tiny config of test_distributed with a 1000-step schedule: runs stop at training.stop_at (which does not
    change the run) or when killed, so a kill always lands mid-run."""
    cfg = config(tmp_path, name, parallel=parallel)
    cfg.write_text(cfg.read_text().replace("max_steps: 10,", "max_steps: 1000,"))
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_nodes_stop_and_resume_to_the_weights_of_one_launcher(tmp_path, inputs, two_nodes, parallel):
    cfg = config(tmp_path, parallel, parallel=parallel)  # 10 steps, checkpoints at 5 and 10, dropout on
    run(TORCHRUN, cfg, inputs, tmp_path / "one")  # the same 2 processes under one launcher

    shared = tmp_path / "shared"
    out = finish(two_nodes(cfg, shared, shared, "--set", "training.stop_at=5"))
    assert out.count("resolved config:") == 1  # rank 0 alone speaks
    assert f"8 per micro-batch x 2 accumulation x 2 processes ({parallel})" in out
    [(step, path)] = checkpoint.list_checkpoints(shared)
    assert step == 5
    if parallel == "fsdp":  # sharded: each node's rank wrote its own shards into the one folder
        assert sorted(p.name for p in path.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    out = finish(two_nodes(cfg, shared, shared, "--load_checkpoint", "latest"))
    assert "resuming from" in out and "step 10" in out
    assert_same_weights(tmp_path / "one", shared, 10)
    assert not list(shared.glob(f"{SHARED_TOKEN}*"))  # the shared-folder check cleans up after itself


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_dead_node_ends_the_job_and_both_resume_to_the_same_weights(tmp_path, inputs, two_nodes, parallel):
    cfg = long_config(tmp_path, "long", parallel)
    run(TORCHRUN, cfg, inputs, tmp_path / "one", "--set", "training.stop_at=15")  # uninterrupted, to step 15

    shared = tmp_path / "shared"
    node0, node1 = two_nodes(cfg, shared, shared)
    deadline = time.monotonic() + WAIT
    while not checkpoint.list_checkpoints(shared) and node0.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert checkpoint.list_checkpoints(shared), f"no checkpoint:\n{node0.stderr[-3000:]}\n{node1.stderr[-3000:]}"
    node1.die()  # node 1 dies mid-run, a checkpoint after step 5: its launcher and its worker, at once

    assert node0.wait(60) != 0  # torchrun on node 0 ends the job, rather than waiting on node 1
    err = node0.stderr
    assert any(why in err for why in ("Connection reset by peer", "Connection closed by peer")), err[-3000:]
    assert "encoder_train FAILED" in err  # torchrun's report: which rank ended, and its exit code
    saved = checkpoint.list_checkpoints(shared)
    assert 5 <= saved[-1][0] < 15, saved  # the kill landed mid-run: the resume below has steps to do

    out = finish(two_nodes(cfg, shared, shared, "--load_checkpoint", "latest", "--set", "training.stop_at=15"))
    assert f"resuming from {saved[-1][1]} at step {saved[-1][0]}" in out
    assert_same_weights(tmp_path / "one", shared, 15)


@pytest.mark.slow
def test_a_checkpoint_folder_that_one_node_cannot_see_stops_the_run(tmp_path, inputs, two_nodes):
    """Node 1's --checkpoint_dir is another folder (a node-local disk): rank 0 would resume from step 5 while node 1
    started afresh. Every rank must stop with one sentence, exit 2, before any checkpoint is read or written."""
    cfg = config(tmp_path, "ddp")
    here, elsewhere = tmp_path / "node0-local", tmp_path / "node1-local"
    run([sys.executable], cfg, inputs, here, "--set", "training.stop_at=5")  # a checkpoint only node 0 sees
    before = sorted(p.name for p in here.iterdir())

    nodes = two_nodes(cfg, here, elsewhere, "--load_checkpoint", "latest")
    ranks = set()
    for node, folder in zip(nodes, [here, elsewhere], strict=True):
        assert node.wait() != 0
        err = node.stderr
        assert "(exitcode: 2)" in err, err[-3000:]  # the worker's exit code, in torchrun's report
        [line] = [line for line in err.splitlines() if "encoder-train: error:" in line]  # one sentence a rank
        rank = int(line.removeprefix("[rank ").split("]")[0])  # the rendezvous numbers the nodes
        ranks.add(rank)
        assert line.startswith(f"[rank {rank}] encoder-train: error: checkpoint folder {folder} is not shared by "
                               "every node: rank 1 (host "), line  # rank 1 misses what rank 0 wrote
        assert "cannot see the file rank 0 (host " in line and "a file system every node mounts" in line, line
        assert f"[rank{rank}]: Traceback" not in err  # the worker's own output: the sentence, no traceback
    assert ranks == {0, 1}
    assert "resuming from" not in nodes[0].stdout + nodes[1].stdout
    assert sorted(p.name for p in here.iterdir()) == before  # nothing written, the check's file removed
    assert not elsewhere.exists() or [p.name for p in elsewhere.iterdir()] == [".encoder-train.lock"]  # rank 0's?
