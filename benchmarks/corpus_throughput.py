"""Wall time of building a distilled corpus: stock fairseq-generate + H- extraction vs fairseq-kd corpus.

Both translate the same binarized split with the same teacher, beam, length
penalty and max length, end to end (process start, model and data loading,
decoding, writing the pieces file).  Prints both wall times, their ratio, and
whether the outputs are identical line by line (and their BLEU against the
gold target when they are not).

  python benchmarks/corpus_throughput.py DATA --path TEACHER.pt -s es -t en \\
      --split train --beam 5 [--cpu] [--workers N] [--max-lines N] [--allocator-baseline]

--max-lines translates only the first N lines (a copy of that slice of the
split is made with fairseq's own dataset tools).  Run on a GPU when one is
available; on CPU --workers sets how many processes fairseq-kd uses (stock
fairseq-generate uses one process with torch's default threads).
"""
import argparse
import os
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


def timed(cmd, stdout=None, extra_env=None):
    start = time.perf_counter()
    subprocess.run([str(c) for c in cmd], check=True, env=env(extra_env), stdout=stdout,
                   stderr=subprocess.DEVNULL)
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


def ours(args, data, work):
    out = work / "kd"
    cmd = [BIN / "fairseq-kd", "corpus", data, "--path", args.path, "--out", out, "--split", args.split,
           "-s", args.source_lang, "-t", args.target_lang, *decoding_args(args),
           "--formats", "pieces", "--no-progress-bar"]
    if args.cpu:
        cmd.append("--cpu")
    if args.workers:
        cmd += ["--workers", args.workers]
    if args.chunk_size:
        cmd += ["--chunk-size", args.chunk_size]
    seconds = timed(cmd)
    return seconds, (out / f"{args.split}.{args.target_lang}").read_text(encoding="utf-8").split("\n")[:-1]


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
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = slice_split(args, work / "data") if args.max_lines else Path(args.data)
        t_stock, stock_lines = stock(args, data, work)
        t_ours, our_lines = ours(args, data, work)
        t_alloc = stock(args, data, work, GLIBC_ALLOCATOR_ENV)[0] if args.allocator_baseline else None
        same = sum(a == b for a, b in zip(stock_lines, our_lines))
        print(f"lines: fairseq-kd {len(our_lines)}, fairseq-generate {len(stock_lines)}; "
              f"identical {same}/{len(our_lines)}")
        if same != len(our_lines):
            print(f"BLEU vs gold: fairseq-kd {bleu(our_lines, data, args):.2f}, "
                  f"fairseq-generate {bleu(stock_lines, data, args):.2f}")
        print(f"fairseq-generate + H- extraction: {t_stock:.1f}s")
        if t_alloc is not None:
            print(f"fairseq-generate + H-, allocator env: {t_alloc:.1f}s ({t_stock / t_alloc:.2f}x of stock)")
        print(f"fairseq-kd corpus:                {t_ours:.1f}s")
        print(f"speed-up: {t_stock / t_ours:.2f}x  ({len(our_lines)} lines, beam {args.beam}, "
              f"{'CPU' if args.cpu else 'GPU if available'}, {os.cpu_count()} cores, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, fairseq-kd --workers {args.workers or 'default'})")


if __name__ == "__main__":
    main()
