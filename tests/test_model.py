import math

import pytest
import torch
import torch.nn.functional as F

from encoder_train.batch import IGNORE_INDEX
from encoder_train.model import MaskedLM, ModelDims

PAD = 1


def dims(**kw) -> ModelDims:
    base = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                max_position_embeddings=40, pad_id=PAD, dropout=0.0, attention_dropout=0.0)
    return ModelDims(**{**base, **kw})


def padded_batch(seed=0, B=4, T=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 128, (B, T), generator=g)
    lengths = [T, T - 3, 5, 2]
    for i, n in enumerate(lengths):
        ids[i, n:] = PAD
    return ids, ids != PAD


def test_shapes_and_tied_embeddings():
    torch.manual_seed(0)
    m = MaskedLM(dims())
    ids, mask = padded_batch()
    out = m(ids, mask, return_logits=True)
    assert out.logits.shape == (4, 12, 128) and out.loss is None
    assert m.head.word_embeddings[0].weight is m.embeddings.word_embeddings.weight
    names = dict(m.named_parameters())
    assert "head.bias" in names and not any("decoder" in n for n in names)  # tied: stored once
    # Parameter count: embeddings + per layer (4 HxH attention, 2 FFN, 2 LN) + head dense/LN/bias.
    H, FF, V, P, L = 32, 64, 128, 40, 2
    layer = 4 * (H * H + H) + (H * FF + FF) + (FF * H + H) + 2 * 2 * H
    expected = (V + P + 1) * H + 2 * H + L * layer + (H * H + H) + 2 * H + V
    assert m.num_parameters() == expected


def test_fixed_seed_initial_loss_is_uniform_and_reproducible():
    ids, mask = padded_batch()
    labels = torch.where(mask, ids, torch.full_like(ids, IGNORE_INDEX))
    losses = []
    for _ in range(2):
        torch.manual_seed(1234)
        losses.append(MaskedLM(dims())(ids, mask, labels).loss.item())
    assert losses[0] == losses[1]
    # N(0, 0.02) weights: logits near zero, so the loss starts at about ln(V).
    assert losses[0] == pytest.approx(math.log(128), abs=0.05)


def test_sparse_head_equals_dense_cross_entropy():
    torch.manual_seed(0)
    m = MaskedLM(dims())
    ids, mask = padded_batch()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3], labels[1, 0], labels[2, 4] = 7, 9, 11
    sparse = m(ids, mask, labels)
    logits = m(ids, mask, return_logits=True).logits
    dense = F.cross_entropy(logits.view(-1, 128), labels.view(-1), ignore_index=IGNORE_INDEX)
    assert sparse.loss.item() == pytest.approx(dense.item(), rel=1e-6)
    positions = torch.nonzero(labels.view(-1) != IGNORE_INDEX).squeeze(1)
    given = m(ids, mask, labels, predict_positions=positions, reduction="sum")
    assert given.loss.item() == pytest.approx(3 * dense.item(), rel=1e-6)


@pytest.mark.parametrize("pre_ln", [False, True])
def test_padding_does_not_change_real_tokens(pre_ln):
    torch.manual_seed(0)
    m = MaskedLM(dims(pre_layer_norm=pre_ln)).eval()
    ids, mask = padded_batch()
    short = m(ids[2:3, :5], mask[2:3, :5], return_logits=True).logits
    long = m(ids[2:3], mask[2:3], return_logits=True).logits[:, :5]
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-5)


def test_roberta_positions_start_after_pad_id():
    m = MaskedLM(dims())
    ids, mask = padded_batch()
    seen = {}
    m.embeddings.position_embeddings.register_forward_hook(lambda mod, inp, out: seen.update(pos=inp[0]))
    m(ids, mask)
    assert seen["pos"][1].tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10, PAD, PAD, PAD]
    assert m.dims.max_tokens == 40 - PAD - 1


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = MaskedLM(dims(pre_layer_norm=True))
    ids, mask = padded_batch()
    labels = torch.where(mask, ids, torch.full_like(ids, IGNORE_INDEX))
    m(ids, mask, labels).loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    # token type 0 is added everywhere, so it gets a gradient too; only pad rows stay zero.
    assert not missing


@pytest.mark.parametrize("pre_ln", [False, True])
def test_unpadded_path_equals_padded_dense_loss_and_gradients(pre_ln):
    from encoder_train.batch import MaskSpec
    from encoder_train.data.loader import collate

    ids, mask = padded_batch(seed=3)
    spec = MaskSpec(pad_id=PAD, mask_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=128, probability=0.3)
    b = collate(list(ids), spec, seed=0)
    assert b.packing is not None and len(b.token_index) == int(mask.sum())
    results = []
    for packing in (None, b.packing):
        torch.manual_seed(0)
        m = MaskedLM(dims(pre_layer_norm=pre_ln, dropout=0.0, attention_dropout=0.0))
        out = m(b.input_ids, b.attention_mask, b.labels, b.predict_positions, packing=packing)
        out.loss.backward()
        logits = m(b.input_ids, b.attention_mask, packing=packing, return_logits=True).logits
        results.append((out.loss.detach(), {n: p.grad for n, p in m.named_parameters()}, logits.detach()))
    (loss_a, grads_a, logits_a), (loss_b, grads_b, logits_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
    real = b.attention_mask
    torch.testing.assert_close(logits_b[real], logits_a[real], rtol=1e-5, atol=1e-5)


# ---- the pieces of the fast path ------------------------------------------------------------------


def test_cpu_dropout_keeps_1_minus_p_scales_and_backpropagates_through_the_same_mask():
    from encoder_train.kernels import dropout

    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(5)
    y = dropout(x, 0.1, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002  # 1e6 draws: standard deviation 0.0003
    assert torch.allclose(y[kept], torch.full_like(y[kept], 65536 / (65536 - 6554)))  # p rounds to 6554/65536
    assert abs(y.mean().item() - 1.0) < 0.003  # unbiased
    # Neighbouring elements come from different bits of one 64-bit draw: no lane is favoured.
    assert all(abs(kept.view(-1, 4)[:, i].float().mean().item() - 0.9) < 0.004 for i in range(4))
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, y.detach() * 2.0)  # the gradient flows exactly where the value did
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.1, training=True), y)  # the global generator drives it, as F.dropout
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0, training=True) is x
    assert not dropout(x, 1.0, training=True).any()


