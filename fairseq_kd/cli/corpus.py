"""Translate a training split with the teacher into a distilled corpus (Seq-KD, Seq-Inter).

Reads the fairseq-binarized split DATA/SPLIT.SRC-TGT.* (the student's data),
translates every source line with the teacher (beam search by fairseq's own
SequenceGenerator, same settings and results as fairseq-generate) and writes,
line-aligned with the source (same lines, same order):

  bin     OUT/SPLIT.SRC-TGT.{SRC,TGT}.{bin,idx} + OUT/dict.*.txt: what
          fairseq-preprocess --srcdict/--tgtdict writes; the source files are
          copied, the target is the teacher's output. --copy-splits adds the
          gold valid/test data so OUT trains as it is.
  pieces  OUT/SPLIT.SRC and OUT/SPLIT.TGT, tokens as in the dictionaries
          (e.g. SentencePiece pieces), ready for fairseq-preprocess.
  text    OUT/SPLIT.text.TGT, the translation after --post-process.

Every line is kept: an empty source gives an empty translation; a source
longer than --max-source-tokens gets the gold target (--long-inputs reference)
or is translated truncated (--long-inputs truncate); both are counted in
OUT/SPLIT.report.json.  --seq-inter N decodes an N-best list (beam N) and keeps
the hypothesis with the highest sentence BLEU (sacrebleu) against the gold
target.

The split is cut into chunks of --chunk-size lines; each finished chunk is
saved at once (OUT/SPLIT.work/), so an interrupted run resumes where it
stopped.  --workers W translates in W processes (one per GPU, or W CPU
processes splitting the cores); --num-shards/--shard-id run one shard (e.g.
one cluster job per shard); a run without --shard-id translates what is
missing and merges.
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
from fairseq_kd.errors import require
from fairseq_kd.processes import die_with_parent, usable_cores

logger = logging.getLogger("fairseq_kd.corpus")

FORMATS = ("bin", "pieces", "text")
# Settings that change the output: a resumed run must use the same ones.
OUTPUT_SETTINGS = ("path", "data", "split", "source_lang", "target_lang", "beam", "lenpen",
                   "unkpen", "max_len_a", "max_len_b", "min_len", "seq_inter", "post_process",
                   "max_source_tokens", "long_inputs", "chunk_size", "fp16")


def add_arguments(p):
    p.add_argument("data", help="fairseq-binarized data folder (dict.*.txt, SPLIT.SRC-TGT.*)")
    p.add_argument("--path", required=True, help="teacher checkpoint; A.pt:B.pt is an ensemble")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("-s", "--source-lang", required=True)
    p.add_argument("-t", "--target-lang", required=True)
    p.add_argument("--split", default="train", help="split to translate (default: train)")
    p.add_argument("--formats", default="bin,pieces",
                   help="comma-separated subset of bin,pieces,text (default: bin,pieces)")
    p.add_argument("--copy-splits", default="valid,test",
                   help="gold splits copied into OUT with the bin format, when they exist "
                        "(default: valid,test); '' copies none")
    g = p.add_argument_group("decoding (as fairseq-generate)")
    g.add_argument("--beam", type=int, default=5, help="beam size (default: 5)")
    g.add_argument("--lenpen", type=float, default=1.0, help="length penalty (default: 1)")
    g.add_argument("--unkpen", type=float, default=0.0, help="unknown-word penalty (default: 0)")
    g.add_argument("--max-len-a", type=float, default=0.0, help="max length = a * src_len + b (default a: 0)")
    g.add_argument("--max-len-b", type=int, default=200, help="(default b: 200)")
    g.add_argument("--min-len", type=int, default=1)
    g.add_argument("--seq-inter", type=int, default=0, metavar="N",
                   help="Seq-Inter: decode the N best (beam N) and keep the one with the "
                        "highest sentence BLEU against the gold target (default: 0, off)")
    g.add_argument("--post-process", default=None,
                   help="as fairseq's --post-process (e.g. sentencepiece): applied for the "
                        "text format and before sentence BLEU")
    g.add_argument("--max-tokens", type=int, default=12000,
                   help="source tokens per batch (default: 12000, fairseq-generate's default)")
    g.add_argument("--batch-size", type=int, default=1000, help="sentences per batch at most")
    g.add_argument("--fp16", action="store_true", help="decode in fp16 (GPU)")
    g.add_argument("--cpu", action="store_true", help="do not use a GPU")
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
                   help="torch threads per CPU worker (default: cores / workers)")
    g.add_argument("--num-shards", type=int, default=0,
                   help="shards the chunks are divided into (default: --workers)")
    g.add_argument("--shard-id", type=int, default=None,
                   help="translate only this shard, do not merge (one job per shard)")
    g.add_argument("--no-progress-bar", action="store_true")


# ---------------------------------------------------------------- planning
def chunk_ranges(n_lines, chunk_size):
    """[(start, end)] of consecutive chunks covering lines 0..n_lines-1."""
    return [(s, min(s + chunk_size, n_lines)) for s in range(0, n_lines, chunk_size)]


def shard_chunks(n_chunks, num_shards, shard_id):
    """Chunk ids of one shard: a contiguous block, sizes differing by at most one."""
    base, extra = divmod(n_chunks, num_shards)
    start = shard_id * base + min(shard_id, extra)
    return list(range(start, start + base + (shard_id < extra)))


def length_sorted_batches(indices, sizes, max_tokens, max_sentences):
    """Batches of ``indices`` sorted by length, each padded size <= max_tokens.

    Like fairseq's batching: sorting by length makes padding and the number of
    beam-search steps per batch small.
    """
    batches, current, longest = [], [], 0
    for i in sorted(indices, key=lambda i: (sizes[i], i)):
        longest_if_added = max(longest, sizes[i])
        if current and (longest_if_added * (len(current) + 1) > max_tokens
                        or len(current) >= max_sentences):
            batches.append(current)
            current, longest_if_added = [], sizes[i]
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def select_by_sentence_bleu(hypotheses, reference):
    """Index of the hypothesis with the highest sentence BLEU (first one on ties)."""
    import sacrebleu

    scores = [sacrebleu.sentence_bleu(h, [reference]).score for h in hypotheses]
    return max(range(len(scores)), key=lambda k: (scores[k], -k))


# ---------------------------------------------------------------- data
def pair_prefix(data, split, src, tgt):
    """DATA/SPLIT.SRC-TGT or DATA/SPLIT.TGT-SRC, whichever fairseq-preprocess wrote."""
    from fairseq.data import indexed_dataset

    for a, b in ((src, tgt), (tgt, src)):
        prefix = os.path.join(data, f"{split}.{a}-{b}")
        if indexed_dataset.dataset_exists(f"{prefix}.{src}", impl=None):
            return prefix
    expected = os.path.join(data, f"{split}.{src}-{tgt}.{src}.bin")
    require(False, f"no binarized split '{split}' for {src}-{tgt} in {data} (expected {expected})")


class SplitData:
    """Source (and gold target, when present) of a binarized split, with its dictionaries."""

    def __init__(self, args):
        from fairseq.data import Dictionary, data_utils, indexed_dataset

        require(os.path.isdir(args.data), f"data folder not found: {args.data}")
        src, tgt = args.source_lang, args.target_lang
        for lang in (src, tgt):
            require(os.path.isfile(os.path.join(args.data, f"dict.{lang}.txt")),
                    f"missing dictionary {os.path.join(args.data, f'dict.{lang}.txt')}")
        self.src_dict = Dictionary.load(os.path.join(args.data, f"dict.{src}.txt"))
        self.tgt_dict = Dictionary.load(os.path.join(args.data, f"dict.{tgt}.txt"))
        self.prefix = pair_prefix(args.data, args.split, src, tgt)
        self.src = data_utils.load_indexed_dataset(f"{self.prefix}.{src}", self.src_dict)
        self.tgt = (data_utils.load_indexed_dataset(f"{self.prefix}.{tgt}", self.tgt_dict)
                    if indexed_dataset.dataset_exists(f"{self.prefix}.{tgt}", impl=None) else None)
        if self.tgt is not None:
            require(len(self.tgt) == len(self.src),
                    f"{self.prefix}: {len(self.src)} source but {len(self.tgt)} target lines")
        self.sizes = self.src.sizes

    def __len__(self):
        return len(self.src)

    def reference(self, i, post_process=None):
        require(self.tgt is not None, f"{self.prefix}.{{bin,idx}}: no gold target side, "
                "needed by --seq-inter and --long-inputs reference")
        return self.tgt_dict.string(self.tgt[i], post_process, escape_unk=post_process is not None)


# ---------------------------------------------------------------- translation
class ChunkTranslator:
    """The teacher and fairseq's SequenceGenerator, loaded once per process."""

    def __init__(self, args, data, device):
        import torch
        from argparse import Namespace

        from fairseq.dataclass.configs import GenerationConfig

        from fairseq_kd.tasks.translation_kd import TranslationKDConfig, TranslationKDTask

        self.args, self.data, self.device = args, data, device
        cfg = TranslationKDConfig(data=args.data, source_lang=args.source_lang,
                                  target_lang=args.target_lang, teacher_path=args.path)
        # The task owns teacher loading and its dictionary checks.
        self.task = TranslationKDTask(cfg, data.src_dict, data.tgt_dict)
        self.nbest = args.seq_inter or 1
        gen = GenerationConfig(beam=args.seq_inter or args.beam, nbest=self.nbest, lenpen=args.lenpen,
                               unkpen=args.unkpen, max_len_a=args.max_len_a, max_len_b=args.max_len_b,
                               min_len=args.min_len)
        self.models = self.task.teachers
        for m in self.models:
            m.to(device)
            if args.fp16:
                m.half()
            # as fairseq-generate: beam-size-aware attention, so results match its own
            m.prepare_for_inference_(Namespace(generation=gen))
        self.generator = self.task.build_generator(self.models, gen)
        self.strip = getattr(self.generator, "symbols_to_strip_from_output", {self.generator.eos})
        self.max_source = max_source_tokens(args, self.models)
        self.torch = torch

    def translate_chunk(self, start, end):
        """Translate lines start..end-1, yielding batch sizes as it goes.

        The chunk's result, {"lines", "empty", "long"}, is left in ``self.result``.
        """
        d = self.data
        lines, empty, long = {}, [], []
        todo = []
        for i in range(start, end):
            if d.sizes[i] <= 1:  # only </s>: nothing to translate
                lines[i] = ""
                empty.append(i)
            elif d.sizes[i] > self.max_source:
                long.append(i)
                if self.args.long_inputs == "reference":
                    lines[i] = d.reference(i)
                else:
                    todo.append(i)
            else:
                todo.append(i)
        sizes = {i: min(int(d.sizes[i]), self.max_source) for i in todo}
        for batch in length_sorted_batches(todo, sizes, self.args.max_tokens, self.args.batch_size):
            for i, hyps in zip(batch, self._generate(batch)):
                lines[i] = self._choose(i, hyps)
            yield len(batch)
        self.result = {"start": start, "end": end, "lines": [lines[i] for i in range(start, end)],
                       "empty": empty, "long": long}

    def _source(self, i):
        tokens = self.data.src[i]
        if len(tokens) > self.max_source:  # --long-inputs truncate: keep </s> at the end
            tokens = self.torch.cat([tokens[: self.max_source - 1], tokens[-1:]])
        return tokens

    def _generate(self, batch):
        from fairseq.data import data_utils

        d = self.data
        tokens = [self._source(i) for i in batch]
        src_tokens = data_utils.collate_tokens(tokens, d.src_dict.pad(), d.src_dict.eos(), left_pad=True)
        sample = {"net_input": {"src_tokens": src_tokens.to(self.device),
                                "src_lengths": self.torch.tensor([len(t) for t in tokens], device=self.device)}}
        hypos = self.task.inference_step(self.generator, self.models, sample)
        return [[h["tokens"].int().cpu() for h in sent[: self.nbest]] for sent in hypos]

    def _choose(self, i, hyps):
        pieces = [self.data.tgt_dict.string(h, extra_symbols_to_ignore=self.strip) for h in hyps]
        if len(pieces) == 1:
            return pieces[0]
        post = self.args.post_process
        texts = [self.data.tgt_dict.string(h, post, extra_symbols_to_ignore=self.strip) for h in hyps]
        return pieces[select_by_sentence_bleu(texts, self.data.reference(i, post))]


