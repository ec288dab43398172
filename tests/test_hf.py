"""Hugging Face interop against the real `transformers`: export parity with RobertaForMaskedLM, a bit-exact
export -> import round trip, import of a model made by transformers itself, AutoTokenizer and the fill-mask
pipeline on an export, and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    RobertaConfig,
    RobertaForMaskedLM,
    pipeline,
)

from conftest import PAD, VOCAB, make_tokenizer
from encoder_train.batch import MaskSpec
from encoder_train.errors import UserError
from encoder_train.hf import export_checkpoint, import_hf
from encoder_train.model import MaskedLM
from encoder_train.tokenizer import special_tokens
from helpers.hf_models import assert_same_logits, dims_for, padded_batch, perturb, write_checkpoint


@pytest.fixture
def word_tokenizer(tmp_path) -> Tokenizer:
    return Tokenizer.from_file(str(make_tokenizer(tmp_path / "word.json")))


# ---- export -------------------------------------------------------------------------------------


def test_export_gives_our_logits(tmp_path, word_tokenizer):
    dims = dims_for(VOCAB + 8)  # embedding rows padded past the tokenizer, as pad_vocab_multiple does
    path, ours = write_checkpoint(tmp_path / "ckpt", word_tokenizer, dims)
    out = export_checkpoint(path, tmp_path / "hf")

    theirs = AutoModelForMaskedLM.from_pretrained(str(out)).eval()
    assert type(theirs) is RobertaForMaskedLM
    config = json.loads((out / "config.json").read_text())
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (1, 0, 2)
    assert config["type_vocab_size"] == 1 and config["layer_norm_eps"] == dims.layer_norm_eps

    ids, mask = padded_batch(dims.vocab_size, [17, 9, 3, 1])
    with torch.no_grad():
        expected = ours(ids, mask, return_logits=True).logits
        got = theirs(input_ids=ids, attention_mask=mask.long()).logits
    assert_same_logits(expected, got)


def test_export_then_import_is_bit_exact(tmp_path, word_tokenizer):
    dims = dims_for(VOCAB, dropout=0.05, attention_dropout=0.0, layer_norm_eps=1e-6)
    path, ours = write_checkpoint(tmp_path / "ckpt", word_tokenizer, dims)
    back = import_hf(export_checkpoint(path, tmp_path / "hf"))

    assert back.dims == dims
    expected = ours.state_dict()
    assert back.state_dict.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(back.state_dict[name], tensor), name
    assert back.tokenizer.to_str() == word_tokenizer.to_str()


def test_autotokenizer_and_fill_mask_pipeline(tmp_path, bpe_tokenizer):
    path, _ = write_checkpoint(tmp_path / "ckpt", bpe_tokenizer, dims_for(bpe_tokenizer.get_vocab_size()))
    out = export_checkpoint(path, tmp_path / "hf")

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.is_fast
    roles = {"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
             "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>"}
    assert {k: getattr(tok, k) for k in roles} == roles
    ids = (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id)
    assert ids == (0, 1, 2, 3, 4)
    text = "the model <mask> a token."
    assert tok(text)["input_ids"] == bpe_tokenizer.encode(text).ids  # <s> ... </s>, <mask> as one token

    fill = pipeline("fill-mask", model=str(out), tokenizer=str(out))
    results = fill(text, top_k=3)
    assert len(results) == 3
    assert all(r["token_str"] and r["sequence"].startswith("the model") for r in results)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)


def test_export_refuses_pre_layer_norm(tmp_path, word_tokenizer):
    path, _ = write_checkpoint(tmp_path / "ckpt", word_tokenizer, dims_for(VOCAB, pre_layer_norm=True))
    with pytest.raises(UserError, match="pre-LN"):
        export_checkpoint(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_without_transformers_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    adds = r"needs the transformers package.*pip install (-e '.*|'encoder-train)\[hf\]' adds it"
    with pytest.raises(UserError, match=adds):
        export_checkpoint(tmp_path / "checkpoint_00000002.pt", tmp_path / "hf")


def test_export_refuses_a_non_empty_folder_unless_overwrite(tmp_path, word_tokenizer):
    path, _ = write_checkpoint(tmp_path / "ckpt", word_tokenizer, dims_for(VOCAB))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_checkpoint(path, out)
    export_checkpoint(path, out, overwrite=True)
    export_checkpoint(path, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "1_Pooling", "config.json", "config_sentence_transformers.json", "model.safetensors", "modules.json",
        "notes.txt", "sentence_bert_config.json", "tokenizer.json", "tokenizer_config.json"]
    with pytest.raises(UserError, match="does not exist"):
        export_checkpoint(tmp_path / "nowhere.pt", tmp_path / "hf2")


# ---- import -------------------------------------------------------------------------------------


@pytest.fixture
def transformers_folder(tmp_path, word_tokenizer) -> tuple[Path, RobertaForMaskedLM]:
    """A RobertaForMaskedLM made and saved by transformers itself, with a tokenizer.json beside it."""
    config = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=40, pad_token_id=PAD, layer_norm_eps=1e-5,
                           type_vocab_size=2)  # RobertaConfig's default; only type 0 is ever used
    torch.manual_seed(0)
    model = RobertaForMaskedLM(config)
    perturb(model, seed=1)
    folder = tmp_path / "roberta"
    model.save_pretrained(folder)
    word_tokenizer.save(str(folder / "tokenizer.json"))
    return folder, model.eval()


def save_sharded(model: RobertaForMaskedLM, folder: Path, bin_files: bool = False) -> Path:
    """Replace the folder's model.safetensors by shards and their index; with `bin_files`, pytorch_model-*.bin
    shards (transformers 5 writes only safetensors). Returns the index."""
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="20KB")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    if not bin_files:
        return index_file
    renamed = {s: s.replace("model-", "pytorch_model-").replace(".safetensors", ".bin") for s in shards}
    for shard, name in renamed.items():
        torch.save(load_file(folder / shard), folder / name)
        (folder / shard).unlink()
    index_file.unlink()
    index_file = folder / "pytorch_model.bin.index.json"
    index_file.write_text(json.dumps({**index, "weight_map": {k: renamed[v] for k, v in index["weight_map"].items()}}))
    return index_file


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin", "sharded model.safetensors",
                                     "sharded pytorch_model.bin"])
def test_import_of_a_transformers_model_gives_its_logits(transformers_folder, weights):
    folder, theirs = transformers_folder
    if weights == "pytorch_model.bin":  # the older format, with the tied decoder stored twice
        torch.save(theirs.state_dict(), folder / weights)
        (folder / "model.safetensors").unlink()
    elif weights.startswith("sharded"):
        save_sharded(theirs, folder, bin_files=weights.endswith(".bin"))

    hf = import_hf(folder)
    ours = MaskedLM(hf.dims).eval()
    ours.load_state_dict(hf.state_dict)
    ids, mask = padded_batch(VOCAB, [20, 11, 4])
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask.long()).logits
        got = ours(ids, mask, return_logits=True).logits
    assert_same_logits(expected, got)
    assert hf.dims.max_tokens == 38 and special_tokens(hf.tokenizer).mask == 4


def test_import_refusals(transformers_folder, tmp_path):
    folder, _ = transformers_folder
    with pytest.raises(UserError, match="is not a folder"):
        import_hf(tmp_path / "nowhere")

    bert = tmp_path / "bert"
    BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(bert)
    with pytest.raises(UserError, match="bert.*has no model.safetensors nor pytorch_model.bin"):  # BERT: supported
        import_hf(bert)

    make_tokenizer(folder / "tokenizer.json", vocab=VOCAB + 10)
    with pytest.raises(UserError, match=f"tokenizer.json has {VOCAB + 10} tokens.*vocab_size {VOCAB}"):
        import_hf(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json"):
        import_hf(folder)

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(UserError, match=r"says intermediate_size 48 but .*model.safetensors holds "
                                        r".*intermediate.dense.weight of shape \(64, 32\)"):
        import_hf(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model.safetensors nor pytorch_model.bin"):
        import_hf(folder)
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="config.json does not exist"):
        import_hf(folder)


@pytest.mark.parametrize("key,value,named", [
    ("hidden_size", 10**9, "hidden_size 1000000000"), ("num_hidden_layers", 1000, "num_hidden_layers 1000"),
    ("intermediate_size", 10**9, "intermediate_size 1000000000"), ("vocab_size", VOCAB + 1, f"vocab_size {VOCAB + 1}"),
    ("max_position_embeddings", 10**9, "max_position_embeddings 1000000000")])
def test_absurd_sizes_in_config_json_are_refused_before_anything_is_allocated(transformers_folder, key, value, named):
    """The config is compared with the weights' stored shapes first: under a 3 GB address-space cap (the model is
    tiny; a hidden size of 10^9 would need TBs) the import refuses in one sentence instead of running out of memory."""
    folder, _ = transformers_folder
    config = json.loads((folder / "config.json").read_text())
    heads = {"num_attention_heads": 1} if key == "hidden_size" else {}
    (folder / "config.json").write_text(json.dumps({**config, key: value, **heads}))
    script = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from encoder_train.errors import UserError
from encoder_train.hf import import_hf
try:
    import_hf({str(folder)!r})
except UserError as e:
    print(e)
    sys.exit(2)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"says {named} but" in proc.stdout and "Traceback" not in proc.stderr


def test_import_refuses_what_our_model_cannot_compute(transformers_folder):
    folder, theirs = transformers_folder
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu_new"}))
    with pytest.raises(UserError, match="hidden_act to 'gelu_new'; our model supports only 'gelu'"):
        import_hf(folder)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(UserError, match="'gpt2' model; only RobertaForMaskedLM, ModernBertForMaskedLM"):
        import_hf(folder)
    (folder / "config.json").write_text(json.dumps(config))

    (folder / "model.safetensors").unlink()
    weights = theirs.state_dict()
    untied = {**weights, "lm_head.decoder.weight": weights["lm_head.decoder.weight"] + 1}
    torch.save(untied, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="lm_head.decoder.weight differs .* untied head cannot be imported"):
        import_hf(folder)
    extra = {**weights, "roberta.encoder.layer.0.attention.self.distance_embedding.weight": torch.zeros(79, 16)}
    torch.save(extra, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="no place for .*distance_embedding"):
        import_hf(folder)


class RunsCode:
    """Unpickling this calls os.mkdir(path): what a .bin must never be allowed to do on loading."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_import_loads_bin_files_safely_and_reports_broken_weights_in_one_sentence(transformers_folder, tmp_path):
    folder, theirs = transformers_folder
    weights = theirs.state_dict()
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code_ran"
    torch.save({**weights, "extra": RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model.bin holds objects that safe \(weights_only\) loading refuses"):
        import_hf(folder)
    assert not marker.exists()
    (folder / "pytorch_model.bin").unlink()

    without = {k: v.contiguous() for k, v in weights.items() if k not in
               ("roberta.encoder.layer.1.output.dense.weight", "lm_head.decoder.weight", "lm_head.decoder.bias")}
    save_file(without, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match="model.safetensors has no roberta.encoder.layer.1.output.dense.weight"):
        import_hf(folder)

    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="model.safetensors could not be read by transformers") as e:
        import_hf(folder)
    assert "\n" not in str(e.value)

    (folder / "model.safetensors").unlink()
    theirs.save_pretrained(folder)  # back to a whole folder, then sharded, less one shard
    index = save_sharded(theirs, folder)
    (folder / json.loads(index.read_text())["weight_map"]["lm_head.bias"]).unlink()
    with pytest.raises(UserError, match="model.safetensors.index.json could not be read by transformers"):
        import_hf(folder)


def test_import_reads_vocab_and_merges_without_tokenizer_json(tmp_path, bpe_tokenizer):
    path, _ = write_checkpoint(tmp_path / "ckpt", bpe_tokenizer, dims_for(bpe_tokenizer.get_vocab_size()))
    out = export_checkpoint(path, tmp_path / "hf")
    (out / "tokenizer.json").unlink()
    bpe_tokenizer.model.save(str(out))  # RoBERTa's two files: vocab.json, merges.txt

    tok = import_hf(out).tokenizer
    for text in ["the model <mask> a token.", "café writes 12 words"]:
        assert tok.encode(text).ids == bpe_tokenizer.encode(text).ids
        assert tok.decode(tok.encode(text).ids) == bpe_tokenizer.decode(bpe_tokenizer.encode(text).ids)


def test_cli_export_then_continue_pretraining_from_it(capsys, tmp_path, shard_dir, tokenizer_file):
    """train -> export -> train --init_from_hf: the second run starts from the exported weights."""
    from encoder_train.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, "
                   "max_position_embeddings: 130}\ntraining: {batch_size: 8, max_steps: 3, precision: fp32}\n")
    base = ["--data_dir", str(shard_dir), "--config_file", str(cfg)]
    assert main(["train", *base, "--tokenizer_filepath", str(tokenizer_file), "--checkpoint_dir",
                 str(tmp_path / "a")]) == 0
    first = torch.load(tmp_path / "a" / "checkpoint_00000003.pt", weights_only=True)["model"]
    assert main(["export", "--checkpoint", str(tmp_path / "a" / "checkpoint_00000003.pt"), "--output_dir",
                 str(tmp_path / "hf")]) == 0
    assert RobertaForMaskedLM.from_pretrained(tmp_path / "hf") is not None

    # A tiny learning rate: after training, the weights are still those of the export, not a new init.
    tiny_lr = tmp_path / "tiny_lr.yaml"
    tiny_lr.write_text(cfg.read_text().replace("precision: fp32", "precision: fp32, learning_rate: 1.0e-12"))
    capsys.readouterr()
    assert main(["train", "--data_dir", str(shard_dir), "--config_file", str(tiny_lr), "--init_from_hf",
                 str(tmp_path / "hf"), "--checkpoint_dir", str(tmp_path / "b")]) == 0
    assert "starting from the weights in" in capsys.readouterr().out
    second = torch.load(tmp_path / "b" / "checkpoint_00000003.pt", weights_only=True)["model"]
    assert second.keys() == first.keys()
    for k in first:
        torch.testing.assert_close(second[k], first[k], rtol=0, atol=1e-6)

    # Exporting again into the same folder is refused without --overwrite.
    rc = main(["export", "--checkpoint", str(tmp_path / "a" / "checkpoint_00000003.pt"), "--output_dir",
               str(tmp_path / "hf")])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


