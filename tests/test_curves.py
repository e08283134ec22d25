"""fairseq_kd.curves: validation curves read from fairseq-train logs (a resumed run's log
appended to, the last line of each update kept), checked against a real run's epoch
checkpoints, and how each run converged."""
import datetime
import json

import pytest
import torch

import helpers
from fairseq_kd.curves import (best_point, convergence, read_curve, read_log, read_record, summary_table,
                               training_record, wall_clock_hours)
from fairseq_kd.errors import KDError

STAMP = "2026-12-01 10:00:00 | INFO"


def valid_line(epoch, updates, bleu, loss, subset="valid"):
    """A validation line as fairseq-train --log-format simple writes it."""
    return (f"{STAMP} | valid | epoch {epoch:03d} | valid on '{subset}' subset | loss {loss} | nll_loss {loss - 0.2} "
            f"| ppl 59.4 | bleu {bleu} | wps 900.1 | wpb 1070 | bsz 18.7 | num_updates {updates} | best_bleu {bleu}")


def train_line(epoch, updates, train_wall, wall):
    return (f"{STAMP} | train | epoch {epoch:03d} | loss 6.4 | nll_loss 6.2 | ppl 73.5 | wps 5000 | ups 4.1 | "
            f"wpb 1222.7 | bsz 20 | num_updates {updates} | lr 0.001 | gnorm 0.3 | train_wall {train_wall} | wall {wall}")


def inner_line(epoch, updates):
    return (f"{STAMP} | train_inner | epoch {epoch:03d}:     50 / 267 loss=6.5, nll_loss=6.3, ppl=78.8, "
            f"wps=5000, ups=4, wpb=1200, bsz=20, num_updates={updates}, lr=0.001, gnorm=0.3, train_wall=12, wall=50")


# Run 1: epochs 1-3, killed during epoch 4.  Run 2 resumed from epoch 2's checkpoint: epoch 3
# again (other values at the same update), then 4 and 5.  (epoch, updates, bleu, loss, train_wall)
RUN_1 = [(1, 267, 5.0, 7.1, 100), (2, 534, 9.5, 6.5, 110), (3, 801, 11.25, 6.2, 120)]
RUN_2 = [(3, 801, 11.0, 6.3, 130), (4, 1068, 12.5, 6.0, 140), (5, 1335, 12.5, 6.05, 150)]


def epochs_lines(epochs, wall_start=0):
    lines, wall = [], wall_start
    for epoch, updates, bleu, loss, train_wall in epochs:
        wall += train_wall + 30
        lines += [inner_line(epoch, updates - 10), valid_line(epoch, updates, bleu, loss),
                  valid_line(epoch, updates, 99.0, 1.0, subset="test"),  # another subset: not the curve
                  f"{STAMP} | fairseq.checkpoint_utils | Saved checkpoint checkpoint{epoch}.pt "
                  f"(epoch {epoch} @ {updates} updates, score {bleu})",
                  train_line(epoch, updates, train_wall, wall)]
    return lines


@pytest.fixture
def resumed_log(tmp_path):
    lines = [f"{STAMP} | fairseq_cli.train | {{'_name': None}}", *epochs_lines(RUN_1),
             inner_line(4, 850), inner_line(4, 900),  # killed here
             f"{STAMP} | fairseq.trainer | Loaded checkpoint checkpoint2.pt (epoch 3 @ 534 updates)",
             *epochs_lines(RUN_2),
             f"{STAMP} | fairseq_cli.train | early stop since valid performance hasn't improved for last 1 runs"]
    path = tmp_path / "student_baseline.log"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_resumed_log_keeps_the_last_validation_of_each_update(resumed_log):
    curve = read_log(resumed_log, "baseline")
    assert curve.points("bleu") == [(267, 5.0), (534, 9.5), (801, 11.0), (1068, 12.5), (1335, 12.5)]
    assert curve.points("loss") == [(267, 7.1), (534, 6.5), (801, 6.3), (1068, 6.0), (1335, 6.05)]
    assert [curve.validations[u]["epoch"] for u in sorted(curve.validations)] == [1, 2, 3, 4, 5]
    assert {e: s["train_wall"] for e, s in curve.epochs.items()} == {1: 100, 2: 110, 3: 130, 4: 140, 5: 150}
    assert read_log(resumed_log, "baseline", subset="test").points("bleu")[0] == (267, 99.0)


