"""Learning curves from fairseq-train logs: validation scores by update, and when training converged.

With ``--log-format simple`` fairseq logs one line per validation::

    ... | valid | epoch 003 | valid on 'valid' subset | loss 6.1 | ... | bleu 12.34 | ... | num_updates 801 | best_bleu 12.34

and one summary line per training epoch::

    ... | train | epoch 003 | loss 6.4 | ... | num_updates 801 | lr ... | train_wall 95 | wall 130

A run resumed from its checkpoint appends to the same log (the recipes' ``>>``) and
repeats whatever came after that checkpoint, so the line read last wins: for each
validation's ``num_updates`` and for each training epoch.  ``fairseq-kd curves``
plots the curves (:func:`fairseq_kd.plots.plot_curves`) and prints
:func:`summary_table`.  Neither fairseq nor torch is imported here.

A shipped student carries its curve as a *training record* (``training.json``,
:func:`training_record`): the validations and the hours in training updates, what
:func:`convergence` needs, so a study can compare a run whose work folder (and log)
is gone with the runs it trains (:func:`read_curve` reads either).
"""
import dataclasses
import datetime
import json
import os
import re

from fairseq_kd.atomic_io import write_atomic
from fairseq_kd.errors import KDError, require

VALID_LINE = re.compile(r"\| epoch (?P<epoch>\d+) \| valid on '(?P<subset>[^']*)' subset \|(?P<stats>.*)$")
# the epoch summary (not train_inner's "epoch 003:  50 / 267 loss=..." progress lines)
TRAIN_EPOCH_LINE = re.compile(r"\| train \| epoch (?P<epoch>\d+) \|(?P<stats>.*)$")
# fairseq's logging format: every line it logs starts with the machine's local time
LINE_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \|")
# Metrics for which higher is better (fairseq's --maximize-best-checkpoint-metric); any other is a loss.
HIGHER_IS_BETTER = frozenset({"bleu"})


@dataclasses.dataclass
class Curve:
    """One training run's log, read: ``validations`` maps num_updates to that validation's
    stats (with its "epoch"), ``epochs`` maps an epoch to its training summary's stats."""
    name: str
    validations: dict
    epochs: dict
    # hours in training updates when no epoch summaries are kept (a training record)
    train_hours: float = None
    # (first, last) datetime the log stamped; None for a training record, which keeps no clock
    span: tuple = None

    def points(self, metric):
        """(update, value) of every validation, by update."""
        return [(update, stats[metric]) for update, stats in sorted(self.validations.items())]


def line_stats(text):
    """The numeric ``key value`` fields of a log line's " | "-separated stats."""
    stats = {}
    for field in text.split("|"):
        key, _, value = field.strip().partition(" ")
        try:
            stats[key] = float(value)
        except ValueError:
            continue  # not a number (fairseq writes none today; a later version might)
    return stats


def read_log(path, name, subset="valid"):
    """The :class:`Curve` of the fairseq-train log ``path``: the validations of ``subset``
    and the epoch summaries, the last line of each update or epoch kept (resumed runs)."""
    require(os.path.isfile(path), f"training log not found: {path}")
    validations, epochs, stamps = {}, {}, []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stamp = LINE_STAMP.match(line)
            if stamp:
                stamps.append(stamp[1])
            valid, train = VALID_LINE.search(line), TRAIN_EPOCH_LINE.search(line)
            if valid and valid["subset"] == subset:
                stats = line_stats(valid["stats"])
                require("num_updates" in stats, f"{path}: a validation line without num_updates: {line.strip()}")
                validations[int(stats["num_updates"])] = {**stats, "epoch": int(valid["epoch"])}
            elif train:
                epochs[int(train["epoch"])] = line_stats(train["stats"])
    require(validations, f"{path}: no validation on the '{subset}' subset (not a fairseq-train log "
                         f"with --log-format simple?)")
    span = (parse_stamp(min(stamps)), parse_stamp(max(stamps))) if stamps else None
    return Curve(name, validations, epochs, span=span)


def parse_stamp(text):
    """The datetime of a log line's ``YYYY-MM-DD HH:MM:SS`` stamp (fixed width: the
    earliest and latest stamps are also the smallest and largest strings)."""
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S")


def wall_clock_hours(curves):
    """Hours on the machine's clock in which at least one of ``curves`` was running: the
    union of their logs' spans (first to last stamped line), so runs that shared the
    machine count once and a run's own pauses count.  Curves without a span (training
    records) are left out."""
    spans = sorted(c.span for c in curves if c.span is not None)
    total, end = datetime.timedelta(0), None
    for first, last in spans:
        if end is None or first > end:
            total += last - first
            end = last
        elif last > end:
            total += last - end
            end = last
    return total.total_seconds() / 3600