# ---- the fast training path against a straightforward dense computation --------------------------


def test_training_loss_and_gradients_equal_a_dense_transformers_computation():
    """Our training step's fast path (unpadded activations, attention in length groups, a loss over the
    predicted positions only, the fused cross-entropy) against transformers' RobertaForMaskedLM with
    eager attention: every row padded to the longest, logits at every position, F.cross_entropy with
    ignore_index. Same weights, same masked batch: same loss, same gradient for every parameter."""
    from encoder_train.data.loader import collate
    from encoder_train.hf import hf_names
    from encoder_train.layouts import Packed

    dims = dims_for(VOCAB, dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    ours = MaskedLM(dims)
    perturb(ours)
    theirs = RobertaForMaskedLM(RobertaConfig(
        vocab_size=dims.vocab_size, hidden_size=dims.hidden_size, num_hidden_layers=dims.num_layers,
        num_attention_heads=dims.num_heads, intermediate_size=dims.intermediate_size, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=dims.max_position_embeddings,
        type_vocab_size=1, layer_norm_eps=dims.layer_norm_eps, pad_token_id=PAD, tie_word_embeddings=True,
        attn_implementation="eager"))
    names = hf_names(dims)
    missing, _ = theirs.load_state_dict({names[k]: v for k, v in ours.state_dict().items()}, strict=False)
    assert all(n.startswith("lm_head.decoder") or "position_ids" in n for n in missing), missing
    theirs.tie_weights()

    # Rows of very different lengths, so that attention runs in more than one length group.
    g = torch.Generator().manual_seed(1)
    lengths = [30, 29, 28, 12, 11, 10, 4, 3]
    rows = [torch.cat([torch.tensor([0]), torch.randint(5, VOCAB, (n - 2,), generator=g), torch.tensor([2])])
            for n in lengths]
    spec = MaskSpec(pad_id=PAD, mask_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=VOCAB, probability=0.3)
    b = collate(rows, spec, seed=0)
    layout = Packed(b.attention_mask, *b.packing)
    assert len(layout.groups()) > 1

    loss = ours(b.input_ids, b.attention_mask, b.labels, b.predict_positions, packing=b.packing).loss
    loss.backward()
    theirs.train()  # dropout is 0: train mode only makes the comparison about the training code path
    logits = theirs(input_ids=b.input_ids, attention_mask=b.attention_mask.long()).logits  # (B, T, V)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), b.labels.reshape(-1), ignore_index=-100)
    expected.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    hf_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[names[name]].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_init_from_hf_resolved_config_is_the_folders_shape(capsys, tmp_path, shard_dir, transformers_folder):
    """The written and stored config describe the model that runs (the folder's), not the YAML's shape."""
    from encoder_train.cli import main

    folder, hf_model = transformers_folder
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {hidden_size: 64, num_layers: 1, num_heads: 2, intermediate_size: 128}\n"
                   "training: {batch_size: 8, max_steps: 2, precision: fp32}\n")
    capsys.readouterr()
    assert main(["train", "--data_dir", str(shard_dir), "--config_file", str(cfg), "--init_from_hf", str(folder),
                 "--checkpoint_dir", str(tmp_path / "c")]) == 0
    written = (tmp_path / "c" / "config.yaml").read_text()  # the resolved config, beside the checkpoints
    hf = hf_model.config
    assert f"hidden_size: {hf.hidden_size}" in written and "hidden_size: 64" not in written
    stored = torch.load(tmp_path / "c" / "checkpoint_00000002.pt", weights_only=True)["config"]["model"]
    assert (stored["hidden_size"], stored["num_layers"], stored["intermediate_size"]) == (
        hf.hidden_size, hf.num_hidden_layers, hf.intermediate_size)
    assert stored["max_position_embeddings"] == hf.max_position_embeddings
