"""Translate a test split with one checkpoint (greedy and beam), score it and record it in a results file.

For each decoding (beam 1 and --beam K) runs ``fairseq-generate`` on the
binarized split, takes the detokenized hypotheses in input order, scores them
with sacreBLEU (BLEU, chrF; signatures recorded) against --ref and records
fairseq-generate's own translation speed (sentences/s of generation, loading
excluded).  The entry NAME in the JSON file --results is created or replaced,
so a recipe can evaluate its systems one by one and skip finished ones.

The device the speeds were measured on (the GPU's name, or the CPU's cores
and OMP_NUM_THREADS; fp16 noted) is recorded with every system and in the
file's "device" field.  Speeds from different devices do not compare, so one
results file holds one device: evaluating on another one is refused (use
another --results file, or delete this one to evaluate every system again).

--backend ctranslate2 evaluates the model a user would ship: the checkpoint
converted to CTranslate2 with --quantization (cached, like fairseq-kd corpus's
teacher), translating the same binarized split with the same settings on the
same cores (OMP_NUM_THREADS, else every core: as many batches at once, one
thread each).  Its row is NAME (ct2 QUANTIZATION), next to NAME's.
"""
import glob
import os

from fairseq_kd.cli.translate import MAX_LEN_WHY
from fairseq_kd.deploy.ct2 import QUANTIZATIONS
from fairseq_kd.errors import require
from fairseq_kd.evaluation import Evaluation, evaluate


def add_arguments(p):
    p.add_argument("--data", required=True, help="fairseq binary data folder")
    p.add_argument("--checkpoint", required=True, help="model checkpoint to evaluate")
    p.add_argument("--name", required=True, help="system name in the results file")
    p.add_argument("--ref", required=True, help="detokenized reference of the split")
    p.add_argument("--results", required=True, help="JSON file to update")
    p.add_argument("--gen-subset", default="test", help="split of --data to translate (default: %(default)s)")
    p.add_argument("--beam", type=int, default=5, help="beam size of the beam-search run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sentences per batch (default: 128; with --backend ctranslate2, 24 on CPU)")
    p.add_argument("--max-len-a", type=float, default=1.5,
                   help=f"hypotheses stop at a * source tokens + b (default: %(default)s). {MAX_LEN_WHY}")
    p.add_argument("--max-len-b", type=int, default=10, help="(default: %(default)s)")
    p.add_argument("--post-process", default="sentencepiece",
                   help="fairseq --post-process to detokenize hypotheses (default: %(default)s)")
    p.add_argument("--cpu", action="store_true", help="decode on CPU")
    p.add_argument("--fp16", action="store_true", help="decode in fp16 (GPU)")
    p.add_argument("--no-user-dir", action="store_true",
                   help="run stock fairseq-generate without the plugin (exported checkpoints)")
    p.add_argument("--backend", choices=["fairseq", "ctranslate2"], default="fairseq",
                   help="fairseq-generate, or the checkpoint converted to CTranslate2 "
                   "(default: %(default)s)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="int8",
                   help="--backend ctranslate2: the model's weights (default: %(default)s)")


def check_inputs(args):
    """Everything fairseq-generate would otherwise fail on late, or with a traceback."""
    require(args.beam >= 1, f"--beam must be >= 1, got {args.beam}")
    if args.batch_size is None:
        args.batch_size = default_batch_size(args)
    require(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    require(os.path.isfile(args.ref), f"--ref: reference file not found: {args.ref}")
    require(os.path.isdir(args.data), f"--data: data folder not found: {args.data}")
    require(glob.glob(os.path.join(glob.escape(args.data), f"{args.gen_subset}.*-*.*.idx")),
            f"--data: no binarized '{args.gen_subset}' split in {args.data} "
            f"(expected {args.gen_subset}.SRC-TGT.SRC.idx/.bin from fairseq-preprocess)")


def default_batch_size(args):
    """128 sentences, as fairseq-generate is run here; CTranslate2's own size on its device."""
    if args.backend != "ctranslate2":
        return 128
    from fairseq_kd.deploy.ct2 import default_batch_size as ct2_batch_size
    from fairseq_kd.evaluation import cuda_available_to_ct2

    return ct2_batch_size("cpu" if args.cpu or not cuda_available_to_ct2() else "cuda")


def run(args):
    check_inputs(args)
    evaluate(Evaluation.from_args(args))