def test_convergence_of_a_resumed_run(resumed_log):
    c = convergence(read_log(resumed_log, "baseline"))
    # the first update to reach the best BLEU: fairseq replaces checkpoint_best only when beaten
    assert (c.best, c.best_update, c.best_epoch) == (12.5, 1068, 4)
    assert (c.last_update, c.last_epoch, c.validations_after_best) == (1335, 5, 1)
    assert c.train_hours == pytest.approx((100 + 110 + 130 + 140 + 150) / 3600)  # epoch 3 counted once
    lowest = convergence(read_log(resumed_log, "baseline"), "loss")  # a loss: the lowest is best
    assert (lowest.best, lowest.best_update) == (6.0, 1068)
    table = summary_table([read_log(resumed_log, "baseline")]).splitlines()
    assert table[2] == f"| baseline | 12.50 | 1068 (4) | 1335 (5) | 1 | {630 / 3600:.2f} |"
    twice = summary_table([read_log(resumed_log, "baseline"), read_log(resumed_log, "again")]).splitlines()
    assert twice[-2] == f"In all: {2 * 630 / 3600:.2f} training h over 2 runs."
    assert twice[-1].startswith("Wall clock: 0.00 h in which at least one of the 2 runs with a log was running "
                                "(2026-12-01 10:00 to 2026-12-01 10:00")  # every test line has one STAMP


def write_run(tmp_path, name, epochs):
    """A log of one uninterrupted run; epochs as RUN_1's (epoch, updates, bleu, loss, train_wall)."""
    path = tmp_path / f"student_{name}.log"
    path.write_text("\n".join(epochs_lines(epochs)) + "\n")
    return read_log(path, name)


def test_how_soon_each_run_gets_within_reach_of_the_baseline(resumed_log, tmp_path):
    baseline = read_log(resumed_log, "baseline")  # BLEU 5.0, 9.5, 11.0, 12.5, 12.5 at 267 ... 1335
    fast = write_run(tmp_path, "fast", [(1, 267, 8.0, 6.8, 90), (2, 534, 11.6, 6.1, 90), (3, 801, 12.0, 6.0, 90)])
    slow = write_run(tmp_path, "slow", [(1, 267, 3.0, 7.5, 90), (2, 534, 11.4, 6.4, 90)])
    rows = summary_table([baseline, fast, slow], baseline="baseline").splitlines()
    # target 12.5 - 1 = 11.5: the baseline first reaches it at 1068 (11.0 at 801 does not)
    assert rows[0].endswith("| first update at 11.50 (x baseline's) |")
    assert rows[2].endswith("| 1068 (1.00) |")
    assert rows[3].endswith(f"| 534 ({534 / 1068:.2f}) |")
    assert rows[4].endswith("| never |")  # 11.4 falls short
    assert any("within 1 of baseline's best BLEU" in row and "(1068)" in row for row in rows)
    # a loss: lower is better, the target lies above the best (6.0 + 0.25)
    rows = summary_table([baseline, fast], "loss", baseline="baseline", within=0.25).splitlines()
    assert rows[0].endswith("| first update at 6.25 (x baseline's) |")
    assert rows[2].endswith("| 1068 (1.00) |") and rows[3].endswith(f"| 534 ({534 / 1068:.2f}) |")
    # without a baseline the table keeps its six columns
    assert summary_table([baseline, fast]).splitlines()[0].count("|") == 7
    with pytest.raises(KDError, match=r"--baseline teacher: not one of the runs \(baseline, fast\)"):
        summary_table([baseline, fast], baseline="teacher")


