"""`make demo` (examples/quickstart.sh) end to end on a small slice, with the shipped teacher.

Slow (11 minutes on 2 cores beside two training jobs): the students train for seconds, so only the
plumbing is checked here (every step runs, every system is scored, the table
prints, a second run reuses the finished work), not that KD helps: the
README's table is a real run of the full demo.
"""
import json
import os
import subprocess

import pytest
import torch

from helpers import BIN, REPO, env

pytestmark = pytest.mark.slow


def quickstart(work, **settings):
    e = env()
    e["PATH"] = f"{BIN}{os.pathsep}{e['PATH']}"
    e.update(WORK=str(work), TRAIN_LINES="300", TEST_LINES="30", STUDENT_MINUTES="0.1", **settings)
    proc = subprocess.run(["bash", REPO / "examples" / "quickstart.sh"], capture_output=True, text=True,
                          env=e, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_quickstart_with_the_shipped_teacher(tmp_path):
    out = quickstart(tmp_path)
    assert "=== 2. teacher: " + str(REPO / "examples" / "teacher" / "teacher.pt") in out
    results = json.loads((tmp_path / "results.json").read_text())
    systems = {s["name"]: s for s in results["systems"]}
    assert list(systems) == ["teacher", "baseline", "seq_kd", "word_kd"]
    assert all(s["sentences"] == 30 for s in systems.values())
    # seconds of training leave the students far below the converged teacher
    assert all(systems["teacher"]["beam"]["bleu"] > s["beam"]["bleu"] + 10
               for name, s in systems.items() if name != "teacher")
    # the Seq-KD corpus holds the teacher's translation of every training source; word_kd read the cache
    assert sum(1 for _ in open(tmp_path / "distilled" / "train.en")) == 300
    task = torch.load(tmp_path / "student_word_kd" / "checkpoint_last.pt", weights_only=False)["cfg"]["task"]
    assert task["teacher_cache"] == "teacher_cache" and not task["teacher_path"]
    table = out[out.index("| system |"):]
    for name in systems:
        assert f"| {name} |" in table
    # a second run skips every finished step and prints the same table
    again = quickstart(tmp_path)
    assert again[again.index("| system |"):] == table


def test_quickstart_refuses_an_unknown_method(tmp_path):
    e = env()
    e.update(WORK=str(tmp_path), METHODS="seq_kd ckd")
    proc = subprocess.run(["bash", REPO / "examples" / "quickstart.sh"], capture_output=True, text=True, env=e)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "quickstart: METHODS may hold seq_kd and word_kd, not 'ckd'"
