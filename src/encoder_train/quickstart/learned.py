"""What a short pretraining learned, on the held-out <mask> positions: the demo's stage 5 beyond loss and accuracy.

The positions are the evaluation's fixed masks (evaluate.eval_batches: the same in every run; MaskedTally counts
them during evaluate's own pass) where the input is <mask>, as in fill-mask; positions left as they were or
replaced by a random token, which evaluate's loss and accuracy also count, are left out (a model learns to copy
those first). On them:
- the loss of the model against the loss of word frequencies alone (each token's share of the training rows,
  whatever its context): what a model has learned beyond those counts is what it reads from the context;
- the model's commonest first guesses: a model a few minutes old answers '.', '\\n' or ' the' for most masks;
- words of 4+ letters: how often the model's first guess, and one of its top TOP_K, is the word;
- examples: the first few such words, in reading order, that the trained model gets right at its first guess,
  with their sentence given to `fill_mask` with that one word masked and kept only when the trained model
  gets it right there too. The rule selects on being right, so the examples come after the rate above: they
  show what "right" looks like, not how often it happens. Each example's text is something
  `encoder-train fill-mask` answers the same way.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import torch

from encoder_train.batch import IGNORE_INDEX, Batch, MaskSpec
from encoder_train.data.formats.base import ShardInfo
from encoder_train.data.shards import ShardReader
from encoder_train.evaluate import fill_mask
from encoder_train.state import Trained

WORD = re.compile(r" ?[A-Za-z]{4,}")  # a token that is a word of 4+ letters, with the space that starts it
TOP_K = 5
COMMON = 3  # first guesses shown
CONTEXT = 24  # tokens kept at most on each side of an example's word, within its line and sentence


@dataclass
class MaskedScores:
    """One model on the held-out <mask> positions."""

    masks: int = 0
    loss: float = 0.0  # mean cross-entropy, nats
    frequency_loss: float = 0.0  # the same of word frequencies alone
    first_guesses: list[tuple[str, float]] = field(default_factory=list)  # the COMMON commonest, with their share
    words: int = 0  # masks over a word of 4+ letters
    word_top1: float = 0.0
    word_topk: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Example:
    text: str  # the word's sentence with the word replaced by <mask>
    word: str  # the token that was there
    trained: list[tuple[str, float]]  # fill_mask's top guesses, most likely first
    untrained: list[tuple[str, float]]

    def to_dict(self) -> dict:
        return asdict(self)


def word_mask(trained: Trained) -> torch.Tensor:
    """(vocab_size,) bool: True for the tokens that are words of 4+ letters."""
    tok = trained.tokenizer
    return torch.tensor([bool(WORD.fullmatch(tok.decode([i]))) for i in range(trained.spec.vocab_size)])


def log_frequencies(shards: list[ShardInfo], spec: MaskSpec) -> torch.Tensor:
    """(vocab_size,) log of each token's share of the rows (add-half smoothed; special tokens never count)."""
    counts = torch.zeros(spec.vocab_size, dtype=torch.float64)
    for shard in shards:
        reader = ShardReader(shard)
        try:
            ids = reader.rows(0, shard.rows).reshape(-1).long()
        finally:
            reader.close()
        counts += torch.bincount(ids, minlength=spec.vocab_size)[: spec.vocab_size]
    counts += 0.5  # a token the training rows lack is rare, not impossible
    counts[list(spec.special_ids)] = 0
    return (counts / counts.sum()).log()


