"""Plot validation scores against updates from fairseq-train logs and print how each run converged.

Reads logs of ``fairseq-train --log-format simple`` (a log several resumed runs
appended to is read as one run, the last line of each update kept), writes one
PNG with a curve per log, and prints a Markdown table: each run's best
validation score, its update, the last validation and the hours spent in
training updates (fairseq's ``train_wall``; see :mod:`fairseq_kd.curves`), and with
``--baseline NAME`` how soon each run came within ``--within`` of that run's best.
A run may be given by its training record instead (a shipped student's
``training.json``, :func:`fairseq_kd.curves.training_record`).
"""
from fairseq_kd.curves import HIGHER_IS_BETTER, best_point, read_curve, summary_table
from fairseq_kd.errors import require
from fairseq_kd.plots import plot_curves

USES_FAIRSEQ = False  # fairseq-kd does not import fairseq for this command (fairseq_kd.cli)


def add_arguments(p):
    p.add_argument("--log", action="append", required=True, metavar="NAME=LOGFILE",
                   help="a run's name and its fairseq-train log, or its training record (a .json file: a shipped "
                        "student's training.json); repeat for each run, plotted in this order")
    p.add_argument("--out", required=True, help="PNG to write (its folder is created if missing)")
    p.add_argument("--metric", default="bleu",
                   help="validation statistic to plot (bleu with --eval-bleu, or loss, nll_loss, ...); "
                        f"higher is better for {', '.join(sorted(HIGHER_IS_BETTER))}, lower for any other")
    p.add_argument("--subset", default="valid", help="the validation subset whose lines are read")
    p.add_argument("--title", default=None)
    p.add_argument("--baseline", default=None, metavar="NAME",
                   help="a run's name: the table adds each run's first update within --within of this "
                        "run's best score, and that over the baseline's own (how much sooner a method "
                        "gets to the baseline's converged quality)")
    p.add_argument("--within", type=float, default=1.0,
                   help="with --baseline: how far below its best score (above, for a loss) the target is "
                        "(default 1.0: a run's best is the maximum of noisy validations)")


def named_logs(specs):
    """[(name, path)] from NAME=LOGFILE arguments, names unique."""
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        require(sep and name and path, f"--log {spec}: expected NAME=LOGFILE")
        pairs.append((name, path))
    names = [name for name, _ in pairs]
    require(len(set(names)) == len(names), f"--log: a name given twice ({', '.join(names)})")
    return pairs


def run(args):
    curves = [read_curve(path, name, args.subset) for name, path in named_logs(args.log)]
    label = f"{args.subset} {'BLEU' if args.metric == 'bleu' else args.metric}"
    # checks every log has the metric before plotting
    table = summary_table(curves, args.metric, args.baseline, args.within)
    plot_curves({c.name: c.points(args.metric) for c in curves}, args.out,
                best={c.name: best_point(c, args.metric) for c in curves}, ylabel=label, title=args.title)
    print(table, end="")