def max_source_tokens(args, models):
    limit = min(m.max_positions()[0] for m in models)
    if args.max_source_tokens > 0:
        # longer sources would index past the teacher's position embeddings
        require(args.max_source_tokens <= limit, f"--max-source-tokens {args.max_source_tokens} "
                f"exceeds the teacher's maximum source positions ({limit})")
        return args.max_source_tokens
    return limit


# ---------------------------------------------------------------- work folder
class WorkDir:
    """OUT/SPLIT.work: settings.json and one chunk-XXXXXX.json per finished chunk."""

    def __init__(self, args, n_lines):
        self.path = os.path.join(args.out, f"{args.split}.work")
        self.chunks = chunk_ranges(n_lines, args.chunk_size)
        self.settings = {k: getattr(args, k) for k in OUTPUT_SETTINGS}
        self.settings["data"] = os.path.abspath(args.data)
        self.settings["path"] = ":".join(os.path.abspath(p) for p in args.path.split(":") if p)
        self.settings["n_lines"] = n_lines
        self.settings["teacher_fingerprint"] = [file_fingerprint(p) for p in args.path.split(":") if p]

    def prepare(self):
        os.makedirs(self.path, exist_ok=True)
        settings_file = os.path.join(self.path, "settings.json")
        if os.path.exists(settings_file):
            with open(settings_file) as f:
                old = json.load(f)
            changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
            # Settings of a run that saved no chunk (e.g. one that failed at start) bind nothing.
            require(not changed or not self._any_chunk(),
                    f"{self.path} holds a run with other settings ({', '.join(changed)}); "
                    "use another --out or delete that folder")
            if not changed:
                return
        write_atomic(settings_file, json.dumps(self.settings, indent=1))

    def _any_chunk(self):
        return bool(glob.glob(os.path.join(self.path, "chunk-*.json")))

    def chunk_file(self, c):
        return os.path.join(self.path, f"chunk-{c:06d}.json")

    def is_done(self, c):
        return os.path.exists(self.chunk_file(c))

    def pending(self, chunk_ids):
        return [c for c in chunk_ids if not self.is_done(c)]

    def save(self, c, result):
        write_atomic(self.chunk_file(c), json.dumps(result, ensure_ascii=False))

    def load(self, c):
        with open(self.chunk_file(c), encoding="utf-8") as f:
            return json.load(f)


