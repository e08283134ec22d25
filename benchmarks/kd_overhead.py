#!/usr/bin/env python3
"""Cost of word-level KD per update, relative to label-smoothed cross-entropy.

Same student, same teacher, same batches for every mode; each mode runs in its
own process so that its peak memory is its own.  Prints, per mode, the mean
time per update (forward + backward + Adam step) and the peak memory used by
the updates, then both as ratios to ``label_smoothed_cross_entropy``.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` minus what was
allocated before the first update (weights); on CPU, the growth of the
process's peak resident set size (``ru_maxrss``) over its size before the first
update.  Weights are random: the cost of KD does not depend on their values.
The cached mode reads the teacher's top-8 from a cache of the train split,
built (outside the timing) by ``fairseq-kd cache-teacher`` on first use and
kept in the work folder with the data and the teacher.  The hybrid_kd mode
needs distilled targets: a stand-in corpus (each source paired with the next
sentence's gold target, so gold and distilled lengths differ as they would)
is binarized once into the work folder; the cost does not depend on what the
distilled targets say.

    python benchmarks/kd_overhead.py                    # CPU
    python benchmarks/kd_overhead.py --device cuda      # GPU
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> criterion options; every KD mode uses the same teacher, online or
# through a cache of its top-8 built once (CACHE stands for its directory;
# DISTILLED for the stand-in distilled corpus of hybrid_kd).
CACHE = "{cache}"
DISTILLED = "{distilled}"
MODES = {
    "label_smoothed_cross_entropy": ["--criterion", "label_smoothed_cross_entropy"],
    "word_kd (full vocab)": ["--criterion", "word_kd", "--kd-alpha", "0.5", "--kd-temperature", "2"],
    "word_kd (top-8)": ["--criterion", "word_kd", "--kd-alpha", "0.5", "--kd-temperature", "2",
                        "--kd-topk", "8"],
    "word_kd (cached top-8)": ["--criterion", "word_kd", "--kd-alpha", "0.5", "--kd-temperature", "2",
                               "--kd-topk", "8", "--teacher-cache", CACHE],
    "hybrid_kd (full vocab)": ["--criterion", "hybrid_kd", "--gate", "relative_loss", "--kd-temperature", "2",
                               "--distilled-data", DISTILLED],
}
TEACHER_ARCH = ["--arch", "transformer_iwslt_de_en", "--share-all-embeddings"]
STUDENT_ARCH = ["--arch", "transformer_student_small", "--share-all-embeddings"]


def prepare_data(work, n_train, vocab):
    """Bible slice -> SentencePiece -> fairseq binary data, cached in ``work``."""
    bin_dir = work / "bin"
    if (bin_dir / "train.es-en.en.idx").exists():
        return bin_dir
    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    with tarfile.open(REPO / "examples/data/bible.es-en.tar.xz") as tar:
        for split, n in (("train", n_train), ("valid", 100)):
            for lang in ("es", "en"):
                lines = tar.extractfile(f"bible.es-en/{split}.{lang}").read().decode().splitlines()[:n]
                (raw / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    bin_ = Path(sys.executable).parent
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([bin_ / "fairseq-kd", "spm", "--input-dir", raw, "--src", "es", "--tgt", "en",
                    "--splits", "train,valid", "--vocab-size", str(vocab), "--out", work / "pieces"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run([bin_ / "fairseq-preprocess", "-s", "es", "-t", "en",
                    "--trainpref", work / "pieces/train.sp", "--validpref", work / "pieces/valid.sp",
                    "--destdir", bin_dir, "--joined-dictionary", "--workers", "2"],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return bin_dir


def build(data_bin, device, *args):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    extra = ["--cpu"] if device == "cpu" else []
    ns = options.parse_args_and_arch(
        parser, [str(data_bin), "--user-dir", str(REPO / "fairseq_kd"), *extra, *map(str, args)])
    cfg = convert_namespace_to_omegaconf(ns)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return ns, cfg, task, model


def make_distilled(work, data_bin):
    """Stand-in distilled corpus for hybrid_kd: source i with gold target i+1 (cached in ``work``)."""
    out = work / "distilled"
    if (out / "train.es-en.en.idx").exists():
        return out
    pieces = work / "pieces"
    fake = work / "distilled_pieces"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "train.es").write_text((pieces / "train.sp.es").read_text())
    tgt = (pieces / "train.sp.en").read_text().splitlines()
    (fake / "train.en").write_text("\n".join(tgt[1:] + tgt[:1]) + "\n")
    bin_ = Path(sys.executable).parent
    subprocess.run([bin_ / "fairseq-preprocess", "-s", "es", "-t", "en", "--trainpref", fake / "train",
                    "--srcdict", data_bin / "dict.es.txt", "--tgtdict", data_bin / "dict.en.txt",
                    "--destdir", out, "--workers", "2"],
                   check=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def make_teacher(data_bin, path):
    """A random teacher saved as a fairseq checkpoint (args + model state), kept in the
    work folder like the data (so that a teacher cache built from it stays valid)."""
    import torch

    if not path.exists():
        ns, _, _, model = build(data_bin, "cpu", "--task", "translation", *TEACHER_ARCH)
        torch.save({"args": ns, "model": model.state_dict()}, path)
    state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    # embeddings are shared: count each tensor once
    return sum(v.numel() for k, v in state.items() if not k.endswith(("output_projection.weight",
                                                                       "decoder.embed_tokens.weight")))


def build_cache(data_bin, teacher, cache, device):
    """The teacher's top-8 on the train split (kept in ``cache``; a rerun resumes/skips)."""
    bin_ = Path(sys.executable).parent
    cmd = [bin_ / "fairseq-kd", "cache-teacher", data_bin, "--teacher-path", teacher, "--out", cache,
           "--splits", "train", "--topk", "8", "--no-progress-bar"] + (["--cpu"] if device == "cpu" else [])
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore"))
    if out.returncode:
        sys.exit(f"fairseq-kd cache-teacher failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def mode_args(mode, teacher, cache, distilled):
    args = [{CACHE: str(cache), DISTILLED: str(distilled)}.get(a, a) for a in MODES[mode]]
    return args if "--teacher-cache" in args else ["--teacher-path", teacher, *args]


def run_mode(mode, data_bin, teacher, cache, distilled, device, updates, warmup, max_tokens):
    """Time ``updates`` updates of one mode in this process; returns a result dict."""
    import torch

    torch.manual_seed(0)
    _, cfg, task, model = build(
        data_bin, device, "--task", "translation_kd", *STUDENT_ARCH, "--label-smoothing", "0.1",
        *mode_args(mode, teacher, cache, distilled))
    criterion = task.build_criterion(cfg.criterion)
    model, criterion = model.to(device), criterion.to(device)
    model.train()
    params = [p for p in list(model.parameters()) + list(criterion.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    task.load_dataset("train")
    itr = task.get_batch_iterator(dataset=task.dataset("train"), max_tokens=max_tokens, seed=1)
    batches = list(itr.next_epoch_itr(shuffle=False))[: warmup + updates]
    from fairseq import utils

    def step(sample):
        sample = utils.move_to_cuda(sample) if device == "cuda" else sample
        loss, sample_size, _ = criterion(model, sample)
        (loss / sample_size).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if mode != "label_smoothed_cross_entropy" and task.cfg.teacher_path:
        # load and place outside the timed region, like fairseq does once per run
        first = next(model.parameters())
        task.teacher.load().place(first.device, first.dtype)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    else:
        base_mem = current_rss_bytes()
    for sample in batches[:warmup]:
        step(sample)
    sync()
    start = time.perf_counter()
    for sample in batches[warmup:]:
        step(sample)
    sync()
    elapsed = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_mem
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_mem
    ntok = sum(b["ntokens"] for b in batches[warmup:])
    return {"mode": mode, "sec_per_update": elapsed / len(batches[warmup:]),
            "peak_bytes": max(peak, 0), "target_tokens_per_update": ntok / len(batches[warmup:])}


def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(cmd, mode):
    """Run one mode in its own process (a clean peak-memory reading); its RESULT line, parsed."""
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore"))
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"mode {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


def add_bench_arguments(ap, modes):
    """The options this script shares with onpolicy_overhead.py (same data, teacher and work folder)."""
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--updates", type=int, default=10, help="timed updates per mode")
    ap.add_argument("--warmup", type=int, default=2, help="untimed updates first")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--train-lines", type=int, default=10000)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fairseq_kd_bench"),
                    help="data and teacher, built once and shared by the benchmark scripts")
    ap.add_argument("--modes", default=",".join(modes), help="comma-separated subset of: " + ", ".join(modes))
    ap.add_argument("--_child", help=argparse.SUPPRESS)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_arguments(ap, MODES)
    args = ap.parse_args()
    work = Path(args.workdir)
    data_bin = work / "bin"
    teacher = work / "teacher.pt"
    cache = work / "teacher_cache"
    distilled = work / "distilled"

    if args._child:  # one mode, in a fresh process
        res = run_mode(args._child, data_bin, teacher, cache, distilled, args.device, args.updates, args.warmup,
                       args.max_tokens)
        print("RESULT " + json.dumps(res))
        return

    import torch

    work.mkdir(parents=True, exist_ok=True)
    prepare_data(work, args.train_lines, args.vocab)
    n_teacher = make_teacher(data_bin, teacher)
    threads = torch.get_num_threads()
    print(f"device {args.device}, torch {torch.__version__}, {threads} CPU threads, "
          f"teacher transformer_iwslt_de_en ({n_teacher:,} params), student "
          f"transformer_student_small, vocab {args.vocab}, max-tokens {args.max_tokens}, "
          f"{args.updates} timed updates after {args.warmup} warm-up")
    modes = [m for m in args.modes.split(",") if m]
    if any(CACHE in MODES[m] for m in modes):
        print(build_cache(data_bin, teacher, cache, args.device))
    if any(DISTILLED in MODES[m] for m in modes):
        make_distilled(work, data_bin)
    results = []
    for mode in modes:
        cmd = [sys.executable, __file__, "--_child", mode, "--device", args.device,
               "--updates", str(args.updates), "--warmup", str(args.warmup),
               "--max-tokens", str(args.max_tokens), "--workdir", str(work)]
        results.append(run_child(cmd, mode))
    base = results[0]
    print(f"\n{'mode':<32}{'s/update':>10}{'peak MiB':>10}{'time x':>8}{'mem x':>8}")
    for r in results:
        print(f"{r['mode']:<32}{r['sec_per_update']:>10.3f}{r['peak_bytes'] / 2**20:>10.1f}"
              f"{r['sec_per_update'] / base['sec_per_update']:>8.2f}"
              f"{r['peak_bytes'] / max(base['peak_bytes'], 1):>8.2f}")
    print(f"(ratios relative to {base['mode']}; "
          f"{base['target_tokens_per_update']:.0f} target tokens per update)")


if __name__ == "__main__":
    main()