class MaskedTally:
    """One model's MaskedScores, batch by batch, from evaluate's own pass: `add` is its `on_batch`."""

    def __init__(self, spec: MaskSpec, words: torch.Tensor, log_freq: torch.Tensor) -> None:
        self.spec, self.words, self.log_freq = spec, words, log_freq  # words, log_freq: (vocab_size,)
        self.s, self.loss, self.freq_loss, self.top1, self.topk = MaskedScores(), 0.0, 0.0, 0, 0
        self.guesses: Counter[int] = Counter()
        # (row's original ids, position) of each word of 4+ letters the model gets right at its first guess,
        # in reading order.
        self.right: list[tuple[list[int], int]] = []

    def add(self, b: Batch, predicted_logits: torch.Tensor) -> None:
        """`b` on the host; `predicted_logits`: (N, V) at its predicted positions, on any device. Special tokens
        are never a guess, as in fill_mask."""
        spec, s = self.spec, self.s
        is_mask = b.input_ids.reshape(-1).index_select(0, b.predict_positions) == spec.mask_id  # (N,)
        at = b.predict_positions[is_mask]  # (M,) flat indices into B*T
        target = b.labels.reshape(-1)[at]  # (M,)
        logits = predicted_logits.float().cpu()[is_mask, : spec.vocab_size]  # (M, V): a copy, written below
        self.loss += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        self.freq_loss -= self.log_freq[target].sum().item()
        logits[:, list(spec.special_ids)] = float("-inf")
        best = logits.topk(TOP_K, dim=-1).indices  # (M, TOP_K)
        self.guesses.update(best[:, 0].tolist())
        is_word = self.words[target]
        hit = best == target[:, None]
        s.masks, s.words = s.masks + len(target), s.words + int(is_word.sum())
        self.top1 += int((hit[:, 0] & is_word).sum())
        self.topk += int((hit.any(1) & is_word).sum())
        original = torch.where(b.labels != IGNORE_INDEX, b.labels, b.input_ids)  # (B, T)
        width = b.input_ids.shape[1]
        for flat in at[hit[:, 0] & is_word].tolist():
            self.right.append((original[flat // width].tolist(), flat % width))

    def scores(self, tokenizer) -> MaskedScores:
        s, n = self.s, max(self.s.masks, 1)
        s.loss, s.frequency_loss = self.loss / n, self.freq_loss / n
        s.first_guesses = [(tokenizer.decode([i]), c / n) for i, c in self.guesses.most_common(COMMON)]
        s.word_top1, s.word_topk = self.top1 / max(s.words, 1), self.topk / max(s.words, 1)
        return s


def sentence_around(ids: list[int], pos: int, trained: Trained) -> str | None:
    """The text around `ids[pos]` with that token as <mask>: at most CONTEXT tokens each side, not past a line
    break, a special token or a sentence's end. None when the word continues into the next token (masking its
    first piece would ask for part of a word) or the sentence is too short to say anything."""
    tok, special = trained.tokenizer, set(trained.spec.special_ids)

    def stops(i: int) -> bool:
        return ids[i] in special or "\n" in tok.decode([ids[i]])

    if pos + 1 < len(ids) and re.match(r"[A-Za-z]", tok.decode([ids[pos + 1]])):
        return None
    start = pos
    while start > 0 and pos - start < CONTEXT and not stops(start - 1):
        start -= 1
    end = pos + 1
    while end < len(ids) and end - pos <= CONTEXT and not stops(end):
        end += 1
        if tok.decode([ids[end - 1]]).rstrip().endswith("."):
            break
    left = re.split(r"(?<=\.)\s+", tok.decode(ids[start:pos]).strip())[-1]  # from the last sentence start
    text = f"{left} {tok.id_to_token(trained.spec.mask_id)}{tok.decode(ids[pos + 1: end]).rstrip()}".strip()
    return text if len(text.split()) >= 6 else None


def examples(trained: Trained, untrained_model: torch.nn.Module, right: list[tuple[list[int], int]], count: int,
             device: torch.device) -> list[Example]:
    """The first `count` of the words the trained model got right (MaskedTally.right) that `fill_mask` also gets right
    from their sentence alone, each with the untrained model's guesses beside."""
    untrained = replace(trained, model=untrained_model)
    found: list[Example] = []
    for ids, pos in right:
        text = sentence_around(ids, pos, trained)
        if text is None:
            continue
        word = trained.tokenizer.decode([ids[pos]])
        guesses = fill_mask(trained, text, TOP_K, device)[0]
        if guesses[0][0] == word:
            found.append(Example(text, word, guesses, fill_mask(untrained, text, TOP_K, device)[0]))
            if len(found) == count:
                break
    return found
