"""Tiny CTranslate2 teachers in each converter's layout, built offline for the external-teacher tests.

Randomly initialised ``transformers`` models (d_model 16, one layer) with
SentencePiece models trained on a few hundred Bible verses, saved with
``save_pretrained`` and converted by CTranslate2's own
``TransformersConverter`` (what ``ct2-transformers-converter`` runs).  They
translate garbage, deterministically: enough for layout detection,
alignment, resume and error checks.

transformers >= 5 with ctranslate2 4.x: the converter reads M2M100's (and
NLLB's) language codes from ``special_tokens_map["additional_special_tokens"]``,
which transformers 5 no longer fills, so the vocabulary it writes lacks them
and the conversion fails ("Source vocabulary 0 has size N but the model
expected a vocabulary of size N + codes").  :func:`m2m100` converts with the
loader's vocabulary given the codes where the converter put them with
transformers 4 (after the SentencePiece vocabulary, before the made-up words).
"""
import contextlib
import functools
import json
import os
import shutil

import helpers

TINY = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=256)
TRAIN_LINES = 400


def bible_lines(split, lang, n):
    """The first n lines of the shipped Bible corpus's SPLIT.LANG."""
    return bible_text(split, lang)[:n]


@functools.lru_cache(maxsize=None)
def bible_text(split, lang):
    import tarfile

    with tarfile.open(helpers.BIBLE_ARCHIVE) as tar:
        return tuple(tar.extractfile(f"bible.es-en/{split}.{lang}").read().decode("utf-8").splitlines())


def train_spm(lines, prefix, vocab_size):
    import sentencepiece as spm

    with open(f"{prefix}.txt", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(input=f"{prefix}.txt", model_prefix=str(prefix), vocab_size=vocab_size,
                                   character_coverage=1.0, minloglevel=2)
    return f"{prefix}.model"


def pieces(model_file):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def convert(hf_dir, out, copy_files):
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(hf_dir), copy_files=copy_files).convert(str(out), force=True)
    return out


def marian(root):
    """A Marian model (source.spm/target.spm, shared vocabulary ending in <pad>, as OPUS-MT's),
    converted with --copy_files source.spm target.spm: the OPUS-MT layout."""
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    es, en = list(bible_lines("train", "es", TRAIN_LINES)), list(bible_lines("train", "en", TRAIN_LINES))
    hf = root / "hf_marian"
    hf.mkdir()
    src_spm, tgt_spm = train_spm(es, root / "es", 300), train_spm(en, root / "en", 300)
    shutil.copyfile(src_spm, hf / "source.spm")
    shutil.copyfile(tgt_spm, hf / "target.spm")
    vocab = {"</s>": 0, "<unk>": 1}
    for piece in pieces(src_spm) + pieces(tgt_spm):
        vocab.setdefault(piece, len(vocab))
    vocab["<pad>"] = len(vocab)  # last, as in OPUS-MT models (the converter drops it)
    (hf / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    MarianTokenizer(source_spm=str(hf / "source.spm"), target_spm=str(hf / "target.spm"),
                    vocab=str(hf / "vocab.json"), source_lang="es", target_lang="en").save_pretrained(hf)
    torch.manual_seed(0)
    config = MarianConfig(vocab_size=len(vocab), pad_token_id=len(vocab) - 1, eos_token_id=0,
                          decoder_start_token_id=len(vocab) - 1, **TINY)
    MarianMTModel(config).save_pretrained(hf)
    return convert(hf, root / "ct2_marian", ["source.spm", "target.spm"])


def m2m100(root):
    """An M2M100 model (one sentencepiece.bpe.model, __xx__ language codes), converted with
    --copy_files sentencepiece.bpe.model (the converter helped with the codes: module docstring)."""
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration, M2M100Tokenizer

    es, en = list(bible_lines("train", "es", TRAIN_LINES)), list(bible_lines("train", "en", TRAIN_LINES))
    hf = root / "hf_m2m100"
    hf.mkdir()
    shutil.copyfile(train_spm(es + en, root / "joint", 400), hf / "sentencepiece.bpe.model")
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for piece in pieces(hf / "sentencepiece.bpe.model"):
        vocab.setdefault(piece, len(vocab))
    (hf / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tokenizer = M2M100Tokenizer(vocab_file=str(hf / "vocab.json"), spm_file=str(hf / "sentencepiece.bpe.model"),
                                src_lang="es", tgt_lang="en")
    tokenizer.save_pretrained(hf)
    codes = tokenizer.convert_ids_to_tokens(sorted(tokenizer.lang_code_to_id.values()))  # __af__, ...
    torch.manual_seed(0)
    config = M2M100Config(vocab_size=len(vocab) + len(codes) + tokenizer.num_madeup_words, pad_token_id=1,
                          bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, **TINY)
    M2M100ForConditionalGeneration(config).save_pretrained(hf)
    with language_codes_restored(codes):
        return convert(hf, root / "ct2_m2m100", ["sentencepiece.bpe.model"])


@contextlib.contextmanager
def language_codes_restored(codes):
    """CTranslate2's M2M100 loader with ``codes`` in its vocabulary, as with transformers < 5."""
    from unittest import mock

    from ctranslate2.converters.transformers import _MODEL_LOADERS

    loader = _MODEL_LOADERS["M2M100Config"]
    original = type(loader).get_vocabulary

    def get_vocabulary(self, model, tokenizer):
        tokens = original(self, model, tokenizer)
        if codes[0] in tokens:
            return tokens
        madeup = [t for t in tokens if t.startswith("madeupword")]
        return [t for t in tokens if not t.startswith("madeupword")] + list(codes) + madeup

    with mock.patch.object(type(loader), "get_vocabulary", get_vocabulary):
        yield


def fairseq_like(root, marian_dir):
    """The layout of a ct2-fairseq-converter folder with the fairseq spm.model copied beside it:
    one SentencePiece model named spm.model (the Marian weights, re-used: only the files count)."""
    out = root / "ct2_fairseq_like"
    shutil.copytree(marian_dir, out)
    os.remove(out / "target.spm")
    os.replace(out / "source.spm", out / "spm.model")
    return out
