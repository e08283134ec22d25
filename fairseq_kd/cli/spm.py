"""Train a joint SentencePiece model on parallel text and encode every split into pieces.

Reads PREFIX.SRC / PREFIX.TGT for each --split, writes OUT/SPLIT.sp.SRC and
OUT/SPLIT.sp.TGT (space-separated pieces, ready for fairseq-preprocess) and
OUT/spm.model.  With --model, the splits are encoded with an existing model
(e.g. a shipped teacher's, so students share its vocabulary) and none is
trained.  Decode system output with
``fairseq-generate ... --post-process sentencepiece``.
"""
import os
import re

from fairseq_kd.errors import KDError, require

USES_FAIRSEQ = False  # fairseq-kd does not import fairseq for this command (fairseq_kd.cli)
TOO_HIGH = re.compile(r"Please set it to a value <= (\d+)")


def add_arguments(p):
    p.add_argument("--input-dir", required=True, help="folder with SPLIT.LANG text files")
    p.add_argument("--src", required=True, help="source language suffix, e.g. es")
    p.add_argument("--tgt", required=True, help="target language suffix, e.g. en")
    p.add_argument("--splits", default="train,valid,test", help="comma-separated split names")
    p.add_argument("--train-split", default="train", help="split the model is trained on")
    p.add_argument("--vocab-size", type=int, default=8000, help="joint vocabulary size")
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="sentences sampled for training the model (bounds memory on large corpora)")
    p.add_argument("--model", default=None,
                   help="encode with this SentencePiece model (copied to OUT/spm.model) instead of "
                        "training one; --vocab-size, --model-type and --train-split are then unused")
    p.add_argument("--out", required=True, help="output folder")


def count_lines(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def check_split(args, split):
    """SPLIT.SRC and SPLIT.TGT exist and are line-aligned."""
    paths = [os.path.join(args.input_dir, f"{split}.{lang}") for lang in (args.src, args.tgt)]
    for path in paths:
        require(os.path.isfile(path), f"missing input file {path}")
    n_src, n_tgt = (count_lines(p) for p in paths)
    require(n_src == n_tgt, f"{split}: {paths[0]} has {n_src} lines but {paths[1]} has {n_tgt}")
    return paths


def train_model(args, train_files, prefix):
    """Train the SentencePiece model; its errors (C++ checks) as one line."""
    import sentencepiece as spm

    try:
        spm.SentencePieceTrainer.train(
            input=",".join(train_files), model_prefix=prefix, vocab_size=args.vocab_size,
            model_type=args.model_type, character_coverage=1.0,
            input_sentence_size=args.input_sentence_size, shuffle_input_sentence=True,
            # fairseq adds its own <s>, </s>, <pad>; only <unk> must match.
            bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2,
        )
    except (RuntimeError, ValueError) as e:
        raise KDError(trainer_error(args, str(e))) from None


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


def trainer_error(args, message):
    too_high = TOO_HIGH.search(message)
    if too_high:  # the limit is only known once sentencepiece has read the data
        return (f"--vocab-size {args.vocab_size} is too large for the {args.train_split} split: "
                f"sentencepiece allows at most {too_high.group(1)} here")
    return f"sentencepiece could not train on the {args.train_split} split: {message.strip()}"


def run(args):
    import sentencepiece as spm

    require(args.vocab_size > 0, f"--vocab-size must be > 0, got {args.vocab_size}")
    require(args.input_sentence_size >= 0,
            f"--input-sentence-size must be >= 0 (0 = all), got {args.input_sentence_size}")
    splits = [s for s in args.splits.split(",") if s]
    require(splits, "--splits is empty")
    # the training split need not be one of the encoded splits
    needed = splits if args.model else [args.train_split, *splits]
    paths = {split: check_split(args, split) for split in dict.fromkeys(needed)}
    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, "spm")
    if args.model:
        copy_model(args.model, prefix + ".model")
    else:
        train_model(args, paths[args.train_split], prefix)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    for split in splits:
        for lang in (args.src, args.tgt):
            src_path = os.path.join(args.input_dir, f"{split}.{lang}")
            with open(src_path, encoding="utf-8") as fin, \
                    open(os.path.join(args.out, f"{split}.sp.{lang}"), "w", encoding="utf-8") as fout:
                for line in fin:
                    fout.write(" ".join(sp.encode(line.strip(), out_type=str)) + "\n")
    print(f"wrote {prefix}.model (vocab {sp.get_piece_size()}) and {len(splits)} encoded splits to {args.out}")
