"""Hugging Face `tokenizers` tokenizers: loading, training, and the special-token ids the trainer needs.

encoder-train follows RoBERTa's vocabulary conventions: `<s>` starts a sequence, `</s>` ends it (and
separates packed documents), `<pad>` right-pads rows, `<mask>` replaces selected tokens, `<unk>`
stands for the unknown. A BERT-style WordPiece tokenizer with `[CLS] [SEP] [PAD] [MASK] [UNK]` works
as well (`train_tokenizer(kind="wordpiece")` trains one): each role's names, as the families spell them, are
looked up in turn.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from encoder_train.errors import UserError
from encoder_train.families import FAMILIES
from encoder_train.textfiles import iter_texts
from encoder_train.textsample import SampleReport, Sampling, sample_texts

# Each role, with the token strings that may fill it: every family's spelling (families/), RoBERTa's first, then
# BERT's: {"bos": ("<s>", "[CLS]"), "pad": ("<pad>", "[PAD]"), ...}.
SPECIAL_TOKEN_NAMES: dict[str, tuple[str, ...]] = {
    role: tuple(dict.fromkeys(f.special_tokens[i] for f in FAMILIES.values()))
    for i, role in enumerate(("bos", "pad", "eos", "unk", "mask"))
}


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens. `all_ids` are never selected for masking nor drawn as random tokens."""

    bos: int
    pad: int
    eos: int
    unk: int
    mask: int
    all_ids: tuple[int, ...]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json` written by the `tokenizers` library (or by `encoder-train tokenizer`)."""
    path = Path(path)
    if path.is_dir():
        hint = f" such as {path / 'tokenizer.json'}" if (path / "tokenizer.json").is_file() else ""
        raise UserError(f"--tokenizer_filepath {path} is a folder, not a tokenizer file; pass the tokenizer.json"
                        f"{hint} itself.")
    if path.exists() and not path.is_file():  # a pipe, a device
        raise UserError(f"tokenizer file {path} is not a regular file (a pipe or a device); pass "
                        "--tokenizer_filepath with a tokenizer.json file.")
    if not path.is_file():
        raise UserError(
            f"tokenizer file {path} does not exist; pass --tokenizer_filepath with a tokenizer.json "
            "(train one with `encoder-train tokenizer`)."
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception for unparsable files
        raise UserError(
            f"tokenizer file {path} could not be read as a Hugging Face tokenizers JSON file ({e}); "
            "pass a tokenizer.json saved with Tokenizer.save."
        ) from None


def special_tokens(tokenizer: Tokenizer, path: str | Path = "the tokenizer") -> SpecialTokens:
    """Find the ids of <s> <pad> </s> <unk> <mask> (or their BERT names); all five are required."""
    ids: dict[str, int] = {}
    for role, names in SPECIAL_TOKEN_NAMES.items():
        found = [tokenizer.token_to_id(name) for name in names]
        found = [i for i in found if i is not None]
        if not found:
            raise UserError(
                f"tokenizer {path} has no {names[0]} token (nor {names[1]}); masked-language modelling "
                f"needs {' '.join(n[0] for n in SPECIAL_TOKEN_NAMES.values())}: train the tokenizer "
                "with these special tokens (`encoder-train tokenizer` does)."
            )
        ids[role] = found[0]
    # Every token the tokenizer marks as special counts, not just the five roles above.
    added = {i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}
    all_ids = tuple(sorted(added | set(ids.values())))
    return SpecialTokens(**ids, all_ids=all_ids)


# ---------------------------------------------------------------------------------------------------
# Training.

# RoBERTa's special tokens, in id order 0..4. `<mask>` swallows the space before it (lstrip), so
# "a <mask>." masks the word with its leading space, as the byte-level vocabulary spells words.
ROBERTA_SPECIAL_TOKENS = (
    AddedToken("<s>", special=True),
    AddedToken("<pad>", special=True),
    AddedToken("</s>", special=True),
    AddedToken("<unk>", special=True),
    AddedToken("<mask>", lstrip=True, special=True),
)

# BERT's, in the order BertWordPieceTokenizer gives them ids 0..4. "a [MASK]." masks the word alone: WordPiece
# splits on spaces before it looks words up.
BERT_SPECIAL_TOKENS = tuple(AddedToken(t, special=True) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))

# Documents handed to the Rust trainer per call: big enough to amortise the Python-to-Rust crossing.
TRAIN_BATCH_DOCUMENTS = 1000

# The largest --vocab_size: about four times the largest vocabularies in use (XLM-R's 250,002, Gemma's
# 256,000). Beyond it the embedding matrix alone outweighs a base-sized encoder, and the Rust trainer
# reserves memory in proportion to vocab_size before reading any text (10**12 aborts the process).
MAX_VOCAB_SIZE = 1_000_000


# The BPE trainer's time grows with the square of a word's length (400,000 letters without a space: a minute;
# 3 MB of base64: hours). Longer runs without a break are cut into separate training sequences of this many
# characters; no useful token is that long, and only the trainer sees the cuts.
MAX_TRAINING_RUN_CHARS = 1000
_LONG_RUN = re.compile(rf"\S{{{MAX_TRAINING_RUN_CHARS},}}|\s{{{MAX_TRAINING_RUN_CHARS},}}")


def _training_pieces(text: str) -> list[str]:
    """`text`, cut inside every run of MAX_TRAINING_RUN_CHARS or more non-space (or space) characters."""
    pieces, start = [], 0
    for run in _LONG_RUN.finditer(text):
        for cut in range(run.start() + MAX_TRAINING_RUN_CHARS, run.end(), MAX_TRAINING_RUN_CHARS):
            pieces.append(text[start:cut])
            start = cut
    pieces.append(text[start:])
    return pieces


def train_tokenizer(inputs: list[Path], output: Path, vocab_size: int, min_frequency: int = 2,
                    overwrite: bool = False, text_field: str = "text", kind: str = "bpe",
                    sample: Sampling | None = None, report: SampleReport | None = None) -> Tokenizer:
    """Train a tokenizer on the files `iter_texts` reads (text, .jsonl, Parquet, .gz and .zst) and save it to
    `output`: `kind` "bpe" is RoBERTa's byte-level BPE (<s> <pad> </s> <unk> <mask>, "<s> A </s>"),
    "wordpiece" BERT's cased WordPiece ([PAD] [UNK] [CLS] [SEP] [MASK], "[CLS] A [SEP]").

    `text_field` names the .jsonl field and the Parquet column that hold the text. An existing `output`
    file is replaced only with `overwrite`. With `sample`, it trains on a bounded, reproducible sample of the text
    (textsample.py), whose size `report` receives.
    """
    # The specials and (BPE) the 256 bytes; WordPiece's alphabet is the text's, so one more token at least.
    smallest = len(BERT_SPECIAL_TOKENS) + 1 if kind == "wordpiece" else len(ROBERTA_SPECIAL_TOKENS) + 256
    if vocab_size < smallest:
        what = ("a WordPiece vocabulary starts with its 5 special tokens" if kind == "wordpiece" else
                f"a byte-level BPE vocabulary starts with {len(ROBERTA_SPECIAL_TOKENS)} special tokens and 256 byte "
                "tokens")
        raise UserError(f"vocab_size {vocab_size} is too small: {what}; pass --vocab_size {smallest} or more "
                        f"({'BERT uses 30522' if kind == 'wordpiece' else 'RoBERTa uses 50265'}).")
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(
            f"vocab_size {vocab_size} is too large: the largest vocabularies in use hold about 250,000 tokens; "
            f"pass --vocab_size {MAX_VOCAB_SIZE} or less (RoBERTa uses 50265)."
        )
    if min_frequency < 1:
        raise UserError(f"min_frequency {min_frequency} must be at least 1; pass --min_frequency 2 or more.")
    output = Path(output)
    if output.is_dir():
        raise UserError(f"tokenizer output {output} is a folder; pass a file path such as {output}/tokenizer.json.")
    if output.exists() and not output.is_file():  # replacing /dev/null (as root) would replace the device itself
        raise UserError(f"tokenizer output {output} is not a regular file (a device or a pipe); pass a file path "
                        "such as tokenizer.json.")
    if output.exists() and not overwrite:
        raise UserError(
            f"tokenizer output {output} already exists; pass --overwrite to replace it, or choose another --output."
        )

    tokenizer, trainer = (_wordpiece if kind == "wordpiece" else _byte_level_bpe)(vocab_size, min_frequency)
    texts = (iter_texts(inputs, text_field=text_field) if sample is None else
             sample_texts(inputs, sample, report if report is not None else SampleReport(), text_field))
    documents = (piece for text in texts for piece in _training_pieces(text))
    batches = iter(lambda: list(itertools.islice(documents, TRAIN_BATCH_DOCUMENTS)), [])
    tokenizer.train_from_iterator(batches, trainer)
    _frame(tokenizer, kind)

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(output.name + ".tmp")
        tokenizer.save(str(tmp))
        os.replace(tmp, output)  # never leave a half-written tokenizer.json behind
    except OSError as e:
        raise UserError(
            f"could not write the tokenizer to {output} ({e.strerror}); pass a writable --output."
        ) from None
    return tokenizer


def _byte_level_bpe(vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
    """RoBERTa's byte-level BPE, untrained, and its trainer."""
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE())  # no unk_token: every byte is in the vocabulary
    # "Hello world" -> "Hello", "Ġworld": spaces are kept as part of the following word, so decoding
    # restores the text exactly; no space is added in front of the first word.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(ROBERTA_SPECIAL_TOKENS),
        initial_alphabet=byte_alphabet,  # all 256 bytes, even those the corpus lacks
        show_progress=sys.stderr.isatty(),  # a progress bar for a person at a terminal, not for logs
    )
    return tokenizer, trainer


def _wordpiece(vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
    """BERT's cased WordPiece (as `BertWordPieceTokenizer(lowercase=False)`), untrained, and its trainer:
    "Hello, world" -> "Hello", ",", "world"; "unaffable" -> "un", "##aff", "##able"."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(BERT_SPECIAL_TOKENS),
        show_progress=sys.stderr.isatty(), continuing_subword_prefix="##",
    )
    return tokenizer, trainer


def _frame(tokenizer: Tokenizer, kind: str) -> None:
    """The post-processor: `<s> A </s>` and `<s> A </s></s> B </s>` (RoBERTa), or `[CLS] A [SEP]` and
    `[CLS] A [SEP] B [SEP]` (BERT); pretokenize packs rows without it. (sep, cls) are passed by position: the
    keyword for cls differs between tokenizers versions."""
    if kind == "wordpiece":
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
        return
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", eos), ("<s>", bos), trim_offsets=True, add_prefix_space=False
    )


def word_level_tokenizer(vocab_size: int) -> Tokenizer:
    """A synthetic word-level tokenizer for tests and benchmarks that need no training text.

    RoBERTa's five special tokens at ids 0..4 (`<s> <pad> </s> <unk> <mask>`), then the words
    `w5 .. w{vocab_size-1}`, split on whitespace: the text "w5 w6" is ids [5, 6].
    """
    specials = [t.content for t in ROBERTA_SPECIAL_TOKENS]  # names only: the words are split on whitespace
    words = {tok: i for i, tok in enumerate(specials)}
    words.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(specials)
    return tokenizer