def test_dropout_random_bits_are_splitmix64_seeded_from_the_global_generator():
    from encoder_train.kernels import random_words

    def splitmix64(seed: int, count: int) -> list[int]:  # the reference, on Python's unbounded ints
        out, state, m = [], seed, (1 << 64) - 1
        for _ in range(count):
            state = (state + 0x9E3779B97F4A7C15) & m
            z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & m
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
            out.append(z ^ (z >> 31))
        return out

    torch.manual_seed(3)
    seed = int(torch.randint(-(2**62), 2**62, (1,)))
    torch.manual_seed(3)
    words = random_words(1000)
    assert [w & ((1 << 64) - 1) for w in words[:16].tolist()] == splitmix64(seed & ((1 << 64) - 1), 16)
    assert words.unique().numel() == 1000


def test_length_groups_partition_the_sorted_rows_and_save_work():
    from encoder_train.layouts import length_groups

    lengths = sorted(torch.randint(51, 129, (32,), generator=torch.Generator().manual_seed(0)).tolist(), reverse=True)
    runs = length_groups(lengths)
    assert runs[0][0] == 0 and runs[-1][1] == 32 and 1 < len(runs) <= 4
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:], strict=False))  # contiguous, in order, each row once
    work = sum((end - start) * lengths[start] ** 2 for start, end in runs)
    assert work < 0.8 * 32 * lengths[0] ** 2
    assert length_groups([64] * 8) == [(0, 8)]  # nothing to gain: one group


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_cross_entropy_equals_cross_entropy_on_the_logits(precision):
    from encoder_train.kernels import LinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 32, generator=g, requires_grad=True)
    w = (0.2 * torch.randn(300, 32, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(300, generator=g)).requires_grad_()
    target = torch.randint(0, 300, (50,), generator=g)
    grads = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for fused in (True, False):
            if fused:
                loss = LinearCrossEntropy.apply(x, w, b, target)
            else:
                loss = F.cross_entropy(F.linear(x, w, b).float(), target, reduction="sum")
            grads.append((loss, *torch.autograd.grad(loss * 0.5, (x, w, b))))
    tol = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=2e-2, atol=2e-2)
    for got, expected in zip(*grads, strict=True):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, **tol)


def test_compiled_layers_do_not_recompile_as_batch_lengths_change():
    """training.compile: once the first batches have compiled (static shapes, then dynamic ones), new
    token counts, row lengths and numbers of length groups reuse the graphs. A counting backend sees
    each compilation; it runs the graphs as traced, so the test needs no C++ compiler."""
    from encoder_train.batch import MaskSpec
    from encoder_train.data.loader import collate
    from encoder_train.model import compile_layers

    compiled = []

    def counting_backend(graph, example_inputs):
        compiled.append(graph)
        return graph.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = MaskedLM(dims(dropout=0.1, attention_dropout=0.1, max_position_embeddings=70))
    compile_layers(m, backend=counting_backend)
    spec = MaskSpec(pad_id=PAD, mask_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=128, probability=0.3)
    g = torch.Generator().manual_seed(0)
    counts = []
    for step in range(8):
        lengths = torch.randint(4, 60, (6,), generator=g).tolist()
        b = collate([torch.randint(5, 128, (n,), generator=g) for n in lengths], spec, seed=0, first_row=step)
        m(b.input_ids, b.attention_mask, b.labels, b.predict_positions, packing=b.packing).loss.backward()
        counts.append(len(compiled))
    assert counts[0] > 0
    assert counts[-1] == counts[2], counts  # nothing compiled after the third batch
    torch._dynamo.reset()


def test_full_rows_run_padded_without_a_mask_and_give_the_masked_result():
    from encoder_train.batch import MaskSpec
    from encoder_train.data.loader import collate
    from encoder_train.layouts import Padded, make_layout

    ids = torch.randint(5, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    spec = MaskSpec(pad_id=PAD, mask_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=128, probability=0.3)
    b = collate(list(ids), spec, seed=0)
    layout = make_layout(b.attention_mask, b.packing)
    assert isinstance(layout, Padded) and layout.bias is None  # the loader's packing says: no pads
    torch.manual_seed(0)
    m = MaskedLM(dims())
    fast = m(b.input_ids, b.attention_mask, b.labels, b.predict_positions, packing=b.packing).loss
    masked = m(b.input_ids, b.attention_mask, b.labels, b.predict_positions).loss
    torch.testing.assert_close(fast, masked)
