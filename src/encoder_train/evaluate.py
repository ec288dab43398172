"""Held-out MLM loss, masked-token accuracy and perplexity; fill-mask.

Evaluation reads the validation shards in a fixed order (sorted files, rows in order) and masks each
row with a generator seeded from `EVAL_SEED` and the row's index, never from the training seed: the
same rows get the same masks in every run, at every checkpoint and with any batch size, so numbers compare.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer

from encoder_train.batch import Batch, MaskSpec
from encoder_train.data.formats.base import ShardInfo
from encoder_train.data.loader import collate
from encoder_train.data.shards import ShardReader, check_values, scan_shards
from encoder_train.errors import UserError
from encoder_train.state import Trained, load_trained
from encoder_train.tokenizer import special_tokens

EVAL_SEED = 20190726  # fixed: evaluation masks never depend on the run's seed


def eval_batches(shards: list[ShardInfo], spec: MaskSpec, batch_size: int, max_batches: int | None,
                 seed: int = EVAL_SEED) -> Iterator[Batch]:
    """Every row of every shard, in order, `batch_size` rows at a time, masked with the fixed eval seed (an
    evaluation suite may name another)."""
    index, row = 0, 0  # batches and rows so far: a row's mask depends on its position only
    for shard in shards:
        reader = ShardReader(shard)
        try:
            check_values(shard.path, reader, spec.vocab_size, spec.pad_id, spec.special_ids)
            for start in range(0, shard.rows, batch_size):
                if max_batches is not None and index >= max_batches:
                    return
                chunk = reader.rows(start, min(batch_size, shard.rows - start))
                yield collate(list(chunk), spec, seed, row)
                index, row = index + 1, row + len(chunk)
        finally:
            reader.close()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    shards: list[ShardInfo],
    spec: MaskSpec,
    *,
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    max_batches: int | None = None,
    on_batch: Callable[[Batch, torch.Tensor], None] | None = None,
    seed: int = EVAL_SEED,
) -> dict[str, float | int]:
    """Mean loss and accuracy over every predicted token of the held-out rows; the model's mode is restored.

    The one loop that runs a model over the held-out masked batches: `on_batch(batch, logits)`, where given, sees
    each batch as eval_batches made it (on the host) with the model's logits at its predicted positions, (N, V)
    float on `device` (V: the model's vocabulary, padded), so that a caller's own measure of the same predictions
    needs no second pass.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    predicted, tokens, rows = 0, 0, 0
    try:
        for host in eval_batches(shards, spec, batch_size, max_batches, seed):
            b = host.to(device)
            with autocast or contextlib.nullcontext():
                # Through forward(), so a DDP- or FSDP-wrapped model works too.
                out = model(b.input_ids, b.attention_mask, b.labels, b.predict_positions, reduction="sum",
                            packing=b.packing, return_predicted_logits=True)
            logits = out.predicted_logits.float()  # (N, V)
            target = b.labels.reshape(-1).index_select(0, b.predict_positions)
            loss_sum += out.loss.double()
            # Padded vocabulary rows are no tokens: the prediction is over the tokenizer's ids only.
            correct += (logits[:, : spec.vocab_size].argmax(-1) == target).sum()
            predicted += b.num_predicted
            tokens += b.num_tokens
            rows += b.input_ids.shape[0]
            if on_batch is not None:
                on_batch(host, logits)
    finally:
        model.train(was_training)
    if predicted == 0:
        # A perplexity of 1.0 would read as a perfect model; there was simply nothing to score.
        raise UserError(
            f"the held-out data ({rows} rows in {len(shards)} {'file' if len(shards) == 1 else 'files'}, from "
            f"{shards[0].path}) gave no token to predict: its rows hold too few maskable tokens; "
            "evaluate on more or longer rows."
        )
    loss = loss_sum.item() / max(predicted, 1)  # host waits for the device here
    return {
        "loss": loss,
        "accuracy": correct.item() / max(predicted, 1),
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": predicted,
        "real_tokens": tokens,
        "rows": rows,
    }


FIX_TOKENIZER = ("pass the tokenizer the checkpoint was trained with, or leave out --tokenizer_filepath to use the one "
                 "stored in the checkpoint")


def check_same_vocabulary(trained: Trained, tokenizer: Tokenizer, path: str | Path,
                          checkpoint_path: str | Path, fix: str = FIX_TOKENIZER) -> None:
    """Refuse a tokenizer whose ids name other tokens than the checkpoint's: the model's answers would be garbage.

    Only the token -> id mapping must agree; normalization and pre-tokenization may differ. `fix`: what the
    message tells the user to do.
    """
    spec, special = trained.spec, special_tokens(tokenizer, path)
    diffs = [f"{what} {given} vs {stored}" for what, given, stored in (
        ("vocabulary size", tokenizer.get_vocab_size(), spec.vocab_size),
        ("<pad> id", special.pad, spec.pad_id),
        ("<mask> id", special.mask, spec.mask_id),
        ("special-token ids", list(special.all_ids), list(spec.special_ids)),
    ) if given != stored]
    if not diffs:  # the same size and special ids: the first id that names another token, if any
        stored_ids = trained.tokenizer.get_vocab()
        moved = [(t, i, stored_ids.get(t, "none")) for t, i in sorted(tokenizer.get_vocab().items(), key=lambda x: x[1])
                 if stored_ids.get(t) != i]
        diffs = [f"token {t!r} has id {i} vs {j}" for t, i, j in moved[:1]]
    if diffs:
        raise UserError(
            f"tokenizer {path} does not match the vocabulary of checkpoint {checkpoint_path} "
            f"({path} vs checkpoint: {', '.join(diffs)}); {fix}."
        )


def run_evaluate(checkpoint_path: str, data_dir: str, batch_size: int, max_batches: int | None,
                 device: torch.device) -> dict[str, float | int]:
    trained = load_trained(checkpoint_path, device)
    shards = scan_shards(data_dir, trained.model.dims.max_tokens)
    result = evaluate(trained.model, shards, trained.spec, batch_size=batch_size, device=device,
                      max_batches=max_batches)
    return {"checkpoint": str(checkpoint_path), "step": trained.state["step"], **result}


@torch.no_grad()
def fill_mask(trained: Trained, text: str, top_k: int, device: torch.device) -> list[list[tuple[str, float]]]:
    """For each `<mask>` in `text`: the `top_k` most likely tokens with their probabilities.

    A `top_k` beyond the vocabulary's non-special tokens gives all of them, most likely first.
    """
    tok, spec = trained.tokenizer, trained.spec
    mask_token = tok.id_to_token(spec.mask_id)
    if mask_token not in text:
        raise UserError(f"the text has no {mask_token} to fill in; write {mask_token} where a word should go.")
    ids = tok.encode(text).ids  # with the tokenizer's post-processor: <s> ... </s>
    if len(ids) > trained.model.dims.max_tokens:
        raise UserError(f"the text is {len(ids)} tokens long; the model reads at most {trained.model.dims.max_tokens}: "
                        "shorten the text around its <mask> and try again.")
    input_ids = torch.tensor([ids], device=device)
    positions = torch.nonzero(input_ids.view(-1) == spec.mask_id).squeeze(1)
    hidden = trained.model.encode(input_ids, input_ids != spec.pad_id)
    logits = trained.model.predict(hidden, positions).float()[:, : spec.vocab_size]
    # Special tokens are never the answer to a masked word.
    logits[:, list(spec.special_ids)] = float("-inf")
    probs = logits.softmax(-1)
    top = probs.topk(min(top_k, spec.vocab_size - len(set(spec.special_ids))), dim=-1)
    return [
        [(tok.decode([i]), p) for i, p in zip(idx.tolist(), pr.tolist(), strict=True)]
        for idx, pr in zip(top.indices, top.values, strict=True)
    ]


def show_guesses(guesses: list[tuple[str, float]]) -> str:
    """`' list' 0.312  '\\n' 0.120`: each token as Python writes a string, so the space that starts a word and a
    whitespace token stay visible, with its probability. fill-mask and the demo both print guesses this way."""
    return "  ".join(f"{token!r} {p:.3f}" for token, p in guesses)
