#!/usr/bin/env python3
"""Cost of on-policy KD (``onpolicy_kd``) per update, beside ``word_kd`` on the same batches.

Same student, same teacher, same batches for every mode; each mode runs in its
own process so that its peak memory is its own.  Prints, per mode, the mean
time per update (forward + backward + Adam step, generation included), the
part of it spent generating, the target tokens trained on per update (the
generated ones for on-policy batches), the peak memory used by the updates,
and time and memory as ratios to ``word_kd`` at alpha 1.

Data, work folder and the random teacher are those of ``kd_overhead.py``
(built once, shared).  The trainer's per-update seeding is reproduced (torch
seeded with 1 + the update number before each update), so ``--onpolicy-ratio
0.5`` draws its on-policy batches as ``fairseq-train --seed 1`` would.  A
random student samples until its length limit (``--onpolicy-max-len-a/-b``)
nearly always, which is the most a batch can cost; ``--student-checkpoint``
loads trained weights (same architecture) to measure the lengths a real
student writes.  Peak memory as in ``kd_overhead.py``: CUDA allocator peak
over the weights, or the growth of the process's peak RSS on CPU.

    python benchmarks/onpolicy_overhead.py                        # CPU
    python benchmarks/onpolicy_overhead.py --device cuda          # GPU
    python benchmarks/onpolicy_overhead.py --student-checkpoint student/checkpoint_last.pt
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from kd_overhead import (  # noqa: E402
    STUDENT_ARCH, add_bench_arguments, build, run_child, current_rss_bytes, make_teacher, prepare_data)

ONPOLICY = ["--criterion", "onpolicy_kd"]
MODES = {
    "word_kd alpha 1": ["--criterion", "word_kd", "--kd-alpha", "1"],
    "onpolicy ratio 0 beta 0": [*ONPOLICY, "--onpolicy-ratio", "0", "--jsd-beta", "0"],
    "onpolicy ratio 0 beta 0.5": [*ONPOLICY, "--onpolicy-ratio", "0", "--jsd-beta", "0.5"],
    "onpolicy ratio 0.5 beta 0.5": [*ONPOLICY, "--onpolicy-ratio", "0.5", "--jsd-beta", "0.5"],
    "onpolicy ratio 1 beta 0.5": [*ONPOLICY, "--onpolicy-ratio", "1", "--jsd-beta", "0.5"],
    "onpolicy ratio 1 greedy": [*ONPOLICY, "--onpolicy-ratio", "1", "--jsd-beta", "0.5",
                                "--sample-temperature", "0"],
}


def run_mode(mode, data_bin, teacher, device, updates, warmup, max_tokens, student_checkpoint):
    """Time ``updates`` updates of one mode in this process; returns a result dict."""
    import torch
    from fairseq import utils

    torch.manual_seed(0)
    _, cfg, task, model = build(data_bin, device, "--task", "translation_kd", "--teacher-path", teacher,
                                *STUDENT_ARCH, *MODES[mode])
    if student_checkpoint:
        state = torch.load(student_checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
    criterion = task.build_criterion(cfg.criterion)
    model, criterion = model.to(device), criterion.to(device)
    model.train()
    criterion.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    task.load_dataset("train")
    itr = task.get_batch_iterator(dataset=task.dataset("train"), max_tokens=max_tokens, seed=1)
    batches = list(itr.next_epoch_itr(shuffle=False))[: warmup + updates]
    first = next(model.parameters())
    task.teacher.load().place(first.device, first.dtype)  # once per run in fairseq, outside the timing

    def step(number, sample):
        torch.manual_seed(1 + number)  # fairseq's Trainer._set_seed with --seed 1
        sample = utils.move_to_cuda(sample) if device == "cuda" else sample
        loss, sample_size, log = criterion(model, sample)
        (loss / sample_size).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return log

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    else:
        base_mem = current_rss_bytes()
    for number, sample in enumerate(batches[:warmup]):
        step(number, sample)
    sync()
    logs = []
    start = time.perf_counter()
    for number, sample in enumerate(batches[warmup:], start=warmup):
        logs.append(step(number, sample))
    sync()
    elapsed = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_mem
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_mem
    n = len(logs)
    return {"mode": mode, "sec_per_update": elapsed / n, "peak_bytes": max(peak, 0),
            "gen_sec_per_update": sum(log.get("gen_seconds", 0) for log in logs) / n,
            "onpolicy_share": sum(log.get("onpolicy_share", 0) for log in logs) / n,
            "trained_tokens_per_update": sum(log["ntokens"] for log in logs) / n,
            "gold_tokens_per_update": sum(b["ntokens"] for b in batches[warmup:]) / n}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_arguments(ap, MODES)
    ap.add_argument("--student-checkpoint", help="trained student weights (transformer_student_small)")
    args = ap.parse_args()
    work = Path(args.workdir)
    data_bin, teacher = work / "bin", work / "teacher.pt"

    if args._child:  # one mode, in a fresh process
        res = run_mode(args._child, data_bin, teacher, args.device, args.updates, args.warmup,
                       args.max_tokens, args.student_checkpoint)
        print("RESULT " + json.dumps(res))
        return

    import torch

    work.mkdir(parents=True, exist_ok=True)
    prepare_data(work, args.train_lines, args.vocab)
    n_teacher = make_teacher(data_bin, teacher)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"teacher transformer_iwslt_de_en ({n_teacher:,} params), student transformer_student_small "
          f"({'weights ' + args.student_checkpoint if args.student_checkpoint else 'random weights'}), "
          f"vocab {args.vocab}, max-tokens {args.max_tokens}, {args.updates} timed updates after "
          f"{args.warmup} warm-up")
    results = []
    for mode in [m for m in args.modes.split(",") if m]:
        cmd = [sys.executable, __file__, "--_child", mode, "--device", args.device, "--updates",
               str(args.updates), "--warmup", str(args.warmup), "--max-tokens", str(args.max_tokens),
               "--workdir", str(work)]
        if args.student_checkpoint:
            cmd += ["--student-checkpoint", args.student_checkpoint]
        results.append(run_child(cmd, mode))
    base = results[0]
    print(f"\n{'mode':<30}{'s/update':>10}{'gen s':>8}{'on-pol':>8}{'tokens':>8}{'peak MiB':>10}"
          f"{'time x':>8}{'mem x':>8}")
    for r in results:
        print(f"{r['mode']:<30}{r['sec_per_update']:>10.3f}{r['gen_sec_per_update']:>8.3f}"
              f"{r['onpolicy_share']:>8.2f}{r['trained_tokens_per_update']:>8.0f}"
              f"{r['peak_bytes'] / 2**20:>10.1f}{r['sec_per_update'] / base['sec_per_update']:>8.2f}"
              f"{r['peak_bytes'] / max(base['peak_bytes'], 1):>8.2f}")
    print(f"(ratios relative to {base['mode']}; tokens: target tokens trained on per update, "
          f"{base['gold_tokens_per_update']:.0f} gold)")


if __name__ == "__main__":
    main()
