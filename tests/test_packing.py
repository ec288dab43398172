"""Token-budget batches (data.batch_tokens): best-fit packing, fixed shapes, the same loss and gradients as
row batches of the same rows, an exact data position across ranks and resumes, a static compiled model."""

from __future__ import annotations

import random

import torch

from conftest import PAD, make_shards
from encoder_train.batch import MaskSpec
from encoder_train.data.loader import collate
from encoder_train.data.packing import TokenBudgetBatches, best_fit, pack
from encoder_train.data.shards import scan_shards
from encoder_train.model import MaskedLM, ModelDims

SPEC = MaskSpec(pad_id=PAD, mask_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=128, probability=0.3)


def test_best_fit_places_every_row_once_within_capacity_and_packs_fuller_than_in_order():
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(300)]
    bins = best_fit(lengths, 256)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    in_order, room = 0, 0  # next-fit in stream order, the simplest packing
    for n in lengths:
        if n > room:
            in_order, room = in_order + 1, 256
        room -= n
    assert len(bins) < in_order
    assert sum(lengths) / (len(bins) * 256) > 0.95


def rows_of(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.tensor([0]), torch.randint(5, 128, (n - 2,), generator=g), torch.tensor([2])])
            for n in lengths]


def test_a_packed_batch_has_fixed_shapes_and_the_row_batchs_masks():
    rows = rows_of([30, 17, 9, 3])
    b = pack(rows, [10, 11, 12, 13], SPEC, seed=0, budget=128, max_row=32, predict_bucket=16)
    assert b.input_ids.shape == (1, 128) and b.cu_seqlens.shape == (129,) and b.positions.shape == (128,)
    assert b.num_tokens == 59 and len(b.predict_positions) % 16 == 0
    lengths = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
    assert lengths[:4] == [30, 17, 9, 3] and max(lengths) <= 32 and sum(lengths) == 128
    assert (b.labels[0, 59:] == -100).all() and b.input_ids[0, -1] == PAD  # filler, never predicted
    extra = b.predict_positions[b.num_predicted:]
    assert (extra == 127).all()  # padded predictions point at filler: ignored by the loss
    ref = collate(rows, SPEC, seed=0, first_row=10)  # the same rows as a row batch: the same masks
    assert torch.equal(b.input_ids[0, :59], ref.input_ids[ref.attention_mask])
    assert torch.equal(b.labels[0, :59], ref.labels[ref.attention_mask])
    assert b.positions[:30].tolist() == list(range(30)) and b.positions[30:47].tolist() == list(range(17))


def model_dims(**changes) -> ModelDims:
    return ModelDims(**{**dict(vocab_size=128, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64,
                               max_position_embeddings=64, pad_id=PAD, dropout=0.0, attention_dropout=0.0), **changes})


def test_packed_batch_gives_the_row_batchs_loss_and_gradients():
    """Same rows, same masks: the token-budget batch (segments of one line, filler, padded predictions)
    and the row batch give one loss and one gradient, for RoBERTa's learned positions and for the modern
    family's rotary positions with a window."""
    rows = rows_of([30, 29, 17, 12, 9, 3], seed=1)
    modern = dict(pre_layer_norm=True, first_attention_norm=False, position_embedding="rotary",
                  global_attention_every=2, local_attention=8, feed_forward="geglu", attention_bias=False,
                  feed_forward_bias=False, norm_bias=False, head_bias=False, token_type_embedding=False,
                  init="modernbert")
    for changes in ({}, modern):
        torch.manual_seed(0)
        model = MaskedLM(model_dims(**changes))
        packed = pack(rows, list(range(6)), SPEC, seed=0, budget=160, max_row=32, predict_bucket=32)
        by_rows = collate(rows, SPEC, seed=0, first_row=0)
        results = []
        for b in (packed, by_rows):
            model.zero_grad()
            loss = model(b.input_ids, b.attention_mask, b.labels, b.predict_positions, reduction="sum",
                         packing=b.packing).loss
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        (loss_a, grads_a), (loss_b, grads_b) = results
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
        for name in grads_a:
            torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def take(dataset: TokenBudgetBatches, n: int) -> list:
    it = iter(dataset)
    return [next(it) for _ in range(n)]