@dataclasses.dataclass
class Convergence:
    """How one run converged (see :func:`convergence`)."""
    name: str
    best: float
    best_update: int
    best_epoch: int
    last_update: int
    last_epoch: int
    validations_after_best: int
    train_hours: float


def metric_sign(metric):
    """1 for a metric where higher is better (HIGHER_IS_BETTER), -1 for a loss: ``sign * value``
    is then larger for the better of two values."""
    return 1 if metric in HIGHER_IS_BETTER else -1


def best_point(curve, metric):
    """(update, value) of the best validation: the first to reach the best value, as
    fairseq's checkpoint_best.pt is replaced only by a strictly better one."""
    points = curve.points(metric)
    sign = metric_sign(metric)
    best = max(sign * value for _, value in points)
    return next((update, value) for update, value in points if sign * value == best)


def convergence(curve, metric="bleu"):
    """The best validation, where training stopped and its time in training updates.

    ``train_hours`` sums fairseq's per-epoch ``train_wall``: the time spent in
    training updates (forward, backward, optimizer step); validation (with
    --eval-bleu, a greedy translation of the valid set), checkpoint saving and time
    lost to an interrupted epoch are not in it.  fairseq's cumulative
    ``previous_training_time`` of a checkpoint includes those, and a resumed run's
    ``wall`` restarts from zero, so neither says how much training a method needed.
    """
    missing = [u for u, stats in curve.validations.items() if metric not in stats]
    require(not missing, f"{curve.name}: validations without '{metric}' (at updates "
                         f"{', '.join(map(str, sorted(missing)[:3]))}); is it logged (--eval-bleu)?")
    best_update, best = best_point(curve, metric)
    last_update = max(curve.validations)
    return Convergence(
        name=curve.name, best=best, best_update=best_update,
        best_epoch=curve.validations[best_update]["epoch"], last_update=last_update,
        last_epoch=curve.validations[last_update]["epoch"],
        validations_after_best=sum(u > best_update for u in curve.validations),
        train_hours=training_hours(curve))


def training_hours(curve):
    """Hours in training updates: the record's own, else the epochs' ``train_wall`` summed."""
    if curve.train_hours is not None:
        return curve.train_hours
    no_wall = sorted(e for e, stats in curve.epochs.items() if "train_wall" not in stats)
    require(curve.epochs and not no_wall, f"{curve.name}: epoch summaries without train_wall "
                                         f"({'epochs ' + ', '.join(map(str, no_wall)) if no_wall else 'none logged'})")
    return sum(stats["train_wall"] for stats in curve.epochs.values()) / 3600


RECORD_VERSION = 1
# what a record written from a fairseq-train log says it was made from
LOG_SOURCE = "its fairseq-train log: every validation, and train_wall summed over the epochs"


def training_record(curve, metric, checkpoint, source):
    """A run's curve as a JSON-ready dict (a shipped student's ``training.json``): every
    validation's epoch, update and ``metric``, the hours in training updates
    (:func:`training_hours`), the checkpoint kind shipped (``checkpoint_avg5.pt``) and, in
    words, what the record was made from."""
    points = dict(curve.points(metric))
    return {"version": RECORD_VERSION, "name": curve.name, "metric": metric, "checkpoint": checkpoint,
            "train_hours": round(training_hours(curve), 4), "source": source,
            "validations": [{"epoch": curve.validations[u]["epoch"], "num_updates": u, metric: points[u]}
                            for u in sorted(points)]}


def logged_metric(curve):
    """The metric a run was validated on: BLEU when every validation logged it, else the loss."""
    return "bleu" if all("bleu" in v for v in curve.validations.values()) else "loss"


def write_record(path, curve, checkpoint, source):
    """``path``: the training record of ``curve`` on its :func:`logged_metric`, written whole."""
    write_atomic(path, record_text(training_record(curve, logged_metric(curve), checkpoint, source)))
    return path


def record_text(record):
    """A training record as JSON text: one line per field, one per validation (diffs stay readable)."""
    fields = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items() if k != "validations"]
    rows = ",\n".join(f"    {json.dumps(r)}" for r in record["validations"])
    return "{\n" + ",\n".join(fields) + ',\n  "validations": [\n' + rows + "\n  ]\n}\n"


