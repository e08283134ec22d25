"""Train a joint SentencePiece model on parallel text and encode every split into pieces.

Reads PREFIX.SRC / PREFIX.TGT for each --split, writes OUT/SPLIT.sp.SRC and
OUT/SPLIT.sp.TGT (space-separated pieces, ready for fairseq-preprocess) and
OUT/spm.model.  With --model, the splits are encoded with an existing model
(e.g. a shipped teacher's, so students share its vocabulary) and none is
trained.  Decode system output with
``fairseq-generate ... --post-process sentencepiece``.
"""
import os

from fairseq_kd.errors import require
from fairseq_kd.sentencepiece_data import check_split, copy_model, encode_splits, train_model

USES_FAIRSEQ = False  # fairseq-kd does not import fairseq for this command (fairseq_kd.cli)


def add_arguments(p):
    p.add_argument("--input-dir", required=True, help="folder with SPLIT.LANG text files")
    p.add_argument("--src", required=True, help="source language suffix, e.g. es")
    p.add_argument("--tgt", required=True, help="target language suffix, e.g. en")
    p.add_argument("--splits", default="train,valid,test",
                   help="comma-separated split names (default: %(default)s)")
    p.add_argument("--train-split", default="train",
                   help="split the model is trained on (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8000, help="joint vocabulary size (default: %(default)s)")
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"],
                   help="SentencePiece model type (default: %(default)s)")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="sentences sampled for training the model (bounds memory on large corpora; "
                   "0 = all) (default: %(default)s)")
    p.add_argument("--model", default=None,
                   help="encode with this SentencePiece model (copied to OUT/spm.model) instead of "
                        "training one; --vocab-size, --model-type and --train-split are then unused")
    p.add_argument("--out", required=True, help="output folder")


def run(args):
    require(args.vocab_size > 0, f"--vocab-size must be > 0, got {args.vocab_size}")
    require(args.input_sentence_size >= 0,
            f"--input-sentence-size must be >= 0 (0 = all), got {args.input_sentence_size}")
    splits = [s for s in args.splits.split(",") if s]
    require(splits, "--splits is empty")
    # the training split need not be one of the encoded splits
    needed = splits if args.model else [args.train_split, *splits]
    paths = {split: check_split(args.input_dir, split, args.src, args.tgt) for split in dict.fromkeys(needed)}
    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, "spm")
    if args.model:
        copy_model(args.model, prefix + ".model")
    else:
        train_model(paths[args.train_split], prefix, args.vocab_size, args.model_type,
                    args.input_sentence_size, args.train_split)
    vocab = encode_splits(prefix + ".model", args.input_dir, args.out, splits, (args.src, args.tgt))
    print(f"wrote {prefix}.model (vocab {vocab}) and {len(splits)} encoded splits to {args.out}")