def file_fingerprint(path):
    require(os.path.isfile(path), f"--path: teacher checkpoint not found: {path}")
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}"


# ---------------------------------------------------------------- running
def translate_shard(args, shard_id, num_shards, worker_index=0):
    """Translate the pending chunks of one shard (in this process)."""
    import torch
    from tqdm import tqdm

    data = SplitData(args)
    work = WorkDir(args, len(data))
    chunk_ids = work.pending(shard_chunks(len(work.chunks), num_shards, shard_id))
    if not chunk_ids:
        return
    if not on_cpu(args):
        device = torch.device("cuda", worker_index % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        keep_freed_memory()
    translator = ChunkTranslator(args, data, device)
    total = sum(work.chunks[c][1] - work.chunks[c][0] for c in chunk_ids)
    with tqdm(total=total, desc=f"shard {shard_id}/{num_shards}", unit="sent", position=worker_index,
              disable=args.no_progress_bar or None, leave=False) as bar:
        for c in chunk_ids:
            for n in translator.translate_chunk(*work.chunks[c]):
                bar.update(n)
            start, end = work.chunks[c]
            bar.update(len(translator.result["empty"])
                       + (len(translator.result["long"]) if args.long_inputs == "reference" else 0))
            work.save(c, translator.result)


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


def merge(args, data, work):
    """Concatenate the chunks into the requested formats and write the report."""
    from fairseq.data import data_utils

    formats = parse_formats(args.formats)
    src, tgt, split = args.source_lang, args.target_lang, args.split
    lines, empty, long = [], [], []
    for c in range(len(work.chunks)):
        chunk = work.load(c)
        lines += chunk["lines"]
        empty += chunk["empty"]
        long += chunk["long"]
    require(len(lines) == len(data), f"merged {len(lines)} lines, the split has {len(data)}")
    if "pieces" in formats:
        write_lines(os.path.join(args.out, f"{split}.{tgt}"), lines)
        write_lines(os.path.join(args.out, f"{split}.{src}"),
                    (data.src_dict.string(data.src[i]) for i in range(len(data))))
    if "text" in formats:
        write_lines(os.path.join(args.out, f"{split}.text.{tgt}"),
                    (data_utils.post_process(l, args.post_process) for l in lines))
    if "bin" in formats:
        write_binarized(args, data, lines)
    report = {"lines": len(lines), "translated": len(lines) - len(empty) - (len(long) if args.long_inputs == "reference" else 0),
              "empty_sources": empty, "long_sources": long, "long_inputs": args.long_inputs,
              "max_source_tokens": args.max_source_tokens or "teacher's max positions"}
    write_atomic(os.path.join(args.out, f"{split}.report.json"), json.dumps(report, indent=1))
    return report


def write_binarized(args, data, lines):
    """What fairseq-preprocess --srcdict/--tgtdict writes for this split (and the gold ones)."""
    from fairseq.data import indexed_dataset

    src, tgt, split = args.source_lang, args.target_lang, args.split
    for lang in (src, tgt):
        shutil.copyfile(os.path.join(args.data, f"dict.{lang}.txt"), os.path.join(args.out, f"dict.{lang}.txt"))
    out_prefix = os.path.join(args.out, os.path.basename(data.prefix))
    for ext in (".bin", ".idx"):
        shutil.copyfile(f"{data.prefix}.{src}{ext}", f"{out_prefix}.{src}{ext}")
    builder = indexed_dataset.make_builder(f"{out_prefix}.{tgt}.bin", impl="mmap", vocab_size=len(data.tgt_dict))
    for line in lines:
        builder.add_item(data.tgt_dict.encode_line(line, add_if_not_exist=False, append_eos=True).long())
    builder.finalize(f"{out_prefix}.{tgt}.idx")
    for other in [s for s in args.copy_splits.split(",") if s and s != split]:
        files = [f for f in glob.glob(os.path.join(args.data, f"{other}.*-*.*"))
                 if f.endswith((f".{src}.bin", f".{src}.idx", f".{tgt}.bin", f".{tgt}.idx"))]
        if not files:
            logger.warning(f"--copy-splits: no split '{other}' in {args.data}")
        for f in files:
            shutil.copyfile(f, os.path.join(args.out, os.path.basename(f)))


def parse_formats(spec):
    formats = [f for f in spec.split(",") if f]
    unknown = sorted(set(formats) - set(FORMATS))
    require(formats and not unknown, f"--formats: expected a subset of {','.join(FORMATS)}, got '{spec}'")
    return formats


def check_args(args):
    formats = parse_formats(args.formats)
    require(not os.path.exists(args.out) or os.path.isdir(args.out), f"--out {args.out} is a file, not a folder")
    if "bin" in formats:  # checked before decoding: the bin files would overwrite the data's own
        require(os.path.realpath(args.data) != os.path.realpath(args.out),
                "--out must differ from the data folder with the bin format")
    require(args.beam >= 1, f"--beam must be >= 1, got {args.beam}")
    require(args.seq_inter >= 0, f"--seq-inter must be >= 0, got {args.seq_inter}")
    require(args.chunk_size >= 1, f"--chunk-size must be >= 1, got {args.chunk_size}")
    require(args.max_tokens >= 1 and args.batch_size >= 1, "--max-tokens and --batch-size must be >= 1")
    require(args.max_source_tokens >= 0, "--max-source-tokens must be >= 0")
    require(args.workers >= 0 and args.num_shards >= 0, "--workers and --num-shards must be >= 0")
    if args.shard_id is not None:
        require(args.num_shards >= 1, "--shard-id needs --num-shards")
        require(0 <= args.shard_id < args.num_shards,
                f"--shard-id must be in [0, {args.num_shards}), got {args.shard_id}")
    if args.fp16:
        import torch
        require(torch.cuda.is_available() and not args.cpu, "--fp16 needs a GPU")


def on_cpu(args):
    import torch

    return args.cpu or not torch.cuda.is_available()


def default_workers(args):
    """One process per GPU; on CPU one process using every core.

    On 2 cores, one process with 2 intra-op threads decoded a 256-dim teacher
    faster than two single-threaded processes (README, sequence-level KD).
    """
    import torch

    return 1 if on_cpu(args) else torch.cuda.device_count()


def set_cpu_threads(args, workers):
    """--threads by default on CPU: the cores divided between the processes that run."""
    if args.threads == 0 and on_cpu(args):
        args.threads = max(1, usable_cores() // workers)


def run(args):
    check_args(args)
    for p in args.path.split(":"):
        file_fingerprint(p)  # a missing teacher is reported before any work
    os.makedirs(args.out, exist_ok=True)
    data = SplitData(args)
    work = WorkDir(args, len(data))
    work.prepare()
    workers = args.workers or default_workers(args)
    num_shards = args.num_shards or workers
    started = time.time()
    if args.shard_id is not None:
        set_cpu_threads(args, 1)
        run_workers(args, [args.shard_id], num_shards, 1)
        done = len(shard_chunks(len(work.chunks), num_shards, args.shard_id))
        print(f"shard {args.shard_id}/{num_shards}: {done} chunks done in {time.time() - started:.1f}s; "
              "run again without --shard-id to merge")
        return 0
    pending_before = work.pending(range(len(work.chunks)))
    if len(pending_before) < len(work.chunks):
        print(f"resuming: {len(work.chunks) - len(pending_before)} of {len(work.chunks)} chunks already done")
    todo = [s for s in range(num_shards)
            if work.pending(shard_chunks(len(work.chunks), num_shards, s))]
    workers = min(workers, max(len(todo), 1))  # no more processes than shards with work
    set_cpu_threads(args, workers)
    run_workers(args, todo, num_shards, workers)
    missing = work.pending(range(len(work.chunks)))
    require(not missing, f"{len(missing)} chunks were not translated; rerun to resume")
    report = merge(args, data, work)
    print(f"wrote {report['lines']} lines to {args.out} ({','.join(parse_formats(args.formats))}): "
          f"{report['translated']} translated, {len(report['empty_sources'])} empty sources, "
          f"{len(report['long_sources'])} long sources ({args.long_inputs}); "
          f"{time.time() - started:.1f}s")
    return 0