def read_record(path, name=None):
    """The :class:`Curve` of a training record (:func:`training_record`), named ``name``
    (default: the record's own name)."""
    require(os.path.isfile(path), f"training record not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        metric, rows = record["metric"], record["validations"]
        validations = {int(r["num_updates"]): {metric: float(r[metric]), "epoch": int(r["epoch"])} for r in rows}
        hours = float(record["train_hours"])
    except (ValueError, KeyError, TypeError) as e:
        raise KDError(f"{path}: not a training record ({type(e).__name__}: {e})") from None
    require(validations, f"{path}: a training record without validations")
    return Curve(name or record.get("name", ""), validations, {}, train_hours=hours)


def read_curve(path, name, subset="valid"):
    """A run's :class:`Curve` from its fairseq-train log, or from its training record
    (a ``.json`` file, :func:`read_record`; it holds its validation subset's scores only)."""
    if path.endswith(".json"):
        return read_record(path, name)
    return read_log(path, name, subset)


def first_reaching(curve, metric, target):
    """The first validation update whose ``metric`` reaches ``target`` (at least it for
    BLEU, at most it for a loss), or None if none does."""
    sign = metric_sign(metric)
    return next((update for update, value in curve.points(metric) if sign * value >= sign * target), None)


def baseline_target(curves, metric, baseline, within):
    """The score every run is timed to: ``baseline``'s best validation ``within`` short of it
    (a threshold, not the best itself: a run's best is the maximum of noisy validations)."""
    named = {c.name: c for c in curves}
    require(baseline in named, f"--baseline {baseline}: not one of the runs ({', '.join(named)})")
    require(within >= 0, f"--within must be 0 or more, got {within}")
    sign = metric_sign(metric)
    return named[baseline], best_point(named[baseline], metric)[1] - sign * within


def summary_table(curves, metric="bleu", baseline=None, within=1.0):
    """Markdown: per run, the best validation ``metric``, its update, where training
    stopped and the hours in training updates (:func:`convergence`).  With ``baseline``
    (one run's name), also the first update at which each run came within ``within`` of
    the baseline's best (:func:`first_reaching`) and that over the baseline's own: how
    much sooner (below 1) a method gets to the baseline's converged quality."""
    label = "BLEU" if metric == "bleu" else metric
    runs = [convergence(curve, metric) for curve in curves]
    header = (f"| system | best valid {label} | at update (epoch) | last validation: update (epoch) | "
              "validations after the best | training h |")
    rule = "|---|---:|---:|---:|---:|---:|"
    if baseline is not None:
        reference, target = baseline_target(curves, metric, baseline, within)
        reference_update = first_reaching(reference, metric, target)
        header += f" first update at {target:.2f} (x {baseline}'s) |"
        rule += "---:|"
    lines = [header, rule]
    for curve, c in zip(curves, runs):
        row = (f"| {c.name} | {c.best:.2f} | {c.best_update} ({c.best_epoch}) | "
               f"{c.last_update} ({c.last_epoch}) | {c.validations_after_best} | {c.train_hours:.2f} |")
        if baseline is not None:
            update = first_reaching(curve, metric, target)
            row += " never |" if update is None else f" {update} ({update / reference_update:.2f}) |"
        lines.append(row)
    lines.append("")
    lines.append("training h: fairseq's `train_wall` summed over the epochs, the time in training updates "
                 "(validation and checkpoint saving excluded; an epoch a resumed run repeated counted once).")
    if baseline is not None:
        lines.append(f"first update at {target:.2f}: the first validation within {within:g} of {baseline}'s "
                     f"best {label}, and in brackets that update over {baseline}'s own ({reference_update}); "
                     "a run that starts from a trained one (a pruned student) counts its own updates.")
    # what a whole study cost, the figure its budget is stated in
    lines.append(f"In all: {sum(c.train_hours for c in runs):.2f} training h over {len(runs)} "
                 f"run{'s' if len(runs) != 1 else ''}.")
    lines += wall_clock_lines(curves)
    return "\n".join(lines) + "\n"


def wall_clock_lines(curves):
    """The summary's wall-clock sentence (:func:`wall_clock_hours`): what the runs with a log
    took together on the machine's clock, which the training hours of runs sharing it overstate."""
    logged = [c for c in curves if c.span is not None]
    if not logged:
        return []
    unlogged = [c.name for c in curves if c.span is None]
    first, last = min(c.span[0] for c in logged), max(c.span[1] for c in logged)
    line = (f"Wall clock: {wall_clock_hours(logged):.2f} h in which at least one of the {len(logged)} "
            f"run{'s' if len(logged) != 1 else ''} with a log was running ({first:%Y-%m-%d %H:%M} to "
            f"{last:%Y-%m-%d %H:%M} on the machine's clock; each log's first to last line, runs side by side "
            "counted once, a run's pauses in it)")
    if unlogged:
        line += f"; {', '.join(unlogged)}: a training record, no clock, not in it"
    return [line + "."]
