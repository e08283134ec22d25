"""Run a teacher once over binarized splits and cache its top-k distributions for word-level KD.

For every target token of each --splits split of DATA (gold prefixes, the
batches fairseq would build, unshuffled), stores the teacher's k most
probable token ids and their T=1 log-probabilities in memory-mapped files
under --out, aligned with the fairseq dataset (dataset index + token offset).
Train with them instead of a teacher:

    fairseq-train DATA --user-dir fairseq_kd --task translation_kd \\
        --teacher-cache OUT --criterion word_kd --kd-topk 8 ...

Resumable (rerun the same command), shardable (--workers N on one machine,
or --num-shards/--shard-id for separate jobs on a shared file system).
The build itself is :mod:`fairseq_kd.teacher_cache_build`.
"""
import argparse
import functools
import logging
import os
import subprocess
import sys

from fairseq_kd.errors import require
from fairseq_kd.processes import die_with_parent

logger = logging.getLogger("fairseq_kd.cache_teacher")


def add_arguments(p):
    p.add_argument("data", help="fairseq binarized data directory (fairseq-preprocess --destdir)")
    p.add_argument("--teacher-path", required=True,
                   help="teacher checkpoint; several joined by ':' form an averaged ensemble")
    p.add_argument("--out", required=True, help="cache directory (created; rerun to resume)")
    p.add_argument("--splits", default="train,valid",
                   help="comma-separated splits; fairseq-train's validation needs 'valid' too "
                   "(default: %(default)s)")
    p.add_argument("--topk", type=int, default=8,
                   help="tokens kept per target position (k) (default: %(default)s)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="storage type of the log-probabilities (token ids are uint16 when "
                   "the vocabulary has <= 65536 entries, else int32) (default: %(default)s)")
    p.add_argument("--source-lang", "-s", default=None, help="default: inferred from DATA")
    p.add_argument("--target-lang", "-t", default=None, help="default: inferred from DATA")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="tokens per teacher batch (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="sentences per teacher batch")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    p.add_argument("--fp16", action="store_true", help="run the teacher in float16 (CUDA)")
    p.add_argument("--workers", type=int, default=1,
                   help="shards run as parallel processes on this machine, for GPUs: worker i "
                   "on GPU i %% n_gpus. On CPU keep 1: every process uses all cores "
                   "(default: %(default)s)")
    p.add_argument("--num-shards", type=int, default=1,
                   help="total shards (separate jobs) (default: %(default)s)")
    p.add_argument("--shard-id", type=int, default=0, help="this job's shard, 0-based (default: %(default)s)")
    p.add_argument("--max-batches", type=int, default=None,
                   help="stop after computing this many batches (per split and shard), "
                   "e.g. for time-limited jobs; rerun to continue")
    p.add_argument("--no-progress-bar", action="store_true", help="no progress bar")
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)


def device_and_dtype(args):
    import torch

    if args.cpu or not torch.cuda.is_available():
        require(not args.fp16, "--fp16 needs CUDA")
        return torch.device("cpu"), torch.float32
    return torch.device("cuda", torch.cuda.current_device()), (
        torch.float16 if args.fp16 else torch.float32)


def build_spec(args):
    from fairseq_kd.teacher_cache_build import BuildSpec

    return BuildSpec(data=args.data, teacher_path=args.teacher_path, out=args.out,
                     splits=[s for s in args.splits.split(",") if s], k=args.topk,
                     score_dtype=args.dtype, max_tokens=args.max_tokens, batch_size=args.batch_size,
                     source_lang=args.source_lang, target_lang=args.target_lang)


def check_args(args):
    require(os.path.isdir(args.data), f"data directory not found: {args.data}")
    require(args.topk > 0, f"--topk must be > 0, got {args.topk}")
    require(args.workers >= 1, f"--workers must be >= 1, got {args.workers}")
    require(args.num_shards >= 1 and 0 <= args.shard_id < args.num_shards,
            f"--shard-id must be in [0, --num-shards), got {args.shard_id} of {args.num_shards}")
    require(args.workers == 1 or args.num_shards == 1,
            "give --workers (one machine) or --num-shards/--shard-id (separate jobs), not both")
    require(args.max_batches is None or args.max_batches >= 0, "--max-batches must be >= 0")
    check_dictionaries(args)


def check_dictionaries(args):
    """The language pair's dictionaries, which fairseq's task would miss with a traceback."""
    from fairseq.data import data_utils

    src, tgt = args.source_lang, args.target_lang
    if src is None or tgt is None:  # as fairseq's translation task infers them
        src, tgt = data_utils.infer_language_pair(args.data)
        require(src and tgt, f"cannot infer the language pair from the files in {args.data}: "
                "pass -s/--source-lang and -t/--target-lang")
    for lang in (src, tgt):
        path = os.path.join(args.data, f"dict.{lang}.txt")
        require(os.path.isfile(path), f"missing dictionary {path}")


def run_shards(args, shard_id, num_shards):
    from fairseq_kd.teacher_cache_build import build_shard, prepare

    build = prepare(build_spec(args), *device_and_dtype(args))
    computed = build_shard(build, shard_id, num_shards, args.max_batches,
                           progress=not args.no_progress_bar)
    for split, n in computed.items():
        logger.info(f"{split} shard {shard_id + 1}/{num_shards}: computed {n} batches")


def spawn_workers(args):
    """Run --workers shards as child processes (each on its own GPU when there are GPUs)."""
    import torch

    n_gpus = 0 if args.cpu else torch.cuda.device_count()
    procs = []
    for i in range(args.workers):
        env = dict(os.environ)
        if n_gpus:
            visible = env.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(g) for g in range(n_gpus)]
            env["CUDA_VISIBLE_DEVICES"] = ids[i % n_gpus]
        procs.append(subprocess.Popen(shard_command(args, i, args.workers), env=env,
                                      preexec_fn=functools.partial(die_with_parent, os.getpid())))
    failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    require(not failed, f"cache-teacher workers {failed} failed (see above); rerun to resume")


def shard_command(args, shard_id, num_shards):
    """This command line for one shard (a child process)."""
    cmd = [sys.executable, "-m", "fairseq_kd.cli", "cache-teacher", args.data,
           "--teacher-path", args.teacher_path, "--out", args.out, "--splits", args.splits,
           "--topk", str(args.topk), "--dtype", args.dtype, "--max-tokens", str(args.max_tokens),
           "--num-shards", str(num_shards), "--shard-id", str(shard_id), "--no-report"]
    for flag, value in (("--source-lang", args.source_lang), ("--target-lang", args.target_lang),
                        ("--batch-size", args.batch_size), ("--max-batches", args.max_batches)):
        if value is not None:
            cmd += [flag, str(value)]
    for flag, value in (("--cpu", args.cpu), ("--fp16", args.fp16),
                        ("--no-progress-bar", args.no_progress_bar)):
        if value:
            cmd.append(flag)
    return cmd


def run(args):
    from fairseq_kd.teacher_cache_build import prepare, report_lines

    check_args(args)
    spec = build_spec(args)
    if args.workers > 1:
        prepare(spec)  # create the files once, before the children write
        spawn_workers(args)
    else:
        run_shards(args, args.shard_id, args.num_shards)
    if not args.no_report:
        print("\n".join(report_lines(spec.out, spec.splits)))
