"""Translate a training split with the teacher into a distilled corpus (Seq-KD, Seq-Inter, MBR, n-best, filtered).

Reads the fairseq-binarized split DATA/SPLIT.SRC-TGT.* (the student's data),
translates every source line with the teacher (beam search by fairseq's own
SequenceGenerator, same settings and results as fairseq-generate; or by the
teacher converted to CTranslate2, over twice as fast on CPU) and writes the
training pairs, by default one per source line (same lines, same order):

  bin     OUT/SPLIT.SRC-TGT.{SRC,TGT}.{bin,idx} + OUT/dict.*.txt: what
          fairseq-preprocess --srcdict/--tgtdict writes; the source files are
          copied (written again when the pairs are not one per line), the
          target is the teacher's output. --copy-splits adds the gold
          valid/test data so OUT trains as it is.
  pieces  OUT/SPLIT.SRC and OUT/SPLIT.TGT, tokens as in the dictionaries
          (e.g. SentencePiece pieces), ready for fairseq-preprocess.
  text    OUT/SPLIT.text.TGT, the translation after --post-process.

Every line is kept: an empty source gives an empty translation; a source
longer than --max-source-tokens gets the gold target (--long-inputs reference)
or is translated truncated (--long-inputs truncate); both are counted in
OUT/SPLIT.report.json.

Selection (fairseq_kd.corpus.select): the teacher gives N candidates per
source (--candidates N: its N-best list from beam N, or N samples with
--sampling topk|topp); --select ranks them (beam: the teacher's order; inter:
a sentence-level utility against the gold target, Seq-Inter; mbr: the mean
utility against the other candidates, MBR) and --keep n keeps the n best
distinct ones, each a training pair with the source repeated (n-best
distillation, MBR-n).  --seq-inter N is --select inter --candidates N.  The
default (--select beam, --keep 1, the best of --beam) is Seq-KD, as before.

Filtering (fairseq_kd.corpus.filters): --filter drops selected pairs that are
copies of the source, runaway repetitions, of an odd length ratio or scored
low by the teacher; each dropped pair and its rule go to
OUT/SPLIT.filtered.tsv and the report counts them.  Filters act at the merge,
from the saved chunks: rerunning with other --filter options decodes nothing.
A corpus of several pairs per source, or filtered, no longer lines up with
the gold data, so translation_kd --distilled-data refuses it.

--backend auto (the default) decodes with CTranslate2 in float32 where its
speed and agreement with fairseq were measured: on CPU, one checkpoint, no
--unkpen, the 1-best (no N-best list), and a teacher it converts; also for
--sampling on CPU, where there is no agreement to keep; elsewhere (a GPU, an
ensemble, an N-best list, ...) with fairseq.  It logs which one and why; a
resumed run keeps the backend it was begun with.  --backend fairseq or
ctranslate2 chooses.

--backend ctranslate2 converts the teacher once (cached under
$FAIRSEQ_KD_CACHE/ct2 or ~/.cache/fairseq_kd/ct2, keyed by the checkpoint's
checksum and --quantization) and decodes with the same settings; on CPU each
worker decodes --threads batches at once, one thread each.  It agrees with
fairseq on (nearly) every line; hypotheses cut at the maximum length can
rank differently in beam search (fairseq scores them with a forced </s>).

The split is cut into chunks of --chunk-size lines; each finished chunk is
saved at once (OUT/SPLIT.work/), so an interrupted run resumes where it
stopped.  --workers W translates in W processes (one per GPU, or W CPU
processes splitting the cores); --num-shards/--shard-id run one shard (e.g.
one cluster job per shard); a run without --shard-id translates what is
missing and merges.

--teacher-ct2 DIR: any CTranslate2 model folder is the teacher (OPUS-MT,
Marian, M2M100, NLLB, a fairseq model; an "external" teacher, Seq-KD and
Seq-Inter only).  DATA is then a folder of plain text SPLIT.LANG files, the
teacher's own SentencePiece model(s) beside it tokenize (source.spm and
target.spm, or sentencepiece.bpe.model / spm.model), and OUT becomes a raw
corpus: OUT/SPLIT.TGT the teacher's detokenized translation, OUT/SPLIT.SRC
and the gold --copy-splits copied, OUT/SPLIT.report.json as above (empty
translations counted too).  A multilingual model needs its language codes:
--target-prefix starts every translation (M2M100 __en__, NLLB eng_Latn),
--source-prefix every source (M2M100/NLLB: the source language; multilingual
OPUS-MT: the target's >>xxx<< token).  Chunks, shards, workers and resume are
as above; it decodes on the GPU when CTranslate2 sees one (--cpu: never).
"""
from fairseq_kd.corpus import filters, select
from fairseq_kd.corpus.translators import AUTO, BACKENDS
from fairseq_kd.deploy.ct2 import QUANTIZATIONS
from fairseq_kd.errors import require

DEFAULT_FORMATS = "bin,pieces"  # --teacher-ct2: text, the only one it writes