def test_ranks_split_the_bins_and_a_resume_position_continues_exactly(tmp_path):
    make_shards(tmp_path, files=3, rows=40, width=32)
    shards = scan_shards(tmp_path, 64)
    kw = dict(budget=96, window=25, seed=3, shuffle_files=2)
    single = take(TokenBudgetBatches(shards, SPEC, **kw), 24)
    ranks = [take(TokenBudgetBatches(shards, SPEC, rank=r, stride=2, **kw), 12) for r in (0, 1)]
    interleaved = [b for pair in zip(*ranks, strict=True) for b in pair]
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
               for a, b in zip(single, interleaved, strict=True))
    # Both ranks agree where each round ends, and resuming there gives what follows, for any world size.
    assert [b.resume_at for b in ranks[0]] == [b.resume_at for b in ranks[1]]
    for cut in (3, 7, 10):
        resumed = take(TokenBudgetBatches(shards, SPEC, start=ranks[0][cut - 1].resume_at, **kw), 4)
        assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(resumed, single[2 * cut:], strict=False))


def test_token_budget_training_resumes_bit_exact(capsys, tmp_path, shard_dir, tokenizer_file):
    """A run of 10 steps, and the same run cut back to its step-4 checkpoint (as a crash after step 4 leaves
    it) and resumed: the same data position and the same weights, bit for bit."""
    from encoder_train import checkpoint
    from encoder_train.cli import main

    common = ["train", "--config_file", "tiny-modernbert.yaml", "--data_dir", str(shard_dir), "--tokenizer_filepath",
              str(tokenizer_file), "--set", "data.batch_tokens=128", "--set", "data.pack_window=40",
              "--set", "data.num_workers=0", "--set", "training.gradient_accumulation_steps=2", "--max_steps", "10",
              "--checkpoint_every", "4", "--max_checkpoints", "5"]
    assert main([*common, "--checkpoint_dir", str(tmp_path / "a")]) == 0
    assert main([*common, "--checkpoint_dir", str(tmp_path / "b")]) == 0
    for step, path in checkpoint.list_checkpoints(tmp_path / "b"):
        if step > 4:
            path.unlink()
    assert main([*common, "--checkpoint_dir", str(tmp_path / "b"), "--load_checkpoint", "latest"]) == 0
    a = checkpoint.load(checkpoint.checkpoint_path(tmp_path / "a", 10))
    b = checkpoint.load(checkpoint.checkpoint_path(tmp_path / "b", 10))
    middle = checkpoint.load(checkpoint.checkpoint_path(tmp_path / "b", 4))["data"]
    assert middle["rows_consumed"] + middle["bins_done"] > 0 and a["data"] == b["data"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert "token slots per step" in capsys.readouterr().out


def test_the_compiled_model_does_not_recompile_across_token_budget_batches(tmp_path):
    from encoder_train.model import compile_model

    compiled = []

    def counting_backend(graph, example_inputs):
        compiled.append(graph)
        return graph.forward

    make_shards(tmp_path, files=2, rows=60, width=32)
    shards = scan_shards(tmp_path, 64)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MaskedLM(model_dims(dropout=0.1, attention_dropout=0.1))
    compile_model(model, backend=counting_backend)
    counts = []
    for b in take(TokenBudgetBatches(shards, SPEC, budget=128, window=30, seed=0, shuffle_files=2), 8):
        model(b.input_ids, b.attention_mask, b.labels, b.predict_positions, reduction="sum",
              packing=b.packing).loss.backward()
        counts.append(len(compiled))
    assert counts[0] > 0 and counts[-1] == counts[1], counts
    torch._dynamo.reset()


def test_the_compiled_model_gives_the_eager_loss_and_gradients_on_packed_batches(tmp_path):
    """torch.compile through AOTAutograd (the graph capture, functionalisation and decompositions that a GPU
    compile also runs; aot_eager needs no C++ compiler) against the eager model, same weights, same batches."""
    import copy

    from encoder_train.model import compile_model

    make_shards(tmp_path, files=2, rows=60, width=32)
    shards = scan_shards(tmp_path, 64)
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = MaskedLM(model_dims())
    compiled = copy.deepcopy(eager)
    compile_model(compiled, backend="aot_eager")
    for b in take(TokenBudgetBatches(shards, SPEC, budget=128, window=30, seed=0, shuffle_files=2), 3):
        losses, grads = [], []
        for m in (eager, compiled):
            m.zero_grad()
            loss = m(b.input_ids, b.attention_mask, b.labels, b.predict_positions, reduction="sum",
                     packing=b.packing).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()
