"""The Hugging Face Trainer's side of a speed benchmark, set up as `run_mlm.py` would set it up.

`transformers.Trainer` + `RobertaForMaskedLM` or, for the modern family, `ModernBertForMaskedLM` (SDPA
attention either way) + `DataCollatorForLanguageModeling`:
the rows without their padding, padded per batch to its longest row by the collator, read in order
(the order encoder-train's loader reads them), each step timed by a callback.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from synthetic import BOS, EOS, PAD
from workload import MASK_PROBABILITY, SEED, Size, Timing, Workload, quietly, sync


class RowsDataset(torch.utils.data.Dataset):
    """Unpadded rows as the HF tokenizer returns them (return_special_tokens_mask=True), one dict per row."""

    def __init__(self, rows: list[torch.Tensor]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids = self.rows[i].tolist()
        return {"input_ids": ids, "special_tokens_mask": [1] + [0] * (len(ids) - 2) + [1]}


class CountingCollator:
    """The HF collator, noting the real tokens of every batch it builds (in order; batch i = step i + 1)."""

    def __init__(self, collator):
        self.collator = collator
        self.real_tokens: list[int] = []

    def __call__(self, features):
        batch = self.collator(features)
        self.real_tokens.append(int(batch["attention_mask"].sum()))
        return batch


def hf_model(size: Size, seq_len: int, seed: int = SEED):
    """RobertaForMaskedLM (ModernBertForMaskedLM for the modern family) of the same shape, dropout and
    conventions as encoder-train's model."""
    import transformers

    if size.family == "modernbert":
        return modern_hf_model(size, seq_len, seed)
    config = transformers.RobertaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        intermediate_size=size.ffn,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=seq_len + 2,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")
    assert isinstance(model, transformers.RobertaForMaskedLM) and model.config._attn_implementation == "sdpa"
    return model


def run_hf(
    run_dir: Path,
    rows: list[torch.Tensor],
    tokenizer: Path,
    w: Workload,
    device: torch.device,
    workers: int = 0,
    verbose: bool = False,
):
    """Train W + N steps with the Trainer on `rows` in order; time steps W+1..W+N. Returns timing, model."""
    import transformers

    class StepClock(transformers.TrainerCallback):
        def __init__(self):
            self.times: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.times[state.global_step] = time.perf_counter()

    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )
    assert len(hf_tokenizer) == w.size.vocab and hf_tokenizer.pad_token_id == PAD
    collator = CountingCollator(
        transformers.DataCollatorForLanguageModeling(hf_tokenizer, mlm=True, mlm_probability=MASK_PROBABILITY)
    )
    args = transformers.TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=w.batch,
        max_steps=w.total_steps,
        learning_rate=w.lr,
        warmup_steps=w.lr_warmup,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.98,
        adam_epsilon=1e-6,
        max_grad_norm=1.0,
        bf16=w.precision == "bf16",
        use_cpu=device.type == "cpu",
        train_sampling_strategy="sequential",  # the rows in the order encoder-train reads them
        remove_unused_columns=False,  # keep special_tokens_mask for the collator (a torch Dataset)
        dataloader_num_workers=workers,
        logging_steps=w.total_steps,  # one log, after the window
        save_strategy="no",
        report_to=[],
        disable_tqdm=not verbose,
        seed=w.seed,
        torch_compile=w.compile,
    )
    clock = StepClock()
    trainer = transformers.Trainer(
        model=hf_model(w.size, w.seq_len, w.seed),
        args=args,
        train_dataset=RowsDataset(rows),
        data_collator=collator,
        callbacks=[clock],
    )
    quietly(trainer.train, verbose)
    window = range(w.warmup + 1, w.total_steps + 1)
    seconds = [clock.times[i] - clock.times[i - 1] for i in window]
    # Batch i is built for step i + 1; with workers the counts are made in their processes (not here).
    tokens = [collator.real_tokens[i - 1] for i in window] if workers == 0 else [-1] * w.steps
    return Timing(seconds, tokens), trainer.model


def modern_hf_model(size: Size, seq_len: int, seed: int = SEED):
    """ModernBertForMaskedLM describing encoder-train's modern model of this size (`hf_config`: layer
    types, window, rotary bases, no biases, no dropout), with SDPA attention on padded rows and logits at
    every position (its default; `sparse_prediction` off)."""
    import transformers

    from encoder_train.hf import hf_config
    from encoder_train.tokenizer import special_tokens, word_level_tokenizer

    special = special_tokens(word_level_tokenizer(size.vocab))  # the ids write_tokenizer's file has
    assert (special.bos, special.pad, special.eos) == (BOS, PAD, EOS)
    config = hf_config(transformers, size.model_dims(seq_len), special)
    torch.manual_seed(seed)
    model = transformers.AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")
    assert isinstance(model, transformers.ModernBertForMaskedLM) and model.config._attn_implementation == "sdpa"
    assert not model.config.sparse_prediction
    return model
