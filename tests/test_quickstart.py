"""`make demo` (examples/quickstart.sh) end to end on a small slice, with the shipped teacher.

Slow (11 minutes on 2 cores beside two training jobs): the students train for seconds, so only the
plumbing is checked here (every step runs, every system is scored, the table
prints, a second run reuses the finished work), not that KD helps: the
README's table is a real run of the full demo.  With students shipped in
STUDENTS_DIR (examples/students), the demo scores them too, in a table of their
own, and prints test sentences side by side.
"""
import json
import os
import shutil
import subprocess

import pytest
import torch

from helpers import BIN, REPO, env, ship_tiny_students

pytestmark = pytest.mark.slow


def quickstart(work, full=False, **settings):
    e = env()
    e["PATH"] = f"{BIN}{os.pathsep}{e['PATH']}"
    # the students shipped in this clone (examples/students) only where a test names them
    e.update({"WORK": str(work), "TRAIN_LINES": "300", "TEST_LINES": "30", "STUDENT_MINUTES": "0.1",
              "STUDENTS_DIR": str(work / "no_shipped_students"), **settings})
    proc = subprocess.run(["bash", REPO / "examples" / "quickstart.sh"], capture_output=True, text=True,
                          env=e, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc if full else proc.stdout


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


def test_quickstart_scores_shipped_students_apart_and_shows_sentences_side_by_side(tmp_path):
    from test_shipped_students import check_shipped_student

    # two students of the shipped teacher's vocabulary, shipped by the recipe (trained for seconds)
    study = tmp_path / "study"
    ship_tiny_students(study, "baseline seq_kd")
    shipped = study / "shipped_students"
    for name in ("baseline", "seq_kd"):
        check_shipped_student(shipped / name, tmp_path / f"rescore_{name}", tolerance=0,
                              machine_paths=(str(study), str(REPO), os.path.expanduser("~")))
    # a student of another vocabulary is left out, with a note
    shutil.copytree(shipped / "baseline", shipped / "other")
    with open(shipped / "other" / "dict.txt", "a") as f:
        f.write("extra 1\n")
    demo = tmp_path / "demo"
    proc = quickstart(demo, full=True, METHODS="seq_kd", STUDENTS_DIR=str(shipped))
    out = proc.stdout
    assert f"quickstart: {shipped / 'other'}: its dict.txt is not the teacher's, so it is not scored" in proc.stderr
    results = json.loads((demo / "results.json").read_text())
    systems = {s["name"]: s for s in results["systems"]}
    assert list(systems) == ["teacher", "baseline", "seq_kd", "baseline (shipped)", "seq_kd (shipped)"]
    assert all(s["sentences"] == 30 for s in systems.values())
    assert systems["seq_kd (shipped)"]["checkpoint"] == str(shipped / "seq_kd" / "student.pt")
    # two tables, each under its label: the demo's own students, then the shipped ones
    own = out.index("=== results: the first 0.1 minutes of training, the pipeline end to end")
    converged = out.index(f"=== results: converged students shipped in {shipped} (how each was trained: its README.md)")
    side = out.index("=== 7. a few test sentences side by side: the teacher and the shipped students (beam 5)")
    assert own < converged < side

    def rows(text):
        return [line.split(" | ")[0][2:] for line in text.splitlines() if line.startswith("| ")][1:]

    assert rows(out[own:converged]) == ["teacher", "baseline", "seq_kd"]
    assert rows(out[converged:side]) == ["teacher", "baseline (shipped)", "seq_kd (shipped)"]
    assert "| BLEU greedy vs baseline (shipped) |" in out[converged:side]
    # the sentences: the translations fairseq-kd evaluate wrote, source and reference beside them
    lines = {name: (demo / "raw" / f"test.{name}").read_text().splitlines() for name in ("es", "en")}
    hyps = {name: (demo / f"results.{stem}.beam.txt").read_text().splitlines()
            for name, stem in (("teacher", "teacher"), ("baseline (shipped)", "baseline.shipped"),
                               ("seq_kd (shipped)", "seq_kd.shipped"))}
    blocks = out[side:].split("test sentence ")[1:]
    assert len(blocks) == 3
    for block in blocks:
        number = int(block.split(" of 30:")[0])
        i = number - 1
        assert block.splitlines()[1:6] == [
            f"  source              {lines['es'][i]}", f"  reference           {lines['en'][i]}",
            f"  teacher             {hyps['teacher'][i]}", f"  baseline (shipped)  {hyps['baseline (shipped)'][i]}",
            f"  seq_kd (shipped)    {hyps['seq_kd (shipped)'][i]}"]
    # a second run scores nothing again and prints the same
    again = quickstart(demo, METHODS="seq_kd", STUDENTS_DIR=str(shipped))
    assert "seq_kd (shipped) greedy: BLEU" not in again
    assert again[again.index("=== results"):] == out[own:]
