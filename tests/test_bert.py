"""The BERT family against the real `transformers`: a BertForMaskedLM folder imports with the same logits,
trains (masked-LM only) from the command line, resumes, and exports back to BertForMaskedLM and to
sentence-transformers; `family: bert` trains from scratch on a WordPiece tokenizer that `encoder-train tokenizer
--type wordpiece` trains, whose [CLS] and [SEP] pretokenize puts where the model expects them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from encoder_train.cli import main
from encoder_train.hf import export_checkpoint, import_hf
from encoder_train.model import MaskedLM
from encoder_train.state import load_trained
from encoder_train.tokenizer import special_tokens
from helpers.hf_models import assert_same_logits, perturb

transformers = pytest.importorskip("transformers")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("the a model reads writes token word text and then stops runs on of in to is it was "
         "cat dog sat mat fox quick brown lazy jumps over under , . !").split()
PIECES = ["##s", "##ed", "##ing", "##er"]
SENTENCES = ["the quick brown fox jumps over the lazy dog .", "the cat sat on the mat , then it runs !",
             "a model reads tokens and writes words .", "the dog was lazy , the fox was quick ."]


def wordpiece_tokenizer() -> Tokenizer:
    """BERT's uncased WordPiece pipeline over a tiny vocabulary: [PAD] [UNK] [CLS] [SEP] [MASK] at ids 0..4."""
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + PIECES)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    return tok


def bert_config(vocab_size: int, **changes):
    return transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **changes)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A BertForMaskedLM as transformers saves it (weights moved off their init, type 1 row included), with
    its tokenizer.json."""
    folder = tmp_path_factory.mktemp("bert")
    tok = wordpiece_tokenizer()
    torch.manual_seed(0)
    theirs = transformers.BertForMaskedLM(bert_config(tok.get_vocab_size() + 3))  # rows padded past the tokenizer
    perturb(theirs)
    theirs.tie_weights()
    theirs.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder, theirs.eval()


def ids_and_mask(tok: Tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] text [SEP] per row, right-padded with [PAD]: (B, T) ids and mask."""
    rows = [tok.encode(t).ids for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return ids, ids != 0


def test_import_gives_transformers_logits(bert_folder):
    folder, theirs = bert_folder
    hf = import_hf(folder)
    d = hf.dims
    assert (d.position_start, d.type_vocab_size, d.layer_norm_eps, d.max_tokens) == ("zero", 2, 1e-12, 64)
    assert hf.state_dict["embeddings.token_type_embeddings.weight"].shape == (2, 32)  # type 1 kept for export
    ours = MaskedLM(d).eval()
    ours.load_state_dict(hf.state_dict)
    tok = hf.tokenizer
    assert special_tokens(tok) == special_tokens(wordpiece_tokenizer())
    ids, mask = ids_and_mask(tok, SENTENCES[:3] + ["stops"])
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask.long()).logits
        got = ours(ids, mask, return_logits=True).logits
    assert_same_logits(expected[mask], got[mask])  # the real tokens' logits; pads are nobody's prediction


def test_export_then_import_is_bit_exact_and_transformers_loads_it_whole(tmp_path, bert_folder):
    from helpers.hf_models import write_checkpoint

    folder, _ = bert_folder
    hf = import_hf(folder)
    path, ours = write_checkpoint(tmp_path / "ckpt", hf.tokenizer, hf.dims)
    out = export_checkpoint(path, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["type_vocab_size"]) == (
        "bert", ["BertForMaskedLM"], 2)

    theirs, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert type(theirs) is transformers.BertForMaskedLM
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    back = import_hf(out)
    assert back.dims == hf.dims
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict[name], tensor), name


def pretokenize(tmp_path: Path, tokenizer: Path, seq_len: int = 24) -> Path:
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(SENTENCES[i % 4] for i in range(300)) + "\n")
    out = tmp_path / "shards"
    assert main(["pretokenize", "--input", str(text), "--tokenizer_filepath", str(tokenizer), "--output_dir",
                 str(out), "--seq_len", str(seq_len), "--val_fraction", "0"]) == 0
    return out / "train"


