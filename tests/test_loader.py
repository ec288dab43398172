import pytest
import torch

from conftest import EOS, MASK, PAD, make_shards
from encoder_train.batch import MaskSpec
from encoder_train.data.loader import BatchStream
from encoder_train.data.mixture import MLMBatches
from encoder_train.data.shards import scan_shards
from encoder_train.errors import UserError


def dataset(shards, p=0.15, **kw):
    spec = MaskSpec(pad_id=PAD, mask_id=MASK, special_ids=(0, 1, 2, 3, 4), vocab_size=128, probability=p)
    return MLMBatches(shards, spec, **{"batch_size": 8, "seed": 0, "shuffle_files": 2, **kw})


def take(ds, n, workers=0):
    stream = BatchStream(ds, num_workers=workers, prefetch=2, pin_memory=False)
    try:
        return [next(stream) for _ in range(n)]
    finally:
        stream.close()


def same(a, b):
    pairs = zip(a, b, strict=True)
    return all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels) for x, y in pairs)


def test_batches_do_not_depend_on_worker_count(shard_dir):
    shards = scan_shards(shard_dir, 128)
    inline, two = take(dataset(shards), 10), take(dataset(shards), 10, workers=2)
    assert same(inline, two)
    assert [b.first_row for b in two] == [8 * i for i in range(10)]


def test_resume_at_a_row_gives_the_same_batches(shard_dir):
    shards = scan_shards(shard_dir, 128)
    straight = take(dataset(shards), 30)  # 240 rows: crosses the epoch boundary at 192
    resumed = take(dataset(shards, start_row=8 * 17), 13)
    assert same(straight[17:], resumed)


def test_trimmed_to_longest_row_and_masks_fresh_each_epoch(tmp_path):
    rows = torch.full((8, 20), PAD)
    rows[:, 0], rows[:, 1:5], rows[:, 5] = 0, torch.arange(5, 9), EOS  # every row is 6 tokens long
    rows[3, 5:9], rows[3, 9] = torch.arange(10, 14), EOS  # one is 10
    torch.save(rows, tmp_path / "a.pt")
    shards = scan_shards(tmp_path, 128)
    batches = take(dataset(shards, batch_size=8, p=0.5), 6)
    assert all(b.input_ids.shape == (8, 10) for b in batches)
    assert batches[0].num_tokens == 7 * 6 + 10
    assert torch.equal(batches[0].attention_mask, batches[0].input_ids != PAD)
    # The same 8 rows every epoch, masked differently each time.
    assert len({tuple(b.labels.flatten().tolist()) for b in batches}) == 6
    b = batches[0]
    assert torch.equal(b.predict_positions, torch.nonzero(b.labels.flatten() != -100).squeeze(1))


def test_bad_ids_found_in_a_worker_become_a_user_error(tmp_path):
    make_shards(tmp_path, files=1)
    t = torch.load(tmp_path / "shard_000.pt", weights_only=True)
    t[0, 1] = 500
    torch.save(t, tmp_path / "shard_000.pt")
    shards = scan_shards(tmp_path, 128)
    with pytest.raises(UserError, match="token id 500"):
        take(dataset(shards), 2, workers=1)


def test_default_workers_build_batches_inline_on_a_cpu_and_in_background_for_a_gpu():
    from encoder_train.devices import loader_workers

    assert loader_workers(None, torch.device("cpu")) == 0
    assert loader_workers(None, torch.device("cuda")) == 2
    assert loader_workers(3, torch.device("cpu")) == 3 and loader_workers(0, torch.device("cuda")) == 0


def test_sigterm_to_the_whole_process_group_still_saves_with_loader_workers(tmp_path, shard_dir, tokenizer_file):
    """torchrun and SLURM signal a job's whole process group, loader workers included: the workers ignore it, and
    the training process finishes its step, saves and exits 128 + SIGTERM."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from encoder_train import checkpoint

    ckpt = tmp_path / "ckpt"
    args = [sys.executable, "-m", "encoder_train", "train", "--config_file", "tiny.yaml", "--data_dir", str(shard_dir),
            "--tokenizer_filepath", str(tokenizer_file), "--checkpoint_dir", str(ckpt), "--max_steps", "100000",
            "--set", "data.num_workers=2", "--set", "training.log_interval=1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (ckpt / "metrics.jsonl").exists() or len((ckpt / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the training process and its loader workers alike
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and checkpoint.list_checkpoints(ckpt)