def test_logs_without_the_metric_or_validations_are_one_line_errors(tmp_path):
    log = tmp_path / "loss_only.log"
    log.write_text(valid_line(1, 10, 1.0, 6.0).replace(" | bleu 1.0", "") + "\n" + train_line(1, 10, 5, 6) + "\n")
    with pytest.raises(KDError, match=r"loss_only: validations without 'bleu' \(at updates 10\); .*--eval-bleu"):
        convergence(read_log(log, "loss_only"))
    log.write_text(inner_line(1, 10) + "\n")
    with pytest.raises(KDError, match="no validation on the 'valid' subset"):
        read_log(log, "x")
    with pytest.raises(KDError, match="training log not found"):
        read_log(tmp_path / "missing.log", "x")


def test_a_training_record_converges_as_its_log(resumed_log, tmp_path):
    """training.json (a shipped student's curve) read back gives the log's validations,
    convergence and table row; fairseq-kd curves takes it in place of the log."""
    log = read_log(resumed_log, "baseline")
    record = training_record(log, "bleu", "checkpoint_avg5.pt", "its fairseq-train log")
    assert record["validations"] == [{"epoch": 1, "num_updates": 267, "bleu": 5.0},
                                      {"epoch": 2, "num_updates": 534, "bleu": 9.5},
                                      {"epoch": 3, "num_updates": 801, "bleu": 11.0},
                                      {"epoch": 4, "num_updates": 1068, "bleu": 12.5},
                                      {"epoch": 5, "num_updates": 1335, "bleu": 12.5}]
    assert record["train_hours"] == round(630 / 3600, 4) and record["checkpoint"] == "checkpoint_avg5.pt"
    path = tmp_path / "training.json"
    path.write_text(json.dumps(record))
    curve = read_curve(str(path), "adopted")
    assert curve.name == "adopted" and read_record(str(path)).name == "baseline"
    assert curve.points("bleu") == log.points("bleu")
    c = convergence(curve)
    assert (c.best, c.best_update, c.best_epoch, c.last_update, c.last_epoch, c.validations_after_best) == (
        12.5, 1068, 4, 1335, 5, 1)
    assert c.train_hours == pytest.approx(630 / 3600, abs=1e-4)
    rows = summary_table([log, read_curve(str(path), "baseline")]).splitlines()
    assert rows[2] == rows[3]
    out = tmp_path / "curves.png"
    proc = helpers.run([helpers.tool("fairseq-kd"), "curves", "--log", f"logged={resumed_log}", "--log",
                        f"recorded={path}", "--out", str(out), "--baseline", "recorded"])
    assert out.stat().st_size > 0
    assert "| recorded | 12.50 | 1068 (4) | 1335 (5) | 1 | 0.17 | 1068 (1.00) |" in proc.stdout


def stamped_run(tmp_path, name, first, last):
    """A run's log whose lines are stamped from ``first`` to ``last`` ("HH:MM" on 2026-12-01)."""
    lines = [valid_line(1, 100, 5.0, 7.0).replace(STAMP, f"2026-12-01 {first}:00 | INFO"),
             train_line(1, 100, 60, 70).replace(STAMP, f"2026-12-01 {last}:00 | INFO")]
    path = tmp_path / f"student_{name}.log"
    path.write_text("\n".join(lines) + "\n")
    return read_log(path, name)


def test_the_wall_clock_counts_runs_side_by_side_once(resumed_log, tmp_path):
    """The wall clock is the union of the logs' spans: against minutes counted one by one."""
    spans = {"a": ("10:00", "12:00"), "b": ("11:00", "13:30"), "inside_a": ("10:30", "11:00"), "later": ("15:00", "15:30")}
    runs = [stamped_run(tmp_path, name, *span) for name, span in spans.items()]
    minute = lambda hhmm: int(hhmm[:2]) * 60 + int(hhmm[3:])
    busy = set().union(*(range(minute(a), minute(b)) for a, b in spans.values()))
    assert wall_clock_hours(runs) == pytest.approx(len(busy) / 60) == pytest.approx(4.0)
    assert runs[0].span == (datetime.datetime(2026, 12, 1, 10), datetime.datetime(2026, 12, 1, 12))
    record = tmp_path / "training.json"
    record.write_text(json.dumps(training_record(read_log(resumed_log, "x"), "bleu", "checkpoint_best.pt", "t")))
    table = summary_table([*runs, read_curve(str(record), "adopted")]).splitlines()
    assert table[-1] == ("Wall clock: 4.00 h in which at least one of the 4 runs with a log was running "
                         "(2026-12-01 10:00 to 2026-12-01 15:30 on the machine's clock; each log's first to last "
                         "line, runs side by side counted once, a run's pauses in it); adopted: a training record, "
                         "no clock, not in it.")
    assert summary_table([read_curve(str(record), "adopted")]).splitlines()[-1].startswith("In all:")


