"""The modern family (rotary positions, GeGLU, no biases, local/global attention) against transformers'
ModernBertForMaskedLM: logits, the training path's loss and gradients, export and import both ways."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import PAD, VOCAB
from encoder_train.batch import MaskSpec
from encoder_train.config import BUNDLED_CONFIG_DIR, load_config
from encoder_train.hf import export_checkpoint, from_hf, hf_config, import_hf, to_hf
from encoder_train.model import MaskedLM, ModelDims
from encoder_train.tokenizer import special_tokens, word_level_tokenizer
from helpers.hf_models import assert_same_logits, modern_dims, padded_batch, perturb, write_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture
def word_tokenizer():
    return word_level_tokenizer(VOCAB)


def hf_model(dims: ModelDims, tokenizer) -> torch.nn.Module:
    config = hf_config(transformers, dims, special_tokens(tokenizer))
    config._attn_implementation = "eager"
    return transformers.ModernBertForMaskedLM(config)


def ours_into_theirs(ours: MaskedLM, theirs: torch.nn.Module) -> None:
    missing, unexpected = theirs.load_state_dict(to_hf(ours.state_dict(), ours.dims), strict=False)
    assert missing == ["decoder.weight"] and not unexpected  # the tied copy of the embeddings
    theirs.tie_weights()


@pytest.mark.parametrize("changes", [{}, {"attention_bias": True, "feed_forward_bias": True, "norm_bias": True,
                                          "head_bias": True, "global_attention_every": 2}])
def test_logits_equal_transformers_on_padded_rows_longer_than_the_window(word_tokenizer, changes):
    dims = modern_dims(**changes)
    torch.manual_seed(0)
    ours = MaskedLM(dims).eval()
    perturb(ours)
    theirs = hf_model(dims, word_tokenizer).eval()
    ours_into_theirs(ours, theirs)
    ids, mask = padded_batch(VOCAB, [30, 23, 17, 9, 3])
    with torch.no_grad():
        mine = ours(ids, mask, return_logits=True).logits
        hf = theirs(input_ids=ids, attention_mask=mask.long()).logits
        # The window matters: without it (all layers global) the logits differ.
        all_global = MaskedLM(dataclasses.replace(dims, global_attention_every=1)).eval()
        all_global.load_state_dict(ours.state_dict())
        other = all_global(ids, mask, return_logits=True).logits
    assert_same_logits(mine[mask], hf[mask])
    assert (other[mask] - mine[mask]).abs().max() > 1e-3


def test_training_loss_and_gradients_equal_transformers_eager():
    """The unpadded path (packed tokens, CPU length groups with the window's band, rotary on packed positions,
    the sparse head) against ModernBertForMaskedLM, eager attention, every row padded, F.cross_entropy."""
    from encoder_train.data.loader import collate
    from encoder_train.layouts import Packed

    tokenizer = word_level_tokenizer(VOCAB)
    dims = modern_dims()
    torch.manual_seed(0)
    ours = MaskedLM(dims)
    perturb(ours)
    theirs = hf_model(dims, tokenizer)
    ours_into_theirs(ours, theirs)

    g = torch.Generator().manual_seed(1)
    lengths = [30, 29, 28, 12, 11, 10, 4, 3]
    rows = [torch.cat([torch.tensor([0]), torch.randint(5, VOCAB, (n - 2,), generator=g), torch.tensor([2])])
            for n in lengths]
    spec = MaskSpec(pad_id=PAD, mask_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=VOCAB, probability=0.3)
    b = collate(rows, spec, seed=0)
    assert len(Packed(b.attention_mask, *b.packing).groups()) > 1

    loss = ours(b.input_ids, b.attention_mask, b.labels, b.predict_positions, packing=b.packing).loss
    loss.backward()
    theirs.train()
    logits = theirs(input_ids=b.input_ids, attention_mask=b.attention_mask.long()).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), b.labels.reshape(-1), ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    mine = {n: p.grad for n, p in ours.named_parameters()}
    hf_grads = from_hf({n: p.grad for n, p in theirs.named_parameters()}, dims)
    for name, grad in mine.items():
        torch.testing.assert_close(grad, hf_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_export_loads_as_modernbert_and_serves_fill_mask(tmp_path, word_tokenizer):
    dims = modern_dims(vocab_size=VOCAB + 8)
    path, ours = write_checkpoint(tmp_path / "ckpt", word_tokenizer, dims)
    out = export_checkpoint(path, tmp_path / "hf")
    model = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(model).__name__ == "ModernBertForMaskedLM"
    cfg = model.config
    assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert cfg.sliding_window == 4 and cfg.rope_parameters["full_attention"]["rope_theta"] == 160_000.0
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0 and not cfg.norm_bias
    ids, mask = padded_batch(VOCAB, [30, 14, 5])
    with torch.no_grad():
        assert_same_logits(ours(ids, mask, return_logits=True).logits[mask],
                           model(input_ids=ids, attention_mask=mask.long()).logits[mask])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.mask_token == "<mask>" and tok.pad_token_id == PAD
    fill = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out))
    assert len(fill("w5 w6 <mask> w7")) == 5
    # export -> import: identical tensors
    back = import_hf(out)
    assert back.dims == dims
    state = ours.state_dict()
    assert back.state_dict.keys() == state.keys()
    assert all(torch.equal(back.state_dict[k], state[k]) for k in state)


def test_import_of_a_transformers_made_modernbert(tmp_path, word_tokenizer):
    dims = modern_dims(global_attention_every=2, local_attention=6)
    torch.manual_seed(3)
    theirs = hf_model(dims, word_tokenizer)
    perturb(theirs, seed=5)
    folder = tmp_path / "modernbert"
    theirs.save_pretrained(folder)
    word_tokenizer.save(str(folder / "tokenizer.json"))
    imported = import_hf(folder)
    assert imported.dims == dims
    ours = MaskedLM(imported.dims).eval()
    ours.load_state_dict(imported.state_dict)
    ids, mask = padded_batch(VOCAB, [25, 19, 7])
    with torch.no_grad():
        assert_same_logits(ours(ids, mask, return_logits=True).logits[mask],
                           theirs.eval()(input_ids=ids, attention_mask=mask.long()).logits[mask])


def test_options_neither_class_can_express_are_refused(tmp_path, word_tokenizer):
    from encoder_train.errors import UserError
    from encoder_train.hf import family_of

    for changes, pattern in [({"feed_forward": "gelu"}, "model.feed_forward"),
                             ({"token_type_embedding": True}, "model.token_type_embedding"),
                             ({"pre_layer_norm": False}, "model.pre_layer_norm")]:
        with pytest.raises(UserError, match=pattern):
            family_of(modern_dims(**changes))
    learned = ModelDims(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                        max_position_embeddings=64, pad_id=PAD, feed_forward="geglu")
    with pytest.raises(UserError, match="model.feed_forward = 'geglu' with learned positions"):
        family_of(learned)


def test_bundled_modernbert_configs_have_transformers_parameter_counts():
    from encoder_train.state import model_dims

    for name, hf_kwargs in [("modernbert-base.yaml", {}),
                            ("modernbert-large.yaml", dict(hidden_size=1024, intermediate_size=2624,
                                                           num_hidden_layers=28, num_attention_heads=16))]:
        cfg = load_config(BUNDLED_CONFIG_DIR / name)
        dims = model_dims(cfg.model, 50_280, 50_283, name)  # ModernBERT's tokenizer: 50,280 tokens, pad 50283
        with torch.device("meta"):
            ours = MaskedLM(dims).num_parameters()
            theirs = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**hf_kwargs)).num_parameters()
        assert ours == theirs, name
    tiny = load_config(BUNDLED_CONFIG_DIR / "tiny-modernbert.yaml").model
    assert tiny.local_attention < 128 and tiny.global_attention_every > 1 and tiny.position_embedding == "rotary"


def _train_cmd(data, tok, ckpt, *extra):
    import sys

    return [sys.executable, "-m", "encoder_train", "train", "--config_file", "tiny-modernbert.yaml", "--data_dir",
            str(data), "--tokenizer_filepath", str(tok), "--checkpoint_dir", str(ckpt), "--set", "data.num_workers=0",
            "--set", "training.log_interval=1", "--checkpoint_every", "3", "--batch_size", "8", *map(str, extra)]


@pytest.mark.slow
def test_kill_and_resume_is_bit_exact_for_the_modern_family(tmp_path, shard_dir, tokenizer_file):
    import os
    import signal
    import subprocess
    import time

    from encoder_train import checkpoint

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 24
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(shard_dir, tokenizer_file, straight, "--max_steps", steps), check=True,
                   capture_output=True, env=env)
    faulty = tmp_path / "faulty"
    proc = subprocess.Popen(_train_cmd(shard_dir, tokenizer_file, faulty, "--max_steps", steps),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while len(checkpoint.list_checkpoints(faulty)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.list_checkpoints(faulty)[-1][0] < steps
    done = subprocess.run(_train_cmd(shard_dir, tokenizer_file, faulty, "--max_steps", steps, "--load_checkpoint",
                                     "latest"), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    a = checkpoint.load(checkpoint.checkpoint_path(straight, steps))["model"]
    b = checkpoint.load(checkpoint.checkpoint_path(faulty, steps))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_context_extension_resumes_with_longer_rows_and_another_global_theta(capsys, tmp_path, tokenizer_file):
    from conftest import make_shards
    from encoder_train import checkpoint
    from encoder_train.cli import main

    short, long = make_shards(tmp_path / "short", width=32), make_shards(tmp_path / "long", width=100, seed=5)
    ckpt = tmp_path / "ckpt"
    common = ["train", "--config_file", "tiny-modernbert.yaml", "--tokenizer_filepath", str(tokenizer_file),
              "--checkpoint_dir", str(ckpt), "--batch_size", "4", "--set", "data.num_workers=0"]
    assert main([*common, "--data_dir", str(short), "--max_steps", "6",
                 "--set", "model.max_position_embeddings=32"]) == 0
    # Rows of 100 tokens do not fit the first stage's 32 positions ...
    assert main([*common, "--data_dir", str(long), "--max_steps", "6", "--set", "model.max_position_embeddings=32",
                 "--load_checkpoint", "latest"]) == 2
    capsys.readouterr()
    # ... the extension stage raises the positions and the global base, and resumes the same weights.
    assert main([*common, "--data_dir", str(long), "--max_steps", "12", "--set", "model.max_position_embeddings=128",
                 "--set", "model.rope_theta=320000", "--load_checkpoint", "latest"]) == 0
    out = capsys.readouterr().out
    assert "model.rope_theta 160000.0 -> 320000.0" in out and "model.max_position_embeddings 32 -> 128" in out
    state = checkpoint.load(checkpoint.checkpoint_path(ckpt, 12))
    assert state["dims"]["max_position_embeddings"] == 128 and state["dims"]["rope_theta"] == 320000.0


def test_family_key_sets_the_architecture_and_each_key_still_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {family: modernbert, hidden_size: 64, num_heads: 2, norm_bias: true}\n")
    m = load_config(p).model
    assert (m.position_embedding, m.feed_forward, m.global_attention_every, m.pre_layer_norm) == (
        "rotary", "geglu", 3, True)
    assert m.norm_bias is True and m.attention_bias is False  # the file's key wins over the family
    p.write_text("model: {hidden_size: 64, num_heads: 2}\n")
    assert load_config(p).model.position_embedding == "learned"  # RoBERTa stays the default


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_attention_paths_with_the_window_equal_the_cpu_path():
    """SDPA with the band mask (fp32), and FlashAttention's window_size where flash-attn is installed (bf16),
    against the CPU's length-grouped path, on the training layout (packed tokens)."""
    from encoder_train.data.loader import collate

    dims = modern_dims()
    torch.manual_seed(0)
    model = MaskedLM(dims).eval()
    perturb(model)
    g = torch.Generator().manual_seed(1)
    rows = [torch.cat([torch.tensor([0]), torch.randint(5, VOCAB, (n - 2,), generator=g), torch.tensor([2])])
            for n in [30, 21, 12, 5]]
    spec = MaskSpec(pad_id=PAD, mask_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=VOCAB, probability=0.3)
    b = collate(rows, spec, seed=0)
    with torch.no_grad():
        cpu = model(b.input_ids, b.attention_mask, b.labels, b.predict_positions, packing=b.packing,
                    return_predicted_logits=True).predicted_logits
        gpu_batch = b.to(torch.device("cuda"))
        model.cuda()
        sdpa = model(gpu_batch.input_ids, gpu_batch.attention_mask, gpu_batch.labels, gpu_batch.predict_positions,
                     packing=gpu_batch.packing, return_predicted_logits=True).predicted_logits
        torch.testing.assert_close(sdpa.cpu(), cpu, rtol=1e-4, atol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(gpu_batch.input_ids, gpu_batch.attention_mask, gpu_batch.labels, gpu_batch.predict_positions,
                         packing=gpu_batch.packing, return_predicted_logits=True).predicted_logits
        assert (bf16.float().cpu() - cpu).abs().max() < 0.05 * cpu.abs().max()


@pytest.mark.parametrize("T,window", [(512, 128), (100, 16), (37, 8), (64, 3), (129, 16), (120, 16)])
def test_blockwise_sliding_window_equals_the_dense_band(T, window):
    """The CPU's local layers on long rows score each query block against three key blocks only; the outputs of
    real queries and every gradient equal dense attention under the band mask, with pads in the rows."""
    from encoder_train.kernels import attention, key_bias
    from encoder_train.layouts import band, combine, window_bias

    g = torch.Generator().manual_seed(T + window)
    b, nh, hs = 3, 2, 8
    # As the model hands them over: (b, T, nh, hs) transposed, not contiguous
    q, k, v = (torch.randn(b, T, nh, hs, dtype=torch.float64, generator=g).transpose(1, 2).requires_grad_()
               for _ in range(3))
    lengths = torch.tensor([T, T // 2 + 1, T // 3 + 1])
    real = torch.arange(T)[None] < lengths[:, None]  # (b, T)
    cpu = torch.device("cpu")
    for mask in (real, None):
        bias, block = band(None if mask is None else key_bias(mask, torch.float32), T, window, mask, cpu)
        dense = combine(None if mask is None else key_bias(mask, torch.float32), window_bias(T, window, mask, cpu))
        assert block == max(window // 2, 1)
        keep = (real if mask is not None else torch.ones_like(real))[:, None, :, None]
        weight = torch.randn(b, nh, T, hs, dtype=torch.float64, generator=g) * keep  # pad queries: discarded
        ours, reference = attention(q, k, v, bias, 0.0, block), attention(q, k, v, dense, 0.0)
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours * keep, reference * keep, rtol=1e-6, atol=1e-6)
        for a, r in zip(torch.autograd.grad((ours * weight).sum(), (q, k, v)),
                        torch.autograd.grad((reference * weight).sum(), (q, k, v)), strict=True):
            torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
    # Rows too short for blocks to pay keep the dense band.
    assert band(None, 192, 128, None, cpu)[1] is None


@pytest.mark.parametrize("window", [None, 16])
def test_cpu_attention_in_chunks_of_rows_equals_one_pass(monkeypatch, window):
    """Long rows' scores are computed a few rows at a time (to stay in the caches): same outputs and gradients,
    for dense attention with a key bias and for the blockwise window."""
    from encoder_train import kernels
    from encoder_train.layouts import band

    g = torch.Generator().manual_seed(3)
    b, nh, T, hs = 5, 2, 96, 8
    q, k, v = (torch.randn(b, nh, T, hs, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3))
    real = torch.arange(T)[None] < torch.tensor([96, 90, 50, 40, 33])[:, None]
    bias = kernels.key_bias(real, torch.float32)
    block = None
    if window:
        bias, block = band(bias, T, window, real, torch.device("cpu"))
        assert block is not None
    weight = torch.randn(b, nh, T, hs, dtype=torch.float64, generator=g) * real[:, None, :, None]
    outputs = []
    per_row = nh * T * (3 * block if block else T)  # scores of one row
    for limit in (b * per_row, 2 * per_row):  # one pass; chunks of 2, 2 and 1 rows
        monkeypatch.setattr(kernels, "CPU_SCORES_PER_CHUNK", limit)
        y = kernels.attention(q, k, v, bias, 0.0, block)
        outputs.append((y, *torch.autograd.grad((y * weight).sum(), (q, k, v))))
    for one, chunked in zip(*outputs, strict=True):
        torch.testing.assert_close(one, chunked, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_compiled_layers_give_the_eager_loss_and_gradients_with_blockwise_windows():
    """training.compile on the CPU (dynamic shapes) around local layers scored blockwise: full rows whose length is a
    multiple of the block (Padded, no tail to pad) and padded rows (Packed length groups)."""
    from encoder_train.data.loader import collate
    from encoder_train.model import compile_layers

    dims = modern_dims(local_attention=16, max_position_embeddings=128)
    torch.manual_seed(0)
    eager, compiled = MaskedLM(dims), MaskedLM(dims)
    compiled.load_state_dict(eager.state_dict())
    compile_layers(compiled, backend="aot_eager")
    spec = MaskSpec(pad_id=PAD, mask_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=VOCAB, probability=0.3)
    g = torch.Generator().manual_seed(1)
    for lengths in ([120, 120, 120], [100, 90, 40, 20]):
        rows = [torch.cat([torch.tensor([0]), torch.randint(5, VOCAB, (n - 2,), generator=g), torch.tensor([2])])
                for n in lengths]
        b = collate(rows, spec, seed=0)
        losses = []
        for model in (eager, compiled):
            model.zero_grad()
            loss = model(b.input_ids, b.attention_mask, b.labels, b.predict_positions, packing=b.packing).loss
            loss.backward()
            losses.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
        torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-5, atol=1e-6)
        for name, grad in losses[0][1].items():
            torch.testing.assert_close(losses[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
