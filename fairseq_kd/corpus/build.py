"""Running a corpus build: the work folder (resume), worker processes, shards, and the merge.

Each finished chunk is saved at once (OUT/SPLIT.work/), so an interrupted run
resumes where it stopped; shards divide the chunks between workers or cluster
jobs; a run without --shard-id translates what is missing and merges.
"""
import argparse
import glob
import json
import logging
import os
import shutil
import time

from fairseq_kd.allocator import keep_freed_memory
from fairseq_kd.atomic_io import write_atomic, write_lines
from fairseq_kd.corpus import external, filters, select
from fairseq_kd.corpus.data import SplitData, shard_chunks
from fairseq_kd.corpus.merging import kept_pairs
from fairseq_kd.corpus.translators import AUTO, CT2Translator, FairseqTranslator
from fairseq_kd.corpus.work import WorkDir, has_saved_chunk, require_teacher_file, work_path
from fairseq_kd.errors import KDError, require
from fairseq_kd.processes import die_with_parent, usable_cores

logger = logging.getLogger("fairseq_kd.corpus")

FORMATS = ("bin", "pieces", "text")
# --backend auto's choice on CPU, and why it may be made there (benchmarks/README.md).
AUTO_CPU_REASON = ("on CPU CTranslate2 decoded the shipped teacher over twice as fast as fairseq-generate, "
                   "the same lines in float32 (benchmarks/README.md)")
NBEST_REASON = ("CTranslate2's N-best lists (--select inter or mbr, --seq-inter, --keep > 1) were not "
                "compared with fairseq's")
SAMPLING_REASON = ("samples (--sampling) are random draws, the same with neither backend, and CTranslate2 "
                   "decodes over twice as fast on CPU")


def resumed_backend(args):
    """(backend, quantization) of the run saved in OUT/SPLIT.work, or None when it saved no chunk."""
    path = work_path(args)
    settings_file = os.path.join(path, "settings.json")
    if not (os.path.isfile(settings_file) and has_saved_chunk(path)):
        return None
    with open(settings_file) as f:
        saved = json.load(f)
    return saved.get("backend", "fairseq"), saved.get("quantization")


# ---------------------------------------------------------------- running
def translate_shard(args, shard_id, num_shards, worker_index=0):
    """Translate the pending chunks of one shard (in this process)."""
    from tqdm import tqdm

    data, work = open_split(args)
    chunk_ids = work.pending(shard_chunks(len(work.chunks), num_shards, shard_id))
    if not chunk_ids:
        return
    translator = make_translator(args, data, worker_index)
    total = sum(work.chunks[c][1] - work.chunks[c][0] for c in chunk_ids)
    with tqdm(total=total, desc=f"shard {shard_id}/{num_shards}", unit="sent", position=worker_index,
              disable=args.no_progress_bar or None, leave=False) as bar:
        for c in chunk_ids:
            for n in translator.translate_chunk(*work.chunks[c]):
                bar.update(n)
            bar.update(len(translator.result["empty"])
                       + (len(translator.result["long"]) if args.long_inputs == "reference" else 0))
            work.save(c, translator.result)


def open_split(args):
    """The split to translate and its work folder: binarized, or raw text for --teacher-ct2."""
    if is_external(args):
        return external.open_split(args)
    data = SplitData(args)
    return data, WorkDir(args, len(data))


def make_translator(args, data, worker_index):
    """The backend's translator on this worker's device: GPU number worker_index, or the CPU."""
    gpus = cuda_device_count(args)
    if is_external(args):
        return external.make_translator(args, data, *(("cuda", worker_index % gpus) if gpus else ("cpu", 0)))
    if args.backend == "ctranslate2":
        if gpus:
            return CT2Translator(args, data, "cuda", worker_index % gpus)
        return CT2Translator(args, data, "cpu")
    import torch

    if gpus:
        device = torch.device("cuda", worker_index % gpus)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        keep_freed_memory()
    return FairseqTranslator(args, data, device)


def _worker_main(args, shard_ids, num_shards, worker_index, parent_pid):
    from fairseq_kd.errors import install_excepthook

    die_with_parent(parent_pid)
    install_excepthook()
    for s in shard_ids:
        translate_shard(args, s, num_shards, worker_index)


def run_workers(args, shard_ids, num_shards, workers):
    """Translate ``shard_ids`` in ``workers`` processes (one per GPU, or splitting the cores)."""
    import multiprocessing

    if workers == 1:
        for s in shard_ids:
            translate_shard(args, s, num_shards)
        return
    ctx = multiprocessing.get_context("spawn")
    # the CLI's namespace holds the subcommand's module, which cannot be pickled
    args = argparse.Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("_")})
    procs = []
    for w in range(workers):
        mine = shard_ids[w::workers]
        if mine:
            p = ctx.Process(target=_worker_main, args=(args, mine, num_shards, w, os.getpid()))
            p.start()
            procs.append(p)
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    require(not failed, f"{len(failed)} worker process(es) failed (exit codes {failed}); "
            "rerun the same command to resume")