def test_continue_pretraining_resume_and_export(tmp_path, bert_folder, capsys):
    """--init_from_hf of a BERT folder trains, resumes, exports to BertForMaskedLM with our logits, and to
    sentence-transformers, which encodes as our model's mean-pooled last hidden states."""
    folder, _ = bert_folder
    shards = pretokenize(tmp_path, folder / "tokenizer.json")
    rows = torch.cat([torch.load(p, weights_only=True) for p in sorted(shards.rglob("*.pt"))])
    last = rows.gather(1, (rows != 0).sum(1, keepdim=True) - 1)  # each row's last real token
    assert (rows[:, 0] == 2).all() and (last == 3).all()  # [CLS] first, [SEP] last, as BERT reads rows

    cfg = tmp_path / "run.yaml"
    cfg.write_text("training: {batch_size: 8, max_steps: 2, precision: fp32, warmup_steps: 0}\n"
                   "checkpoint: {checkpoint_every: 2}\n")
    run = ["train", "--data_dir", str(shards), "--config_file", str(cfg), "--init_from_hf", str(folder),
           "--checkpoint_dir", str(tmp_path / "c")]
    assert main(run) == 0
    assert "family: bert" in (tmp_path / "c" / "config.yaml").read_text()
    assert main([*run, "--max_steps", "4", "--load_checkpoint", "latest"]) == 0  # resumes from step 2
    assert "resum" in capsys.readouterr().out.lower()
    ckpt = tmp_path / "c" / "checkpoint_00000004.pt"
    assert main(["export", "--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "hf")]) == 0

    trained = load_trained(ckpt, torch.device("cpu"))
    ours = trained.model.eval()
    theirs = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    ids, mask = ids_and_mask(trained.tokenizer, SENTENCES)
    with torch.no_grad():
        expected = ours(ids, mask, return_logits=True).logits
        got = theirs(input_ids=ids, attention_mask=mask.long()).logits
        pooled = (ours.encode(ids, mask) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert_same_logits(expected[mask], got[mask])

    st = pytest.importorskip("sentence_transformers")
    vectors = torch.from_numpy(st.SentenceTransformer(str(tmp_path / "hf"), device="cpu").encode(SENTENCES))
    assert torch.allclose(vectors, pooled, rtol=1e-4, atol=1e-4 * pooled.abs().max())


def test_family_bert_from_scratch_on_a_trained_wordpiece_tokenizer(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"{SENTENCES[i % 4]} number {i % 17}" for i in range(400)) + "\n")
    tok_file = tmp_path / "tokenizer.json"
    assert main(["tokenizer", "--type", "wordpiece", "--input", str(text), "--output", str(tok_file),
                 "--vocab_size", "120", "--min_frequency", "1"]) == 0
    tok = Tokenizer.from_file(str(tok_file))
    assert [tok.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.encode("the quick fox.").tokens == ["[CLS]", "the", "quick", "fox", ".", "[SEP]"]
    assert tok.encode("The").tokens[1] != "the"  # cased: the corpus has no capital T

    shards = pretokenize(tmp_path, tok_file, seq_len=32)
    cfg = tmp_path / "bert.yaml"
    cfg.write_text("model: {family: bert, hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, "
                   "max_position_embeddings: 32}\ntraining: {batch_size: 8, max_steps: 3, precision: fp32}\n")
    assert main(["train", "--data_dir", str(shards), "--config_file", str(cfg), "--tokenizer_filepath",
                 str(tok_file), "--checkpoint_dir", str(tmp_path / "c")]) == 0
    dims = load_trained(tmp_path / "c" / "checkpoint_00000003.pt", torch.device("cpu")).model.dims
    assert (dims.position_start, dims.type_vocab_size, dims.layer_norm_eps, dims.max_tokens) == ("zero", 2, 1e-12, 32)
    # BERT's positions hold seq_len tokens, not seq_len - 2: one more is refused, naming the config.
    assert main(["pretokenize", "--input", str(text), "--tokenizer_filepath", str(tok_file), "--output_dir",
                 str(tmp_path / "long"), "--seq_len", "33", "--config_file", str(cfg)]) == 2


def test_a_folder_with_only_vocab_txt_imports(tmp_path, bert_folder):
    folder, _ = bert_folder
    copy = tmp_path / "bert"
    copy.mkdir()
    for f in ("config.json", "model.safetensors"):
        (copy / f).write_bytes((folder / f).read_bytes())
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    (copy / "vocab.txt").write_text("".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])))
    tok = import_hf(copy).tokenizer
    assert tok.encode("The Quick fox").ids == wordpiece_tokenizer().encode("The Quick fox").ids  # lower-cased


