"""Reading shards from object storage: the loader's rows per second from an S3-compatible server against local disk,
and its share of a training step.

An S3-compatible server (moto, in server mode, on localhost: no network beyond this machine) holds a copy of the
same shards as a local folder. Then, in one process (data.num_workers 0, as a CPU run picks):

1. rows per second the loader delivers (read, masked, collated) over one epoch of the shards, at small.yaml's batch
   size, from each copy; the remote time includes listing the bucket and reading every header, and every block of
   rows is fetched over HTTP once per window of files (nothing is cached before the timed read);
2. seconds per optimizer step of small.yaml's model fed by batches held in memory, by the loader on local disk and
   by the loader on S3: the loader's share of step time is 1 - (memory / loader).

    pip install -e '.[dev]'                     # moto[server], s3fs, boto3
    python benchmarks/object_storage.py         # 8 shards of 8,192 rows x 128 tokens (pretokenize's defaults)
    python benchmarks/object_storage.py --files 4 --steps 4

A real bucket is further away than localhost (tens of milliseconds a request instead of one) but also served by
more than this machine's two cores, which here run the server, the client and the model at once; the blocks are
fetched ahead of use on FETCH_THREADS threads (data/blocks.py), so latency is hidden as long as bandwidth keeps up.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import yaml
from host import cpu_name
from loader_overhead import make_shards, seconds_per_step
from synthetic import mask_spec

from encoder_train.config import BUNDLED_CONFIG_DIR
from encoder_train.data.blocks import FETCH_THREADS
from encoder_train.data.loader import BatchStream
from encoder_train.data.mixture import MLMBatches
from encoder_train.data.shards import BLOCK_BYTES, scan_shards
from encoder_train.model import ModelDims

BUCKET = "bench"


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"moto did not start; see {log}") from None
            time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=8, help="shards (default 8)")
    ap.add_argument("--rows", type=int, default=8192, help="rows per shard (pretokenize's default 8192)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per feed")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each feed; the fastest counts")
    args = ap.parse_args()

    small = yaml.safe_load((BUNDLED_CONFIG_DIR / "small.yaml").read_text())
    m, batch = small["model"], small["training"]["batch_size"]
    width = m["max_position_embeddings"] - 2  # RoBERTa positions: pad id + 1 offset
    dims = ModelDims(vocab_size=args.vocab, hidden_size=m["hidden_size"], num_layers=m["num_layers"],
                     num_heads=m["num_heads"], intermediate_size=m["intermediate_size"],
                     max_position_embeddings=m["max_position_embeddings"], pad_id=1)
    spec = mask_spec(args.vocab)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16" if device.type == "cuda" else "fp32"

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        folder.mkdir()
        make_shards(folder, args.vocab, rows=args.rows, width=width, files=args.files)
        size_mb = sum(p.stat().st_size for p in folder.glob("*.pt")) / 2**20
        server, endpoint = start_moto(Path(tmp) / "moto.log")
        try:
            os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                              AWS_DEFAULT_REGION="us-east-1")
            import boto3

            client = boto3.client("s3")
            client.create_bucket(Bucket=BUCKET)
            for p in sorted(folder.glob("*.pt")):
                client.upload_file(str(p), BUCKET, f"shards/{p.name}")
            feeds = {"local disk": str(folder), "S3 (moto on localhost)": f"s3://{BUCKET}/shards"}
            epoch_batches = args.files * args.rows // batch

            def stream(shards) -> BatchStream:
                return BatchStream(MLMBatches(shards, spec, batch_size=batch, seed=0, shuffle_files=4),
                                   num_workers=0, prefetch=4, pin_memory=False)

            def read_epoch(url: str) -> tuple[float, float, float]:
                """(seconds to list and read the headers, to the first batch, for the epoch): scan included."""
                t0 = time.perf_counter()
                shards = scan_shards(url, dims.max_tokens)
                t1 = time.perf_counter()
                s = stream(shards)
                next(s)
                t2 = time.perf_counter()
                for _ in range(epoch_batches - 1):
                    next(s)
                t3 = time.perf_counter()
                s.close()
                return t1 - t0, t2 - t1, t3 - t0

            reads: dict[str, list[tuple[float, float, float]]] = {k: [] for k in feeds}
            for _ in range(args.repeats):
                for name, url in feeds.items():
                    reads[name].append(read_epoch(url))
            best_read = {k: min(v, key=lambda r: r[2]) for k, v in reads.items()}

            n = args.warmup + args.steps
            s = stream(scan_shards(str(folder), dims.max_tokens))
            in_memory = [next(s) for _ in range(n)]
            s.close()
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

            def run(source) -> float:
                return seconds_per_step(source, dims, device, args.warmup, args.steps, autocast)

            steps: dict[str, list[float]] = {"memory": [], **{k: [] for k in feeds}}
            order = ["memory", *feeds]
            for r in range(args.repeats):  # each repeat starts with another feed: no feed always runs first
                for name in order[r % len(order):] + order[: r % len(order)]:
                    if name == "memory":
                        steps[name].append(run(iter(in_memory)))
                    else:
                        live = stream(scan_shards(feeds[name], dims.max_tokens))
                        steps[name].append(run(live))
                        live.close()
            best_step = {k: min(v) for k, v in steps.items()}
        finally:
            server.kill()
            server.wait()

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, device {device}, "
          f"torch {torch.__version__}")
    print(f"{args.files} shards x {args.rows} rows x {width} tokens (int32, {size_mb:.0f} MB); batch {batch} "
          f"(small.yaml); one process, loader inline; remote blocks of {BLOCK_BYTES >> 20} MB on {FETCH_THREADS} "
          f"threads; fastest of {args.repeats} alternating runs\n")
    print("| feed | list + headers | first batch | rows/s over one epoch (scan included) |")
    print("|---|---|---|---|")
    for name, (scan_s, first_s, total_s) in best_read.items():
        print(f"| {name} | {scan_s * 1000:.0f} ms | {first_s * 1000:.0f} ms | "
              f"{epoch_batches * batch / total_s:,.0f} |")
    local_rate = epoch_batches * batch / best_read["local disk"][2]
    remote_rate = epoch_batches * batch / best_read["S3 (moto on localhost)"][2]
    print(f"\nS3 / local disk: {remote_rate / local_rate:.2f}x the rows per second\n")
    print(f"small.yaml's model ({m['num_layers']} x {m['hidden_size']}, vocab {args.vocab}), batch {batch} x {width}, "
          f"{precision}, {args.steps} timed steps\n")
    print("| feed | s/step | loader's share of step time |")
    print("|---|---|---|")
    print(f"| batches in memory | {best_step['memory']:.3f} | - |")
    for name in feeds:
        print(f"| loader, {name} | {best_step[name]:.3f} | {100 * (1 - best_step['memory'] / best_step[name]):+.1f}% |")


if __name__ == "__main__":
    main()
