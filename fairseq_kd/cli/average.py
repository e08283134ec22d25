"""Average the weights of several checkpoints of one training run into one checkpoint.

The mean of the last N checkpoints is the usual NMT remedy for the noise of
a single one.  Save them while training with --save-interval-updates U
--keep-interval-updates N (or epoch checkpoints), then:

  fairseq-kd average --dir student --last 5 --out student/checkpoint_avg5.pt
  fairseq-kd average --inputs a.pt b.pt --out avg.pt

The result is the newest input with the mean weights and no optimizer
state: fairseq-generate, fairseq-kd export and evaluate read it as they
read the inputs.
"""
import os

from fairseq_kd.errors import require


def add_arguments(p):
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--inputs", nargs="+", help="checkpoints of one model, oldest first")
    which.add_argument("--dir", help="a fairseq --save-dir: average its --last N checkpoints")
    p.add_argument("--last", type=int, default=5,
                   help="--dir: how many of the newest checkpoints (interval checkpoints "
                        "checkpoint_EPOCH_UPDATES.pt if any, else epoch checkpoints); default 5")
    p.add_argument("--out", required=True, help="averaged checkpoint to write")


def run(args):
    from fairseq_kd.averaging import average_checkpoints, last_checkpoints, save_checkpoint

    paths = args.inputs or last_checkpoints(args.dir, args.last)
    out = os.path.abspath(args.out)
    require(out not in map(os.path.abspath, paths), f"--out must not be one of the inputs: {args.out}")
    state, updates = average_checkpoints(paths)
    save_checkpoint(state, args.out)
    print(f"wrote {args.out}: the mean of {len(paths)} checkpoints "
          f"({', '.join(os.path.basename(p) for p in paths)}; updates {', '.join(map(str, updates))})")