def test_pretokenize_help_states_each_familys_positions(capsys):
    with pytest.raises(SystemExit):
        main(["pretokenize", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "seq_len + pad id + 1 with roberta" in out and "seq_len with bert" in out and "seq_len with rotary" in out


@pytest.mark.slow  # fine-tuning, then export: over 8 s on 2 cores
def test_bert_fine_tunes_with_its_pooler_head_and_exports_as_bert_for_sequence_classification(capsys, tmp_path):
    from conftest import PAD, VOCAB
    from encoder_train.config import ModelConfig
    from encoder_train.finetune.loop import load_finetuned
    from encoder_train.state import model_dims
    from helpers.finetune_data import examples, tiny_checkpoint, write_jsonl

    config = ModelConfig(family="bert", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                         max_position_embeddings=32)
    ckpt = tiny_checkpoint(tmp_path / "ckpt", model_dims(config, VOCAB, PAD, "test"))
    train = write_jsonl(tmp_path / "train.jsonl", examples(48, 0))
    assert main(["finetune", "--checkpoint", str(ckpt), "--train_file", str(train), "--validation_file", str(train),
                 "--epochs", "1", "--batch_size", "16", "--precision", "fp32",
                 "--output_dir", str(tmp_path / "out")]) == 0
    path = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["per_seed"][0]["checkpoint"]
    assert main(["export-classifier", "--checkpoint", path, "--output_dir", str(tmp_path / "hf")]) == 0
    theirs = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    ours = load_finetuned(path, torch.device("cpu")).model.eval()
    ids = torch.tensor([[0, *range(5, 25), 2], [0, 5, 30, 41, 2, *[PAD] * 17]])
    with torch.no_grad():
        expected = ours(ids, ids != PAD)
        got = theirs(input_ids=ids, attention_mask=(ids != PAD).long()).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_bert_positions_are_the_same_packed_and_padded(bert_folder):
    """Training runs the packed (unpadded) path, export compares the padded one: BERT's positions count from 0 in
    both, so the loss is the same."""
    from encoder_train.batch import MaskSpec
    from encoder_train.data.loader import collate

    hf = import_hf(bert_folder[0])
    ours = MaskedLM(hf.dims).eval()
    ours.load_state_dict(hf.state_dict)
    tok = hf.tokenizer
    rows = [torch.tensor(tok.encode(t).ids) for t in SENTENCES + ["stops"]]
    s = special_tokens(tok)
    b = collate(rows, MaskSpec(s.pad, s.mask, s.all_ids, tok.get_vocab_size(), 0.3), seed=0)
    with torch.no_grad():
        packed = ours(b.input_ids, b.attention_mask, b.labels, b.predict_positions, packing=b.packing).loss
        padded = ours(b.input_ids, b.attention_mask, b.labels).loss
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("changes,longest,counted", [
    ({}, 38, "learned positions start past the pad id, 1 + 1"),  # RoBERTa: 40 positions, pad id 1
    ({"position_start": "zero", "type_vocab_size": 2}, 40, "learned positions count from 0"),
    ({"position_embedding": "rotary"}, 40, "rotary positions count from 0")])
def test_one_row_length_rule_for_every_family(changes, longest, counted):
    from encoder_train.errors import UserError
    from helpers.hf_models import dims_for

    dims = dims_for(64, **changes)
    assert dims.max_tokens == longest and dims.positions_for(longest) == 40
    dims.check_row_length(longest, "here", "")
    said = (rf"here: rows of {longest + 1} tokens do not fit model.max_position_embeddings 40, which holds rows of "
            rf"at most {longest} tokens \({re.escape(counted)}\); raise it to 41")
    with pytest.raises(UserError, match=said):
        dims.check_row_length(longest + 1, "here", "")