def merge(args, data, work, seconds):
    """Concatenate the chunks, filter the pairs, write the requested formats and the report."""
    from fairseq.data import data_utils

    formats = parse_formats(args.formats)
    sources = [data.src_dict.string(data.src[i]) for i in range(len(data))]
    ids, lines, _, entries = kept_pairs(args, work, sources)
    src, tgt, split = args.source_lang, args.target_lang, args.split
    if "pieces" in formats:
        write_lines(os.path.join(args.out, f"{split}.{tgt}"), lines)
        write_lines(os.path.join(args.out, f"{split}.{src}"), (sources[i] for i in ids))
    if "text" in formats:
        write_lines(os.path.join(args.out, f"{split}.text.{tgt}"),
                    (data_utils.post_process(l, args.post_process) for l in lines))
    if "bin" in formats:
        write_binarized(args, data, ids, lines)
    report = {**entries, "max_source_tokens": args.max_source_tokens or "teacher's max positions",
              "seconds": round(seconds, 1)}
    write_atomic(os.path.join(args.out, f"{split}.report.json"), json.dumps(report, indent=1))
    return report


def write_binarized(args, data, ids, lines):
    """What fairseq-preprocess --srcdict/--tgtdict writes for these pairs (and the gold splits).

    ``ids``: the source line of each target line; the source files are copied
    when they are the split's own (one pair per line), else written again.
    """
    src, tgt, split = args.source_lang, args.target_lang, args.split
    for lang in (src, tgt):
        shutil.copyfile(os.path.join(args.data, f"dict.{lang}.txt"), os.path.join(args.out, f"dict.{lang}.txt"))
    out_prefix = os.path.join(args.out, os.path.basename(data.prefix))
    if ids == list(range(len(data))):
        for ext in (".bin", ".idx"):
            shutil.copyfile(f"{data.prefix}.{src}{ext}", f"{out_prefix}.{src}{ext}")
    else:
        write_indexed(f"{out_prefix}.{src}", len(data.src_dict), (data.src[i] for i in ids))
    write_indexed(f"{out_prefix}.{tgt}", len(data.tgt_dict),
                  (data.tgt_dict.encode_line(line, add_if_not_exist=False, append_eos=True).long()
                   for line in lines))
    for other in [s for s in args.copy_splits.split(",") if s and s != split]:
        files = [f for f in glob.glob(os.path.join(args.data, f"{other}.*-*.*"))
                 if f.endswith((f".{src}.bin", f".{src}.idx", f".{tgt}.bin", f".{tgt}.idx"))]
        if not files:
            logger.warning(f"--copy-splits: no split '{other}' in {args.data}")
        for f in files:
            shutil.copyfile(f, os.path.join(args.out, os.path.basename(f)))


def write_indexed(prefix, vocab_size, items):
    """PREFIX.bin/.idx holding ``items`` (token tensors), as fairseq-preprocess writes them."""
    from fairseq.data import indexed_dataset

    builder = indexed_dataset.make_builder(f"{prefix}.bin", impl="mmap", vocab_size=vocab_size)
    for item in items:
        builder.add_item(item)
    builder.finalize(f"{prefix}.idx")


def parse_formats(spec):
    formats = [f for f in spec.split(",") if f]
    unknown = sorted(set(formats) - set(FORMATS))
    require(formats and not unknown, f"--formats: expected a subset of {','.join(FORMATS)}, got '{spec}'")
    return formats


def check_args(args):
    """The checks that hold for either backend (see :func:`check_backend_args`)."""
    formats = parse_formats(args.formats)
    require(not os.path.exists(args.out) or os.path.isdir(args.out), f"--out {args.out} is a file, not a folder")
    if "bin" in formats:  # checked before decoding: the bin files would overwrite the data's own
        require(os.path.realpath(args.data) != os.path.realpath(args.out),
                "--out must differ from the data folder with the bin format")
    require(args.beam >= 1, f"--beam must be >= 1, got {args.beam}")
    select.resolve(args)
    filters.check_args(args)
    require(args.chunk_size >= 1, f"--chunk-size must be >= 1, got {args.chunk_size}")
    require(args.max_tokens >= 1 and (args.batch_size is None or args.batch_size >= 1),
            "--max-tokens and --batch-size must be >= 1")
    require(args.max_source_tokens >= 0, "--max-source-tokens must be >= 0")
    require(args.workers >= 0 and args.num_shards >= 0, "--workers and --num-shards must be >= 0")
    if args.shard_id is not None:
        require(args.num_shards >= 1, "--shard-id needs --num-shards")
        require(0 <= args.shard_id < args.num_shards,
                f"--shard-id must be in [0, {args.num_shards}), got {args.shard_id}")
    if args.fp16:
        require(not on_cpu(args), "--fp16 needs a GPU")


