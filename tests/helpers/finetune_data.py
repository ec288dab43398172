"""Tiny fine-tuning tasks the tests make on the spot, in every file layout, and a tiny checkpoint to start from.

Texts are words of conftest's word-level tokenizer (w5 .. w127). The label is given by one keyword hidden among
filler words, so a task is solvable from the text alone and from nothing else: the filler is random and the
keyword's place is random.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import Tokenizer

from conftest import PAD, VOCAB, make_tokenizer
from encoder_train import checkpoint
from encoder_train.batch import MaskSpec
from encoder_train.model import MaskedLM, ModelDims
from encoder_train.tokenizer import special_tokens

KEYWORDS = {"alpha": ["w5", "w6", "w7"], "beta": ["w8", "w9", "w10"], "gamma": ["w11", "w12", "w13"]}
FILLER = [f"w{i}" for i in range(20, VOCAB)]
SCORES = {"alpha": 1.0, "beta": 2.5, "gamma": 4.0}  # regression targets: a number each keyword stands for

DIMS = ModelDims(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                 max_position_embeddings=64, pad_id=PAD)


def sentence(rng: random.Random, keyword: str | None) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(5, 9))]
    if keyword is not None:
        words.insert(rng.randrange(len(words) + 1), keyword)
    return " ".join(words)


def examples(n: int, seed: int, classes: tuple[str, ...] = ("alpha", "beta")) -> list[dict]:
    """{"text", "label", "score", "index"}: `label` a class name, `score` a number with a fraction."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = classes[i % len(classes)]
        out.append({"index": i, "text": sentence(rng, rng.choice(KEYWORDS[label])), "label": label,
                    "score": SCORES[label] + rng.choice([-0.25, 0.0, 0.25])})
    rng.shuffle(out)
    return out


def pair_examples(n: int, seed: int) -> list[dict]:
    """Sentence pairs, label "1" when the second sentence holds a keyword of the first one's class."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        first, same = rng.choice(["alpha", "beta"]), i % 2 == 0
        second = first if same else ("beta" if first == "alpha" else "alpha")
        out.append({"s1": sentence(rng, rng.choice(KEYWORDS[first])), "s2": sentence(rng, rng.choice(KEYWORDS[second])),
                    "label": int(same)})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_table(path: Path, rows: list[dict], columns: list[str], header: bool = True,
                names: dict[str, str] | None = None) -> Path:
    """A .tsv as GLUE writes it (tabs, no quoting) or a .csv (quoted where needed); `names` renames columns."""
    names = names or {}
    with open(path, "w", newline="") as f:
        if path.suffix == ".tsv":
            lines = (["\t".join(names.get(c, c) for c in columns)] if header else [])
            lines += ["\t".join(str(r[c]) for c in columns) for r in rows]
            f.write("\n".join(lines) + "\n")
        else:
            w = csv.writer(f)
            if header:
                w.writerow([names.get(c, c) for c in columns])
            w.writerows([[r[c] for c in columns] for r in rows])
    return path


def tiny_checkpoint(folder: Path, dims: ModelDims = DIMS, seed: int = 0) -> Path:
    """A checkpoint as training writes it (the keys fine-tuning reads), of an untrained tiny encoder."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_file(str(make_tokenizer(folder / "tokenizer.json")))
    torch.manual_seed(seed)
    model = MaskedLM(dims)
    special = special_tokens(tokenizer)
    spec = MaskSpec(special.pad, special.mask, special.all_ids, tokenizer.get_vocab_size(), 0.15)
    state = {"model": model.state_dict(), "step": 1, "dims": asdict(dims),
             "tokenizer": {"json": tokenizer.to_str(), "mask_spec": asdict(spec)}}
    return checkpoint.save(state, folder, 1)
