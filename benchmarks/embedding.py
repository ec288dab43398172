"""Embedding a corpus, documents per second: the evaluation harness's path beside plain sentence-transformers.

Both sides embed the same documents (the standard library's docstrings, as the offline suite's corpus holds them:
"name text", from a few words to a few hundred tokens) with the same exported model:

  ours       what the retrieval kind does: the harness's EvalModel (evaluation/models.LoadedModel) exports the
             checkpoint and builds `sentence_transformer(max_length)`; sentence-transformers' retrieval evaluator then
             calls `encode_document(corpus, batch_size=the task's batch_size, convert_to_tensor=True)`
  reference  `SentenceTransformer(exported_folder).encode(docs)`, every argument at its default (and again at our
             batch size, to tell the two differences apart: the batch size, and the model each side loads: ours
             the bare encoder, the export's own modules.json its masked-LM class, whose head runs and is dropped)

    python benchmarks/embedding.py                          # the demo's shape (hidden 256, 4 layers), 128 tokens
    python benchmarks/embedding.py --hidden 768 --layers 12 --heads 12 --max_length 512

The model is random (speed does not depend on the weights); its tokenizer is trained on the documents. Each side
runs --repeats times, alternating, after one warm-up each; the table gives the best run of each (the least
disturbed by other processes on a shared machine), the median, and documents per CPU-second (all threads' CPU time:
what the work costs, whatever the neighbours do).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from host import cpu_name, usable_cores

from encoder_train import checkpoint
from encoder_train.batch import MaskSpec
from encoder_train.evaluation.models import LoadedModel, ModelRow
from encoder_train.evaluation.offline import TEST_MODULES, TRAIN_MODULES, docstrings
from encoder_train.model import MaskedLM, ModelDims
from encoder_train.tokenizer import special_tokens, train_tokenizer


def documents(count: int) -> list[str]:
    """`count` docstrings as the offline corpus writes them ("dotted.name rest of the docstring"), cycled if need be."""
    found = [f"{d.name} {' '.join(d.sentences[1:])}" for d in docstrings(TEST_MODULES + TRAIN_MODULES)]
    return [found[i % len(found)] for i in range(count)]


def write_model(folder: Path, docs: list[str], args: argparse.Namespace) -> Path:
    """A random RoBERTa-shaped checkpoint of the given size, with a tokenizer trained on `docs`."""
    text = folder / "docs.txt"
    text.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    tokenizer = train_tokenizer([text], folder / "tokenizer.json", vocab_size=8192)
    special = special_tokens(tokenizer)
    dims = ModelDims(vocab_size=tokenizer.get_vocab_size(), hidden_size=args.hidden, num_layers=args.layers,
                     num_heads=args.heads, intermediate_size=4 * args.hidden,
                     max_position_embeddings=args.max_length + 2, pad_id=special.pad)  # RoBERTa: past the pad id
    torch.manual_seed(0)
    model = MaskedLM(dims)
    spec = MaskSpec(special.pad, special.mask, special.all_ids, tokenizer.get_vocab_size(), 0.15)
    state = {"model": model.state_dict(), "step": 0, "dims": dataclasses.asdict(dims),
             "tokenizer": {"json": tokenizer.to_str(), "mask_spec": dataclasses.asdict(spec)}}
    (folder / "checkpoints").mkdir()
    return checkpoint.save(state, folder / "checkpoints", 0)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(encode, docs: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of every thread) of one encoding of `docs`."""
    start, cpu = time.perf_counter(), cpu_seconds()
    embeddings = encode(docs)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    assert len(embeddings) == len(docs)
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=128, help="tokens per document (and the model's window)")
    parser.add_argument("--batch_size", type=int, default=64, help="ours: the retrieval task's batch_size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    docs = documents(args.documents)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = write_model(folder, docs, args)
        loaded = LoadedModel(ModelRow("ours", path, 0, "checkpoint", "ours"), folder / "eval", torch.device("cpu"))
        ours_model = loaded.sentence_transformer(args.max_length)  # exports the checkpoint: the folder both read
        reference_model = SentenceTransformer(str(loaded.hf_folder()), device="cpu")
        lengths = ours_model.preprocess(docs)["attention_mask"].sum(dim=1).tolist()  # (docs,) real tokens, truncated
        sides = {
            "ours": lambda d: ours_model.encode_document(d, batch_size=args.batch_size, convert_to_tensor=True),
            "sentence-transformers": lambda d: reference_model.encode(d),
            # The reference at our batch size: what is left of the difference is the models the two load.
            f"sentence-transformers, batch_size={args.batch_size}":
                lambda d: reference_model.encode(d, batch_size=args.batch_size),
        }
        for encode in sides.values():  # warm-up: first-call allocations, lazy imports
            timed(encode, docs[: 2 * args.batch_size])
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, encode in sides.items():
                runs[name].append(timed(encode, docs))

    print(f"machine: {cpu_name()}, {usable_cores()} usable cores, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads")
    print(f"model: random RoBERTa shape, hidden {args.hidden}, {args.layers} layers, window {args.max_length}; "
          f"reference max_seq_length {reference_model.max_seq_length}, ours {ours_model.max_seq_length}")
    print(f"documents: {len(docs)}, tokens per document (truncated at {args.max_length}): min {min(lengths)}, "
          f"median {int(statistics.median(lengths))}, max {max(lengths)}; {args.repeats} runs per side")
    print()
    # Wall time says how fast; CPU time (all threads) barely depends on the neighbours of a shared machine.
    print("| side | docs/s (best) | docs/s (median) | docs per CPU-second (best) |")
    print("|---|---:|---:|---:|")
    rate = {name: (len(docs) / min(w for w, _ in t), len(docs) / statistics.median(w for w, _ in t),
                   len(docs) / min(c for _, c in t)) for name, t in runs.items()}
    for name, values in rate.items():
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    for name in list(rate)[1:]:
        ratios = [a / b for a, b in zip(rate["ours"], rate[name], strict=True)]
        print(f"| ratio ours / {name} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
