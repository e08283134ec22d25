"""Wall time of building a distilled corpus: stock fairseq-generate + H- extraction vs fairseq-kd corpus.

All translate the same binarized split with the same teacher, beam, length
penalty and max length, end to end (process start, model and data loading,
CTranslate2 conversion into an empty cache, decoding, writing the pieces
file): stock fairseq-generate, fairseq-kd corpus as a new user runs it (no
--backend: auto, which logs its choice), with the fairseq backend, and with
the ctranslate2 backend in float32 and int8.  Prints one row each: wall
time, speed-up over stock, corpus BLEU against the gold target, and the
share of lines identical to stock fairseq's output.

  python benchmarks/corpus_throughput.py DATA --path TEACHER.pt -s es -t en \\
      --split train --beam 5 [--cpu] [--workers N] [--max-lines N] [--allocator-baseline] \\
      [--backends default,fairseq,ctranslate2:float32,ctranslate2:int8]

--max-lines translates only the first N lines (a copy of that slice of the
split is made with fairseq's own dataset tools).  Run on a GPU when one is
available; on CPU --workers sets how many processes fairseq-kd uses (stock
fairseq-generate uses one process with torch's default threads).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# What fairseq_kd.allocator sets with mallopt, as glibc's environment variables:
# given to stock fairseq-generate by --allocator-baseline, to show how much of
# the speed-up the allocator settings alone explain.
GLIBC_ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647",
                       "MALLOC_TOP_PAD_": "268435456"}


def env(extra=None):
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONWARNINGS"] = "ignore"
    e.update(extra or {})
    return e


def timed(cmd, stdout=None, extra_env=None, stderr=subprocess.DEVNULL):
    start = time.perf_counter()
    subprocess.run([str(c) for c in cmd], check=True, env=env(extra_env), stdout=stdout, stderr=stderr)
    return time.perf_counter() - start


def decoding_args(args):
    return ["--beam", args.beam, "--lenpen", args.lenpen, "--max-tokens", args.max_tokens,
            "--max-len-a", args.max_len_a, "--max-len-b", args.max_len_b]


def slice_split(args, dest):
    """First --max-lines lines of the split, binarized with the same dictionaries."""
    from fairseq.data import Dictionary, data_utils, indexed_dataset

    dest.mkdir(parents=True)
    for lang in (args.source_lang, args.target_lang):
        shutil.copy(Path(args.data) / f"dict.{lang}.txt", dest / f"dict.{lang}.txt")
        d = Dictionary.load(str(dest / f"dict.{lang}.txt"))
        name = f"{args.split}.{args.source_lang}-{args.target_lang}.{lang}"
        ds = data_utils.load_indexed_dataset(str(Path(args.data) / name), d)
        builder = indexed_dataset.make_builder(str(dest / f"{name}.bin"), impl="mmap", vocab_size=len(d))
        for i in range(min(args.max_lines, len(ds))):
            builder.add_item(ds[i])
        builder.finalize(str(dest / f"{name}.idx"))
    return dest


def stock(args, data, work, extra_env=None):
    """fairseq-generate, then the H- lines sorted by id: the usual recipe."""
    gen_out = work / "generate.out"
    cmd = [BIN / "fairseq-generate", data, "--user-dir", REPO / "fairseq_kd", "--path", args.path,
           "--gen-subset", args.split, "-s", args.source_lang, "-t", args.target_lang,
           *decoding_args(args),
           # fairseq-generate otherwise drops the last partial batch (see README)
           "--required-batch-size-multiple", "1"]
    if args.cpu:
        cmd.append("--cpu")
    start = time.perf_counter()
    with open(gen_out, "w") as f:
        timed(cmd, stdout=f, extra_env=extra_env)
    hyps = {}
    with open(gen_out, encoding="utf-8") as f:
        for line in f:
            if line.startswith("H-"):
                i, _, text = line[2:].rstrip("\n").split("\t")
                hyps[int(i)] = text
    lines = [hyps.get(i, "") for i in range(max(hyps) + 1 if hyps else 0)]
    (work / "stock.txt").write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return time.perf_counter() - start, lines


def ours(args, data, work, backend="fairseq"):
    """(row label, seconds, lines) of fairseq-kd corpus with ``backend`` (default: no
    --backend; auto, fairseq, or ctranslate2:QUANTIZATION), into a fresh folder."""
    name, _, quantization = backend.partition(":")
    out = work / f"kd-{name}-{quantization}"
    cmd = [BIN / "fairseq-kd", "corpus", data, "--path", args.path, "--out", out, "--split", args.split,
           "-s", args.source_lang, "-t", args.target_lang, *decoding_args(args),
           "--formats", "pieces", "--no-progress-bar"]
    if name != "default":
        cmd += ["--backend", name]
    if quantization:
        cmd += ["--quantization", quantization]
    if args.cpu:
        cmd.append("--cpu")
    if args.workers:
        cmd += ["--workers", args.workers]
    if args.chunk_size:
        cmd += ["--chunk-size", args.chunk_size]
    log = work / f"kd-{name}-{quantization}.log"
    with open(log, "w") as f:  # conversion included
        seconds = timed(cmd, extra_env={"FAIRSEQ_KD_CACHE": str(out / "cache")}, stderr=f)
    lines = (out / f"{args.split}.{args.target_lang}").read_text(encoding="utf-8").split("\n")[:-1]
    return row_label(backend, log.read_text(encoding="utf-8")), seconds, lines


def row_label(backend, log):
    """The row's name; for --backend auto (the default) with the backend it logged choosing."""
    label = ("fairseq-kd corpus, default" if backend == "default"
             else f"fairseq-kd corpus --backend {backend.replace(':', ' ')}")
    chosen = re.search(r"--backend auto: decoding with (\w+)(?: \((\w+)\))?:", log)
    return f"{label} (auto: {' '.join(filter(None, chosen.groups()))})" if chosen else label