def check_backend_args(args):
    """Defaults and checks of the backend that decodes (after --backend auto has chosen)."""
    if args.batch_size is None:
        args.batch_size = default_batch_size(args)
    if args.backend == "ctranslate2":
        check_ct2_args(args)
    else:
        require(args.quantization is None, "--quantization is an option of --backend ctranslate2; "
                "this run decodes with fairseq")


def choose_backend(args):
    """What --backend auto decodes a new run with, and why: (backend, reason).

    CTranslate2 only where its speed and its agreement with fairseq were
    measured (CPU, one checkpoint, the 1-best), or where there is no agreement
    to keep (samples); fairseq everywhere else.
    """
    if not on_cpu(args):
        return "fairseq", "a GPU is visible, and CTranslate2 was measured against fairseq on CPU only"
    if ":" in args.path.strip(":"):
        return "fairseq", "CTranslate2 translates with one checkpoint, not an ensemble"
    if args.unkpen != 0:
        return "fairseq", "CTranslate2 has no --unkpen"
    if args.sampling:
        return "ctranslate2", SAMPLING_REASON
    if select.decodes_nbest(args):
        return "fairseq", NBEST_REASON
    return "ctranslate2", AUTO_CPU_REASON


def convert_for_auto(args, reason):
    """Convert the teacher (cached) for auto's choice of CTranslate2: (backend, reason).

    A teacher CTranslate2's converter refuses (architecture, options) is
    decoded by fairseq instead, the refusal being the reason.
    """
    asked = args.quantization
    args.backend = "ctranslate2"
    check_ct2_args(args)
    try:
        prepare_backend(args)
    except KDError as e:
        args.quantization = asked
        return "fairseq", str(e)
    return "ctranslate2", reason


def resolve_backend(args):
    """Replace --backend auto by its choice, logged with the reason.

    A resumed run keeps the backend (and quantization) its saved chunks were
    made with, so a default that changes does not stop it from resuming.
    """
    if args.backend != AUTO:
        return
    resumed = resumed_backend(args)
    if resumed is not None:
        backend, reason = resumed[0], f"the run being resumed in {work_path(args)} used it"
        args.quantization = args.quantization or resumed[1]
    else:
        backend, reason = choose_backend(args)
        if backend == "ctranslate2":
            backend, reason = convert_for_auto(args, reason)
    args.backend = backend
    detail = f" ({args.quantization})" if backend == "ctranslate2" else ""
    logger.info(f"--backend auto: decoding with {backend}{detail}: {reason}; "
                "--backend fairseq or ctranslate2 chooses one")