def test_a_broken_training_record_is_a_one_line_error(tmp_path):
    path = tmp_path / "training.json"
    path.write_text(json.dumps({"metric": "bleu", "validations": [{"epoch": 1, "bleu": 3.0}], "train_hours": 1}))
    with pytest.raises(KDError, match=r"training.json: not a training record \(KeyError: 'num_updates'\)"):
        read_record(str(path))
    path.write_text(json.dumps({"metric": "bleu", "validations": [], "train_hours": 1}))
    with pytest.raises(KDError, match="a training record without validations"):
        read_record(str(path))
    with pytest.raises(KDError, match="training record not found"):
        read_curve(str(tmp_path / "missing.json"), "x")


# ------------------------------------------------------------- a real fairseq-train log
TINY_STUDENT = [
    "--arch", "transformer", "--share-all-embeddings", "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
    "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]


@pytest.fixture(scope="module")
def bleu_run(tiny_data, tmp_path_factory):
    """Four epochs validated by greedy BLEU, every epoch's checkpoint kept: (log, checkpoint folder).

    BLEU is of the SentencePiece pieces (no --eval-bleu-remove-bpe): this untrained
    model's first outputs are strings of "▁", empty once decoded, and fairseq logs no
    BLEU for empty hypotheses (its validation then fails on the missing metric).
    """
    save = tmp_path_factory.mktemp("bleu_run")
    proc = helpers.fairseq_train(
        tiny_data / "bin", save, *TINY_STUDENT, "--task", "translation", "--criterion",
        "label_smoothed_cross_entropy", "--lr", "0.01", "--log-interval", "10", "--max-epoch", "4",
        "--eval-bleu", "--eval-bleu-args", '{"beam": 1, "max_len_a": 1.2, "max_len_b": 10}',
        "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric")
    log = save / "train.log"
    log.write_text(proc.stdout + proc.stderr)
    return log, save


def checkpoint_state(path):
    state = torch.load(path, map_location="cpu", weights_only=False)  # the test's own files
    return state["optimizer_history"][-1]["num_updates"], state["extra_state"]


def test_real_log_matches_the_epoch_checkpoints(bleu_run):
    """Each epoch checkpoint records its update and validation BLEU (fairseq's val_loss is the
    --best-checkpoint-metric); checkpoint_best.pt is the update the summary calls best."""
    log, save = bleu_run
    curve = read_log(log, "tiny")
    expected = []
    for epoch in range(1, 5):
        updates, extra = checkpoint_state(save / f"checkpoint{epoch}.pt")
        expected.append((updates, extra["val_loss"]))
        assert curve.validations[updates]["epoch"] == epoch
    assert [u for u, _ in curve.points("bleu")] == [u for u, _ in expected]
    for (_, logged), (_, stored) in zip(curve.points("bleu"), expected):
        assert logged == pytest.approx(stored, abs=0.005 + 1e-9)  # the log rounds to 2 decimals
    c = convergence(curve)
    best_updates, best_extra = checkpoint_state(save / "checkpoint_best.pt")
    assert (c.best_update, c.best) == (best_updates, pytest.approx(best_extra["best"], abs=0.005 + 1e-9))
    assert best_point(curve, "bleu") == (c.best_update, c.best)
    last_updates, last_extra = checkpoint_state(save / "checkpoint_last.pt")
    assert c.last_update == last_updates and c.last_epoch == 4
    assert c.validations_after_best == sum(u > best_updates for u, _ in expected)
    # train_wall leaves out validation, which fairseq's cumulative training time includes
    # (train_wall is logged in whole seconds per epoch)
    assert 0 < c.train_hours * 3600 <= last_extra["previous_training_time"] + 0.5 * len(curve.epochs)