def bleu(lines, data, args):
    import sacrebleu
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(str(Path(data) / f"dict.{args.target_lang}.txt"))
    ds = data_utils.load_indexed_dataset(
        str(Path(data) / f"{args.split}.{args.source_lang}-{args.target_lang}.{args.target_lang}"), d)
    refs = [d.string(ds[i], "sentencepiece") for i in range(len(lines))]
    hyps = [data_utils.post_process(l, "sentencepiece") for l in lines]
    return sacrebleu.corpus_bleu(hyps, [refs]).score


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--path", required=True)
    p.add_argument("-s", "--source-lang", required=True)
    p.add_argument("-t", "--target-lang", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--lenpen", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=12000)
    p.add_argument("--max-len-a", type=float, default=0.0, help="as fairseq-generate (default 0)")
    p.add_argument("--max-len-b", type=int, default=200, help="as fairseq-generate (default 200)")
    p.add_argument("--allocator-baseline", action="store_true",
                   help="also time fairseq-generate with the glibc allocator settings that "
                        "fairseq-kd corpus uses on CPU (given as environment variables)")
    p.add_argument("--max-lines", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=0, help="fairseq-kd corpus --chunk-size (default: its own)")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--backends", default="default,fairseq,ctranslate2:float32,ctranslate2:int8",
                   help="fairseq-kd corpus runs, comma-separated: default (no --backend), auto, fairseq, "
                        "ctranslate2:QUANTIZATION")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = slice_split(args, work / "data") if args.max_lines else Path(args.data)
        t_stock, stock_lines = stock(args, data, work)
        rows = [("fairseq-generate + H- lines", t_stock, stock_lines)]
        if args.allocator_baseline:
            rows.append(("fairseq-generate, allocator env", *stock(args, data, work, GLIBC_ALLOCATOR_ENV)))
        for backend in filter(None, args.backends.split(",")):
            rows.append(ours(args, data, work, backend))
        print(f"{len(stock_lines)} lines, beam {args.beam}, {'CPU' if args.cpu else 'GPU if available'}, "
              f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
              f"fairseq-kd --workers {args.workers or 'default'}\n")
        table = ["| run | wall time (s) | speed-up | BLEU | identical to stock |", "|---|---:|---:|---:|---:|"]
        for label, seconds, lines in rows:
            assert len(lines) == len(stock_lines), f"{label}: {len(lines)} lines, stock {len(stock_lines)}"
            same = sum(a == b for a, b in zip(stock_lines, lines))
            table.append(f"| {label} | {seconds:.1f} | {t_stock / seconds:.2f}x | {bleu(lines, data, args):.2f} | "
                         f"{same / len(lines):.1%} |")
        print("\n".join(table))


if __name__ == "__main__":
    main()
