"""An export is also a sentence-transformers model: `SentenceTransformer(folder)` loads it with no warning and
encodes each text as the mean of the encoder's last hidden states over its real tokens, for both families."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

pytest.importorskip("sentence_transformers")

from sentence_transformers import SentenceTransformer  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from encoder_train.hf import export_checkpoint  # noqa: E402
from helpers.hf_models import dims_for, modern_dims, write_checkpoint  # noqa: E402

TEXTS = ["the model reads a token", "the café writes 3 words, then the model stops.", "stops"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("family", ["roberta", "modernbert"])
def test_sentence_transformers_loads_an_export_without_warnings_and_mean_pools(tmp_path, bpe_tokenizer, caplog,  # noqa: F811
                                                                              family):
    vocab = bpe_tokenizer.get_vocab_size()
    dims = dims_for(vocab) if family == "roberta" else modern_dims(vocab_size=vocab)
    path, _ = write_checkpoint(tmp_path / "ckpt", bpe_tokenizer, dims)
    out = export_checkpoint(path, tmp_path / "export")

    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = SentenceTransformer(str(out), device="cpu")
    noisy = [r for r in caplog.records if r.name.startswith(("sentence_transformers", "transformers"))]
    assert not noisy, [r.getMessage() for r in noisy]
    assert not [w for w in caught if "sentence_transformers" in str(w.filename) or "transformers" in str(w.filename)], \
        [str(w.message) for w in caught]
    assert model.max_seq_length == dims.max_tokens
    got = torch.from_numpy(model.encode(TEXTS, batch_size=2))  # padded batches: the mean must skip the pads

    # The expected vectors from transformers' own encoder, one text at a time (no padding at all).
    tokenizer, encoder = AutoTokenizer.from_pretrained(out), AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        expected = torch.stack([encoder(**tokenizer(t, return_tensors="pt")).last_hidden_state[0].mean(0)
                                for t in TEXTS])
    assert got.shape == (len(TEXTS), dims.hidden_size)
    # fp32 through a 2-layer encoder of width 32: rounding differences between a padded batch and a single row are
    # ~1e-6 of the values' scale; a wrong pooling (the <s> state, pads included) differs by tens of percent.
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
