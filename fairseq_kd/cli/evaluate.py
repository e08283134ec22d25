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

--model-dir FOLDER --src-text TEXT scores what a user ships and runs: a
model folder of ``fairseq-kd export --format ctranslate2`` translating raw
source text exactly as ``fairseq-kd translate`` does (the folder's own
SentencePiece model, sources longer than the model's maximum cut and
counted); no --data is read.  Its row is NAME (ct2 QUANTIZATION raw text),
its parameters those of --checkpoint, else of the checkpoint it was made from.

--teacher-ct2 FOLDER --src-text TEXT scores an external teacher, any
CTranslate2 converter's folder (OPUS-MT, Marian, M2M100, NLLB, fairseq),
translating raw text exactly as ``fairseq-kd corpus --teacher-ct2`` does
(its own SentencePiece model(s), --source-prefix/--target-prefix language
codes); no --data is read.  Its row is NAME, its parameters those stored in
the folder's model.bin.

--latency N (CTranslate2 rows) also times N sentences translated one at a
time (batch size 1, the interactive case, --latency-threads on the one
sentence, after a warm-up) and records the median and p90 milliseconds per
sentence.
"""
import glob
import os

from fairseq_kd.cli.translate import MAX_LEN_WHY
from fairseq_kd.deploy.ct2 import QUANTIZATIONS
from fairseq_kd.errors import require
from fairseq_kd.evaluation import Evaluation, evaluate


def add_arguments(p):
    p.add_argument("--data", help="fairseq binary data folder (not with --model-dir)")
    p.add_argument("--checkpoint",
                   help="model checkpoint to evaluate (with --model-dir: whose parameters to count; "
                   "default: the checkpoint the folder was made from)")
    p.add_argument("--model-dir", help="score this model folder (fairseq-kd export --format ctranslate2) "
                   "on raw text, as fairseq-kd translate translates it, instead of a checkpoint on --data")
    p.add_argument("--teacher-ct2", metavar="FOLDER",
                   help="score this CTranslate2 converter's folder (an external teacher) on raw text, as "
                   "fairseq-kd corpus --teacher-ct2 translates it, instead of a checkpoint on --data")
    p.add_argument("--source-prefix", metavar="TOKENS",
                   help="--teacher-ct2: tokens every source starts with (M2M100/NLLB source language)")
    p.add_argument("--target-prefix", metavar="TOKENS",
                   help="--teacher-ct2: tokens every translation starts with (M2M100/NLLB target language)")
    p.add_argument("--src-text", help="--model-dir, --teacher-ct2: raw source text, one sentence a line, "
                   "aligned with --ref")
    p.add_argument("--name", required=True, help="system name in the results file")
    p.add_argument("--ref", required=True, help="detokenized reference of the split")
    p.add_argument("--results", required=True, help="JSON file to update")
    p.add_argument("--gen-subset", default="test", help="split of --data to translate (default: %(default)s)")
    p.add_argument("--beam", type=int, default=5, help="beam size of the beam-search run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sentences per batch (default: 128; with --backend ctranslate2 or --model-dir, 24 on CPU)")
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
                   help="--backend ctranslate2: the model's weights (default: %(default)s; "
                   "--model-dir: the folder's own)")
    p.add_argument("--latency", type=int, default=0, metavar="N",
                   help="CTranslate2 rows: also time N sentences translated one at a time (batch size 1) "
                   "and record the median and p90 ms per sentence (default: %(default)s = not measured)")
    p.add_argument("--latency-threads", type=int, default=1, metavar="N",
                   help="CPU threads on the one sentence --latency times (default: %(default)s, as fairseq-kd "
                   "translate runs each batch; recorded with the latency)")


def check_inputs(args):
    """Everything fairseq-generate would otherwise fail on late, or with a traceback."""
    require(args.beam >= 1, f"--beam must be >= 1, got {args.beam}")
    if args.batch_size is None:
        args.batch_size = default_batch_size(args)
    require(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    require(args.latency == 0 or args.latency >= 2, f"--latency must be 0 or >= 2 sentences, got {args.latency}")
    require(args.latency_threads >= 1, f"--latency-threads must be >= 1, got {args.latency_threads}")
    require(os.path.isfile(args.ref), f"--ref: reference file not found: {args.ref}")
    if args.teacher_ct2:
        check_teacher_ct2_inputs(args)
        return
    require(not (args.source_prefix or args.target_prefix), "--source-prefix and --target-prefix are "
            "options of --teacher-ct2")
    if args.model_dir:
        check_model_dir_inputs(args)
        return
    require(args.data and args.checkpoint, "--data and --checkpoint are required (or --model-dir and --src-text)")
    require(args.latency == 0 or args.backend == "ctranslate2",
            "--latency is measured on CTranslate2 rows (--backend ctranslate2 or --model-dir)")
    require(os.path.isdir(args.data), f"--data: data folder not found: {args.data}")
    require(glob.glob(os.path.join(glob.escape(args.data), f"{args.gen_subset}.*-*.*.idx")),
            f"--data: no binarized '{args.gen_subset}' split in {args.data} "
            f"(expected {args.gen_subset}.SRC-TGT.SRC.idx/.bin from fairseq-preprocess)")


def check_model_dir_inputs(args, option="--model-dir"):
    """--model-dir (or --teacher-ct2) reads raw text, not a binarized split: no --data, a --src-text
    as long as --ref."""
    from fairseq_kd.evaluation import read_lines

    require(not args.data, f"{option} translates --src-text, not --data: give one of them")
    require(args.src_text, f"{option} needs --src-text (the raw source text of --ref)")
    require(os.path.isfile(args.src_text), f"--src-text: file not found: {args.src_text}")
    sources, refs = len(read_lines(args.src_text)), len(read_lines(args.ref))
    require(sources == refs, f"--src-text has {sources} lines, --ref {refs}")


def check_teacher_ct2_inputs(args):
    """--teacher-ct2 reads raw text: no --data, --model-dir or --checkpoint; a --src-text as long as
    --ref; a folder whose layout is understood and whose language codes are named."""
    from fairseq_kd.corpus.external import TeacherLayout

    require(not (args.data or args.model_dir or args.checkpoint),
            "--teacher-ct2 translates --src-text: not with --data, --model-dir or --checkpoint")
    args.model_dir = None
    check_model_dir_inputs(args, "--teacher-ct2")
    TeacherLayout(args.teacher_ct2, args.source_prefix, args.target_prefix)


def default_batch_size(args):
    """128 sentences, as fairseq-generate is run here; CTranslate2's own size on its device."""
    if args.backend != "ctranslate2" and not (args.model_dir or args.teacher_ct2):
        return 128
    from fairseq_kd.deploy.ct2 import default_batch_size as ct2_batch_size
    from fairseq_kd.evaluation import ct2_device

    return ct2_batch_size(ct2_device(args))


def run(args):
    check_inputs(args)
    evaluate(Evaluation.from_args(args))