def check_ct2_args(args):
    """What the ctranslate2 backend cannot do; --fp16 there means float16 weights."""
    from fairseq_kd.deploy.ct2 import QUANTIZATIONS

    require(":" not in args.path.strip(":"),
            "--backend ctranslate2 translates with one teacher, not an ensemble (--path A.pt:B.pt)")
    require(args.unkpen == 0, "--unkpen is not supported by --backend ctranslate2")
    if args.quantization is None:
        args.quantization = "float16" if args.fp16 else "float32"
    require(args.quantization in QUANTIZATIONS,
            f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {args.quantization}")


def default_batch_size(args):
    """Sentences per batch when --batch-size is not given: CTranslate2's CPU size, else as fairseq."""
    if args.backend == "ctranslate2" and on_cpu(args):
        from fairseq_kd.deploy.ct2 import CPU_BATCH_SIZE

        return CPU_BATCH_SIZE
    return 1000


def cuda_device_count(args):
    """The GPUs the backend would decode on (none with --cpu)."""
    if args.cpu:
        return 0
    if args.backend == "ctranslate2":
        import ctranslate2

        return ctranslate2.get_cuda_device_count()
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def on_cpu(args):
    return cuda_device_count(args) == 0


def default_workers(args):
    """One process per GPU; on CPU one process using every core.

    On 2 cores, one process with 2 intra-op threads decoded a 256-dim teacher
    faster than two single-threaded processes (benchmarks/README.md).
    """
    return cuda_device_count(args) or 1


def set_cpu_threads(args, workers):
    """--threads by default on CPU: the cores divided between the processes that run."""
    if args.threads == 0 and on_cpu(args):
        args.threads = max(1, usable_cores() // workers)


def prepare_backend(args):
    """Convert the teacher for the ctranslate2 backend (once, cached) before any worker starts."""
    if args.backend == "ctranslate2" and not getattr(args, "ct2_model", None):
        from fairseq_kd.deploy.ct2 import cached_model

        args.ct2_model = cached_model(args.path.strip(":"), args.data, args.source_lang, args.target_lang,
                                      args.quantization)


def is_external(args):
    """Whether the teacher is a CTranslate2 model folder translating raw text (--teacher-ct2)."""
    return bool(getattr(args, "teacher_ct2", None))


def prepare_split(args):
    """Check the teacher and the split, choose the backend; the split and its work folder.

    Everything a bad argument or input stops is checked before anything is written.
    """
    layout = external.check_external_args(args) if is_external(args) else None
    check_args(args)
    if layout is not None:
        args.batch_size = args.batch_size or default_batch_size(args)
        os.makedirs(args.out, exist_ok=True)
        data, work = external.open_split(args)
        logger.info(f"teacher {args.teacher_ct2} ({layout.kind}); {len(data)} lines of "
                    f"{args.split}.{args.source_lang}")
        return data, work, layout
    for p in args.path.split(":"):
        require_teacher_file(p)  # a missing teacher is reported before any work
    os.makedirs(args.out, exist_ok=True)
    data = SplitData(args)
    resolve_backend(args)
    check_backend_args(args)
    return data, WorkDir(args, len(data)), None


def decoding_args(args, keep):
    """The workers' copy of the options: the chunks still to translate keep as many candidates
    as the saved ones (a larger saved --keep serves this run: the merge keeps the first
    --keep of each line)."""
    decoding = argparse.Namespace(**vars(args))
    decoding.keep = keep
    return decoding


def shard_count(args):
    """--num-shards, by default one shard per worker process."""
    return args.num_shards or args.workers or default_workers(args)


def translate_given_shard(args, work):
    """Translate the chunks of shard --shard-id not saved yet, in this process; how many
    chunks the shard has."""
    num_shards = shard_count(args)
    set_cpu_threads(args, 1)
    prepare_backend(args)
    run_workers(args, [args.shard_id], num_shards, 1)
    return len(shard_chunks(len(work.chunks), num_shards, args.shard_id))


def translate_pending(args, work):
    """Translate the chunks not saved yet, over the workers of their shards."""
    workers, num_shards = args.workers or default_workers(args), shard_count(args)
    pending_before = work.pending(range(len(work.chunks)))
    if len(pending_before) < len(work.chunks):
        print(f"resuming: {len(work.chunks) - len(pending_before)} of {len(work.chunks)} chunks already done")
    todo = [s for s in range(num_shards)
            if work.pending(shard_chunks(len(work.chunks), num_shards, s))]
    workers = min(workers, max(len(todo), 1))  # no more processes than shards with work
    set_cpu_threads(args, workers)
    if todo:
        prepare_backend(args)
    run_workers(args, todo, num_shards, workers)
    missing = work.pending(range(len(work.chunks)))
    require(not missing, f"{len(missing)} chunks were not translated; rerun to resume")


def build(args):
    """``fairseq-kd corpus``: translate what is missing, then merge (or run one shard)."""
    data, work, layout = prepare_split(args)
    work.prepare()
    decoding = decoding_args(args, work.keep)
    started = time.time()
    if args.shard_id is not None:
        done = translate_given_shard(decoding, work)
        print(f"shard {args.shard_id}/{shard_count(args)}: {done} chunks done in {time.time() - started:.1f}s; "
              "run again without --shard-id to merge")
        return 0
    translate_pending(decoding, work)
    if layout is not None:
        report = external.merge(args, data, work, layout, time.time() - started)
    else:
        report = merge(args, data, work, time.time() - started)
    print(summary_line(args, report))
    return 0


def summary_line(args, report):
    """The line printed at the end: what was written, from what, and what was dropped."""
    changed = report["changed_picks"]
    picks = ("" if changed is None or args.select == "beam"
             else f": {changed} of {report['translated']} picks not the first candidate")
    filtered = sum(report["filtered"].values())
    # an external teacher's report also counts its empty translations
    failed = (f"{len(report['empty_translations'])} empty translations, "
              if "empty_translations" in report else "")
    return (f"wrote {report['pairs']} pairs for {report['sources']} sources to {args.out} "
            f"({','.join(parse_formats(args.formats))}): {report['translated']} translated, "
            f"{len(report['empty_sources'])} empty sources, {failed}{len(report['long_sources'])} long sources "
            f"({args.long_inputs}); {report['selection']}{picks}; {filtered} pairs filtered "
            f"(--filter {report['filter']}); "
            f"{report['seconds']:.1f}s")
