"""Training-step cost of a2d relative to word_kd, measured side by side.

Builds a random teacher checkpoint and a student in process (no training
needed: the cost of a step does not depend on the weights), then times
forward + backward of the criterion on the same batches, alternating the
criterions so that load on the machine affects both alike.  Prints the
median step time of each configuration and its ratio to word_kd.

    python benchmarks/a2d_overhead.py DATA_BIN [--teacher 6x4x64] [--student 3x4x32]

DATA_BIN: the bin/ folder of tests.helpers.prepare_tiny_data (or any data
binarized with a joined dictionary: the models share all embeddings).
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fairseq_kd.inprocess import build_training, save_random_checkpoint, transformer_args  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data_bin")
    ap.add_argument("--teacher", default="6x4x64", help="layers x heads x dim")
    ap.add_argument("--student", default="3x4x32", help="layers x heads x dim")
    ap.add_argument("--max-tokens", type=int, default=2000)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_l, t_h, t_d = map(int, args.teacher.split("x"))
    s_l, s_h, s_d = map(int, args.student.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher.pt"
        save_random_checkpoint(args.data_bin, teacher, t_l, t_h, dim=t_d)
        configs = {
            "word_kd": ["--criterion", "word_kd"],
            "a2d cross": ["--criterion", "a2d", "--attn-types", "cross"],
            "a2d enc,dec,cross": ["--criterion", "a2d"],
            "a2d beta=0": ["--criterion", "a2d", "--a2d-beta", "0"],
        }
        built = {}
        for name, crit_args in configs.items():
            torch.manual_seed(0)
            _, task, model, crit = build_training(
                args.data_bin, "--task", "translation_kd", "--teacher-path", teacher,
                *transformer_args(s_l, s_h, s_d), *crit_args)
            task.load_dataset("train")
            itr = task.get_batch_iterator(dataset=task.dataset("train"),
                                          max_tokens=args.max_tokens, seed=1)
            batches = list(itr.next_epoch_itr(shuffle=False))[: args.batches]
            built[name] = (model.train(), crit.train(), batches)
        times = {name: [] for name in configs}
        for _ in range(args.repeats):
            for name, (model, crit, batches) in built.items():
                start = time.perf_counter()
                for sample in batches:
                    loss, _, _ = crit(model, sample)
                    loss.backward()
                times[name].append((time.perf_counter() - start) / len(batches))
        base = statistics.median(times["word_kd"])
        print(f"teacher {args.teacher}, student {args.student}, {args.batches} batches of "
              f"<= {args.max_tokens} tokens, 1 thread, median of {args.repeats}")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"{name:20s} {med * 1000:8.1f} ms/step  x{med / base:.2f} vs word_kd")


if __name__ == "__main__":
    main()