def add_arguments(p):
    p.add_argument("data", help="fairseq-binarized data folder (dict.*.txt, SPLIT.SRC-TGT.*); with "
                   "--teacher-ct2 a folder of plain text SPLIT.LANG files")
    p.add_argument("--path", help="teacher checkpoint; A.pt:B.pt is an ensemble (required unless --teacher-ct2)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("-s", "--source-lang", required=True)
    p.add_argument("-t", "--target-lang", required=True)
    p.add_argument("--split", default="train", help="split to translate (default: train)")
    p.add_argument("--formats", default=None,
                   help=f"comma-separated subset of bin,pieces,text (default: {DEFAULT_FORMATS}; "
                        "text with --teacher-ct2, the only one it writes)")
    p.add_argument("--copy-splits", default="valid,test",
                   help="gold splits copied into OUT with the bin format, when they exist "
                        "(default: valid,test); '' copies none")
    p.add_argument("--backend", choices=(AUTO, *BACKENDS), default=AUTO,
                   help="auto (default): ctranslate2 in float32 on CPU where it applies, else fairseq "
                        "(logged with the reason); fairseq: fairseq's SequenceGenerator; ctranslate2: "
                        "the teacher converted to CTranslate2 (one checkpoint, no --unkpen)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                   help="ctranslate2 backend only: weights and computation type (default: float32, "
                        "float16 with --fp16)")
    g = p.add_argument_group("external teacher: a CTranslate2 model folder translating raw text")
    g.add_argument("--teacher-ct2", metavar="DIR",
                   help="the teacher is this folder of a CTranslate2 converter (ct2-opus-mt-converter, "
                        "ct2-transformers-converter, ct2-fairseq-converter, ...) instead of --path; DATA "
                        "holds plain text; Seq-KD and Seq-Inter only")
    g.add_argument("--target-prefix", metavar="TOKENS",
                   help="tokens every translation starts with: a multilingual model's target language "
                        "(M2M100: __en__, NLLB: eng_Latn)")
    g.add_argument("--source-prefix", metavar="TOKENS",
                   help="tokens every source starts with: M2M100/NLLB's source language (__de__, "
                        "deu_Latn), multilingual OPUS-MT's target language (>>eng<<)")
    g = p.add_argument_group("decoding (as fairseq-generate)")
    g.add_argument("--beam", type=int, default=5, help="beam size (default: 5)")
    g.add_argument("--lenpen", type=float, default=1.0, help="length penalty (default: 1)")
    g.add_argument("--unkpen", type=float, default=0.0, help="unknown-word penalty (default: 0)")
    g.add_argument("--max-len-a", type=float, default=0.0, help="max length = a * src_len + b (default a: 0)")
    g.add_argument("--max-len-b", type=int, default=200, help="(default b: 200)")
    g.add_argument("--min-len", type=int, default=1)
    g.add_argument("--post-process", default=None,
                   help="as fairseq's --post-process (e.g. sentencepiece): applied for the "
                        "text format and before the utilities of --select inter and mbr")
    g.add_argument("--max-tokens", type=int, default=12000,
                   help="source tokens per batch (default: 12000, fairseq-generate's default)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="sentences per batch at most (default: 1000, bounded by --max-tokens; "
                        "24 with the ctranslate2 backend on CPU, where small batches decode faster)")
    g.add_argument("--fp16", action="store_true", help="decode in fp16 (GPU)")
    g.add_argument("--cpu", action="store_true", help="do not use a GPU")
    select.add_arguments(p.add_argument_group("selection: candidates per source, ranked, the best kept"))
    filters.add_arguments(p.add_argument_group("filtering the selected pairs (at the merge)"))
    g = p.add_argument_group("input lines")
    g.add_argument("--max-source-tokens", type=int, default=0,
                   help="sources longer than this (tokens incl. </s>) are 'long' (default: "
                        "the teacher's max source positions)")
    g.add_argument("--long-inputs", choices=["reference", "truncate"], default="reference",
                   help="long sources get the gold target (reference, default) or are "
                        "translated truncated to --max-source-tokens (truncate)")
    g = p.add_argument_group("sharding and resuming")
    g.add_argument("--chunk-size", type=int, default=1000,
                   help="lines per saved chunk, the unit of resuming and of dividing the work "
                        "between workers (default: 1000)")
    g.add_argument("--workers", type=int, default=0,
                   help="processes translating in parallel (default: the number of visible "
                        "GPUs, 1 on CPU)")
    g.add_argument("--threads", type=int, default=0,
                   help="threads per CPU worker: torch threads, or batches decoded at once by "
                        "ctranslate2 (default: cores / workers)")
    g.add_argument("--num-shards", type=int, default=0,
                   help="shards the chunks are divided into (default: --workers)")
    g.add_argument("--shard-id", type=int, default=None,
                   help="translate only this shard, do not merge (one job per shard)")
    g.add_argument("--no-progress-bar", action="store_true")


def run(args):
    from fairseq_kd.corpus.build import build

    if args.teacher_ct2:
        return build(args)
    require(args.path, "--path (the teacher checkpoint) or --teacher-ct2 (a CTranslate2 model folder) is required")
    require(not (args.source_prefix or args.target_prefix),
            "--source-prefix and --target-prefix are options of --teacher-ct2")
    args.formats = args.formats or DEFAULT_FORMATS
    return build(args)
