"""Parallel text as SentencePiece pieces: a joint model trained (or an existing one copied) and the splits encoded.

The work of ``fairseq-kd spm``.  SPLIT.LANG text files in, SPLIT.sp.LANG files
of space-separated pieces out (ready for fairseq-preprocess); fairseq adds
its own <s>, </s> and <pad>, so the model has only <unk>.  Neither fairseq
nor torch is imported, sentencepiece only when used.
"""
import os
import re

from fairseq_kd.errors import KDError, require

TOO_HIGH = re.compile(r"Please set it to a value <= (\d+)")


def count_lines(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def check_split(input_dir, split, src, tgt):
    """INPUT_DIR/SPLIT.SRC and SPLIT.TGT exist and are line-aligned; their paths."""
    paths = [os.path.join(input_dir, f"{split}.{lang}") for lang in (src, tgt)]
    for path in paths:
        require(os.path.isfile(path), f"missing input file {path}")
    n_src, n_tgt = (count_lines(p) for p in paths)
    require(n_src == n_tgt, f"{split}: {paths[0]} has {n_src} lines but {paths[1]} has {n_tgt}")
    return paths


def train_model(train_files, prefix, vocab_size, model_type, input_sentence_size, train_split):
    """Train the SentencePiece model PREFIX.model on ``train_files`` (the split
    ``train_split``); its errors (C++ checks) as one line."""
    import sentencepiece as spm

    try:
        spm.SentencePieceTrainer.train(
            input=",".join(train_files), model_prefix=prefix, vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            # fairseq adds its own <s>, </s>, <pad>; only <unk> must match.
            bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2,
        )
    except (RuntimeError, ValueError) as e:
        raise KDError(trainer_error(str(e), vocab_size, train_split)) from None


def trainer_error(message, vocab_size, train_split):
    too_high = TOO_HIGH.search(message)
    if too_high:  # the limit is only known once sentencepiece has read the data
        return (f"--vocab-size {vocab_size} is too large for the {train_split} split: "
                f"sentencepiece allows at most {too_high.group(1)} here")
    return f"sentencepiece could not train on the {train_split} split: {message.strip()}"


def copy_model(model, dest):
    """Copy an existing SentencePiece model to DEST after checking that it loads."""
    import shutil

    import sentencepiece as spm

    require(os.path.isfile(model), f"--model {model}: no such file")
    try:
        spm.SentencePieceProcessor(model_file=model)
    except (RuntimeError, OSError) as e:
        raise KDError(f"--model {model} is not a SentencePiece model ({str(e).strip() or type(e).__name__})") from None
    if os.path.abspath(model) != os.path.abspath(dest):
        shutil.copyfile(model, dest)


def encode_splits(model_file, input_dir, out, splits, langs):
    """Write OUT/SPLIT.sp.LANG, the pieces of INPUT_DIR/SPLIT.LANG, for every split
    and language; returns the model's vocabulary size."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_file)
    for split in splits:
        for lang in langs:
            src_path = os.path.join(input_dir, f"{split}.{lang}")
            with open(src_path, encoding="utf-8") as fin, \
                    open(os.path.join(out, f"{split}.sp.{lang}"), "w", encoding="utf-8") as fout:
                for line in fin:
                    fout.write(" ".join(sp.encode(line.strip(), out_type=str)) + "\n")
    return sp.get_piece_size()
