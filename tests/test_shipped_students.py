"""The students shipped in examples/students work from a clean clone.

The recipes' ``ship_students`` step ships each converged student of the Bible study in
``examples/students/NAME`` (student.pt, spm.model, dict.txt, evaluation.json,
evaluation.check.json, README.md, training.json) and scores the first test pairs from that folder
alone into ``evaluation.check.json``.  For every folder there,
:func:`check_shipped_student` checks that the folder is complete and small, names no
path of a machine, and that those scores come out again from the files a user gets
(the corpus in examples/data, the folder's SentencePiece model and dictionary,
``fairseq-kd evaluate --no-user-dir``).  No student is shipped yet: that test then
skips, and the same function runs here on a tiny student the recipe ships.
"""
import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from fairseq_kd.curves import best_point, convergence, read_log, read_record
from fairseq_kd.shipping import STUDENT_FILES, folder_problems
from helpers import OWN_VOCABULARY, REPO, rescore_shipped_folder, run_bible_recipe, ship_tiny_students

STUDENTS_DIR = REPO / "examples" / "students"
# fp16 weights of the Bible study's 128-dim 3+3 student with an 8k vocabulary: 2.4M parameters, ~5 MB
MAX_BYTES = 8 * 2**20
# BLEU and chrF points another machine's floating point may move a score by (a few changed translations)
TOLERANCE = 1.0
HOME = os.path.expanduser("~")


def score_mismatches(documented, measured, tolerance):
    """How a rescored results entry differs from the documented one by more than ``tolerance``."""
    problems = [f"{key}: documented {documented[key]}, measured {measured[key]}"
                for key in ("name", "params", "sentences") if documented[key] != measured[key]]
    for decoding in ("greedy", "beam"):
        if documented[decoding]["beam"] != measured[decoding]["beam"]:
            problems.append(f"{decoding}: beam {documented[decoding]['beam']} documented, "
                            f"{measured[decoding]['beam']} measured")
        for metric in ("bleu", "chrf"):
            was, now = documented[decoding][metric], measured[decoding][metric]
            if abs(was - now) > tolerance:
                problems.append(f"{decoding} {metric}: documented {was}, measured {now}")
    return problems


def check_shipped_student(folder, tmp, tolerance=TOLERANCE, machine_paths=(str(REPO), HOME)):
    """A shipped student's folder: complete, at most MAX_BYTES, no path of a machine
    (:func:`fairseq_kd.shipping.folder_problems`), a README that names its method and its
    test scores, and ``evaluation.check.json`` reproduced within ``tolerance`` from a clean
    clone.  Returns (documented, measured) check entries."""
    folder = Path(folder)
    problems = folder_problems(folder, "student.pt", MAX_BYTES, machine_paths, STUDENT_FILES)
    assert not problems, f"{folder}:\n  " + "\n  ".join(problems)
    check_training_record(folder)
    (full,), (documented,) = (json.loads((folder / name).read_text())["systems"]
                              for name in ("evaluation.json", "evaluation.check.json"))
    assert full["name"] == documented["name"] == folder.name
    assert 0 < documented["sentences"] <= full["sentences"]
    readme = (folder / "README.md").read_text()
    assert readme.startswith(f"# Student: {folder.name}, ")
    for decoding in ("greedy", "beam"):
        assert f"sacreBLEU {full[decoding]['bleu']}, chrF {full[decoding]['chrf']}" in readme
    assert f"{full['params'] / 1e6:.1f}M parameters" in readme
    pruned = f"{full['nonzero_params'] / 1e6:.2f}M of them non-zero (pruned)"
    # pruned: more than 1% of its parameters zero; a dense student has a handful (float16 rounding)
    zeros = full["params"] - full["nonzero_params"]
    assert (pruned in readme) == (zeros > 0.01 * full["params"]), "README and evaluation.json disagree"
    measured = rescore_shipped_folder(folder, "student.pt", documented["name"], documented["sentences"],
                                      documented["beam"]["beam"], tmp)
    mismatches = score_mismatches(documented, measured, tolerance)
    assert not mismatches, f"{folder}/evaluation.check.json not reproduced:\n  " + "\n  ".join(mismatches)
    return documented, measured


def check_training_record(folder):
    """The folder's training.json is the curve its README states: the same validation by
    epoch, best and last validation, checkpoint kind and hours in training updates."""
    rows = readme_rows((folder / "README.md").read_text())
    curve = read_record(str(folder / "training.json"))
    assert curve.name == folder.name
    by_epoch = [f"{v:.2f}" for _, v in curve.points("bleu")]
    assert ", ".join(by_epoch) == rows["valid BLEU by epoch"]
    best_update, best = best_point(curve, "bleu")
    last_update = max(curve.validations)
    assert rows["valid BLEU"].startswith(
        f"best {best:.2f}, first reached at update {best_update} (epoch {curve.validations[best_update]['epoch']}); "
        f"last validation at update {last_update} (epoch {curve.validations[last_update]['epoch']})")
    record = json.loads((folder / "training.json").read_text())
    assert rows["checkpoint"].startswith(f"`{record['checkpoint']}`")
    if record["checkpoint"] != "checkpoint_best.pt":  # a checkpoint of the last epoch: its hours are all of them
        assert rows["training to it"].startswith(f"{curve.train_hours:.2f} h in training updates")


SHIPPED = sorted(p for p in STUDENTS_DIR.iterdir() if p.is_dir()) if STUDENTS_DIR.is_dir() else []


@pytest.mark.parametrize("folder", SHIPPED or [None], ids=[p.name for p in SHIPPED] or ["none-shipped"])
def test_shipped_student_reproduces_its_check_from_a_clean_clone(folder, tmp_path):
    if folder is None:
        pytest.skip("examples/students/ holds no shipped student yet: `PROFILE=cpu_converged "
                    "recipes/bible_es_en/run.sh ship_students` ships them once the study's students "
                    "have converged (SHIP_STUDENTS_DIR=examples/students)")
    check_shipped_student(folder, tmp_path)


# ------------------------------------------------- a tiny student, shipped by the recipe

@pytest.fixture(scope="module")
def tiny_shipment(tmp_path_factory):
    """A work folder whose baseline student the recipe's ship_students step shipped."""
    work = tmp_path_factory.mktemp("ship_students") / "work"
    log = ship_tiny_students(work, **OWN_VOCABULARY).stdout
    return work, log


@pytest.mark.slow  # the recipe trains and ships a tiny student (~100 s)
def test_the_check_passes_on_a_tiny_student_the_recipe_shipped(tiny_shipment, tmp_path):
    work, _ = tiny_shipment
    folder = work / "shipped_students" / "baseline"
    assert sorted(p.name for p in (work / "shipped_students").iterdir()) == ["baseline"]  # no .partial left
    # this machine, the same settings: the check's scores come out exactly
    documented, _ = check_shipped_student(folder, tmp_path, tolerance=0,
                                          machine_paths=(str(work), str(REPO), HOME))
    assert documented["sentences"] == 20 and json.loads((folder / "evaluation.json").read_text())[
        "systems"][0]["sentences"] == 40
    # the shipped weights are the evaluated checkpoint's (the checkpoint step's choice), in float16
    shipped = torch.load(folder / "student.pt", map_location="cpu", weights_only=True)
    trained = torch.load(work / "student_baseline" / f"checkpoint_{chosen(work)}.pt", map_location="cpu",
                         weights_only=False)["model"]
    assert shipped["model"].keys() == trained.keys()
    for key, value in trained.items():
        expected = value.half() if value.is_floating_point() else value
        assert torch.equal(shipped["model"][key], expected), key
    assert shipped["cfg"]["task"]["data"] is None  # the training machine's data folder is not in it
    assert (folder / "dict.txt").read_bytes() == (work / "bin" / "dict.es.txt").read_bytes()
    # a student whose translations differ from sentence to sentence: reproducing its scores means
    # something (8 distinct of 20 on the 2026-12-07 machine, 20 on earlier ones: a tiny student)
    hyps = (tmp_path / "results.baseline.greedy.txt").read_text().splitlines()
    assert len(hyps) == 20 and len(set(hyps)) >= 5


@pytest.mark.slow  # the recipe trains and ships a tiny student (~100 s)
def test_the_check_fails_a_folder_that_does_not_reproduce_or_leaks_a_path(tiny_shipment, tmp_path):
    work, _ = tiny_shipment
    documented = json.loads((work / "shipped_students" / "baseline" / "evaluation.check.json").read_text())
    entry = documented["systems"][0]
    changed = json.loads(json.dumps(entry))
    changed["beam"]["chrf"] += 1.5
    assert score_mismatches(entry, changed, TOLERANCE) == [
        f"beam chrf: documented {entry['beam']['chrf']}, measured {changed['beam']['chrf']}"]
    assert score_mismatches(entry, entry, 0) == []

    def copy():
        folder = tmp_path / f"copy{len(list(tmp_path.iterdir()))}" / "baseline"
        shutil.copytree(work / "shipped_students" / "baseline", folder)
        return folder

    folder = copy()
    (folder / "evaluation.baseline.beam.txt").write_text("a hypothesis\n")
    (folder / "README.md").unlink()
    assert folder_problems(folder, "student.pt", files=STUDENT_FILES) == [
        "README.md is missing", "evaluation.baseline.beam.txt should not be shipped (only README.md, dict.txt, "
        "evaluation.check.json, evaluation.json, spm.model, student.pt, training.json)"]
    folder = copy()
    results = json.loads((folder / "evaluation.json").read_text())
    results["systems"][0]["checkpoint"] = str(folder / "student.pt")
    (folder / "evaluation.json").write_text(json.dumps(results))
    assert folder_problems(folder, "student.pt", machine_paths=[str(tmp_path)], files=STUDENT_FILES) == [
        f"evaluation.json: systems.0.checkpoint is a path of the machine: {folder / 'student.pt'}",
        f"evaluation.json: system baseline was scored from {folder / 'student.pt'}, not student.pt",
        f"evaluation.json contains the path {tmp_path}"]
    folder = copy()
    state = torch.load(folder / "student.pt", map_location="cpu", weights_only=True)
    state["cfg"]["task"]["data"] = str(work / "bin")
    state["model"] = {k: v.float() for k, v in state["model"].items()}
    torch.save(state, folder / "student.pt")
    problems = folder_problems(folder, "student.pt", max_bytes=1000, files=STUDENT_FILES)
    assert problems[0].startswith("student.pt is ") and problems[0].endswith(" MiB, over 0.0 MiB")
    assert re.fullmatch(r"student\.pt: weight \S+ is torch\.float32, not float16 \(fairseq-kd export --half\)",
                        problems[1])
    assert problems[-1] == f"student.pt: cfg.task.data is a path of the machine: {work / 'bin'}"


def chosen(work):
    """The checkpoint kind the checkpoint step chose: best or avg5."""
    return (work / "checkpoint_choice").read_text().strip()


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow  # the recipe trains and ships a tiny student (~100 s)
def test_the_checkpoint_step_chooses_the_baselines_better_checkpoint_on_valid(tiny_shipment):
    """STUDENT_CHECKPOINT=choose: the baseline's best checkpoint against the mean of its last 5
    epoch checkpoints, both translating the validation split; the higher greedy BLEU wins."""
    work, _ = tiny_shipment
    student = work / "student_baseline"
    # the average is the mean of the 5 epoch checkpoints, computed here independently
    epochs = [weights(student / f"checkpoint{e}.pt") for e in range(1, 6)]
    averaged = weights(student / "checkpoint_avg5.pt")
    for key, value in averaged.items():
        if value.is_floating_point():
            expected = sum(e[key].double() for e in epochs) / 5
            assert torch.allclose(value.double(), expected, atol=1e-6), key
    scores = {s["name"]: s for s in json.loads((work / "checkpoints.json").read_text())["systems"]}
    assert sorted(scores) == ["baseline (avg5)", "baseline (best)"]
    valid = (work / "raw" / "valid.en").read_text().splitlines()
    for name, system in scores.items():
        assert system["sentences"] == len(valid) == 30
    greedy = {name: system["greedy"]["bleu"] for name, system in scores.items()}
    assert chosen(work) == ("avg5" if greedy["baseline (avg5)"] > greedy["baseline (best)"] else "best")


@pytest.mark.slow  # the recipe trains and ships a tiny student (~100 s)
def test_training_json_is_the_students_log(tiny_shipment):
    """training.json holds every validation of the training log (epoch, update, BLEU) and the
    log's train_wall summed; read back, it converges as the log does."""
    work, _ = tiny_shipment
    record = json.loads((work / "shipped_students" / "baseline" / "training.json").read_text())
    log = read_log(work / "logs" / "student_baseline.log", "baseline")
    assert record["metric"] == "bleu" and record["checkpoint"] == f"checkpoint_{chosen(work)}.pt"
    assert [(r["epoch"], r["num_updates"], r["bleu"]) for r in record["validations"]] == [
        (stats["epoch"], update, stats["bleu"]) for update, stats in sorted(log.validations.items())]
    assert record["train_hours"] == pytest.approx(sum(s["train_wall"] for s in log.epochs.values()) / 3600, abs=1e-4)
    assert convergence(read_record(str(work / "shipped_students" / "baseline" / "training.json")), "bleu") \
        == dataclasses.replace(convergence(log, "bleu"), train_hours=pytest.approx(record["train_hours"]))


def readme_rows(readme):
    return dict(re.findall(r"^\| ([^|]+) \| (.+) \|$", readme, re.M))


@pytest.mark.slow  # the recipe trains and ships a tiny student (~100 s)
def test_readme_says_how_the_student_was_trained(tiny_shipment):
    work, log = tiny_shipment
    folder = work / "shipped_students" / "baseline"
    readme = (folder / "README.md").read_text()
    assert readme in log  # the step prints it
    rows = readme_rows(readme)
    state = torch.load(work / "student_baseline" / f"checkpoint_{chosen(work)}.pt", map_location="cpu",
                       weights_only=False)
    updates = state["optimizer_history"][-1]["num_updates"]
    curve = read_log(work / "logs" / "student_baseline.log", "baseline")
    epoch = curve.validations[updates]["epoch"]
    if chosen(work) == "best":
        assert rows["checkpoint"] == (
            "`checkpoint_best.pt`, the one with the best valid BLEU (the one the recipe's export and evaluate "
            f"steps use too): epoch {epoch}, {updates} updates, valid BLEU {curve.validations[updates]['bleu']:.2f}")
    else:
        assert rows["checkpoint"] == (
            "`checkpoint_avg5.pt`, the mean of its last 5 checkpoints (`fairseq-kd average`) (the one the recipe's "
            f"export and evaluate steps use too): the newest of them at epoch {epoch}, {updates} updates")
    train_hours = sum(stats["train_wall"] for e, stats in curve.epochs.items() if e <= epoch) / 3600
    wall_hours = state["extra_state"]["previous_training_time"] / 3600
    assert rows["training to it"] == (
        f"{train_hours:.2f} h in training updates (fairseq's `train_wall`, validation excluded), "
        f"{wall_hours:.2f} h of fairseq's cumulative wall time; the students trained 1 at a time on the machine "
        "(STUDENT_JOBS=1)")
    by_epoch = {stats["epoch"]: stats["bleu"] for _, stats in sorted(curve.validations.items())}
    assert rows["valid BLEU by epoch"] == ", ".join(f"{by_epoch[e]:.2f}" for e in sorted(by_epoch))
    best = max(by_epoch.values())
    first = min(u for u, stats in curve.validations.items() if stats["bleu"] == best)
    last = max(curve.validations)
    assert rows["valid BLEU"] == (
        f"best {best:.2f}, first reached at update {first} (epoch {curve.validations[first]['epoch']}); "
        f"last validation at update {last} (epoch 5), {sum(u > first for u in curve.validations)} after the best")
    assert len(by_epoch) == 5 and rows["stopped by"] == "--max-epoch reached"
    system = json.loads((folder / "evaluation.json").read_text())["systems"][0]
    assert rows["test, beam 2"] == (f"sacreBLEU {system['beam']['bleu']}, chrF {system['beam']['chrf']}, "
                                    f"{system['beam']['sentences_per_s']} sentences/s")
    assert rows["teacher it learned from"] == "none: no KD, the gold targets only"
    assert rows["method"] == "`baseline`: trained on the gold pairs (`bin/`)"
    entries = len((folder / "dict.txt").read_text().splitlines())
    assert rows["data"] == (f"1000 training pairs, encoded by `spm.model` and `dict.txt` ({entries} entries): "
                            "trained by the recipe on the training pairs (300 pieces), the teacher's too")
    # the fairseq-train command as the students step ran it, with the work folder's paths made relative
    assert rows["fairseq-train"].startswith("`fairseq-train bin --user-dir fairseq_kd --source-lang es "
                                            "--target-lang en --save-dir student_baseline --cpu --optimizer adam")
    assert "--teacher-path teacher/checkpoint_best.pt --criterion label_smoothed_cross_entropy" in rows["fairseq-train"]
    assert "--max-epoch 5 --patience 5 --eval-bleu" in rows["fairseq-train"]
    assert re.search(r"\| machine \| .*, \d+ cores \|", readme)
    assert str(work) not in readme and str(REPO) not in readme and f"{HOME}/" not in readme


@pytest.mark.slow  # the recipe trains and ships a tiny student (~100 s)
def test_a_rerun_skips_a_shipped_student(tiny_shipment, tmp_path):
    work, _ = tiny_shipment
    files = sorted((work / "shipped_students" / "baseline").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in files]
    rerun = run_bible_recipe(work, "ship_students", METHODS="baseline", SHIP_STUDENTS="baseline",
                             **OWN_VOCABULARY).stdout
    assert "skip ship_student_baseline (done" in rerun
    assert [p.stat().st_mtime_ns for p in sorted((work / "shipped_students" / "baseline").iterdir())] == mtimes


@pytest.mark.slow  # the recipe prunes, retrains and ships the tiny student (~60 s more)
def test_a_shipped_pruned_student_says_what_it_was_pruned_from(tiny_shipment, tmp_path):
    """A pruned student is shipped like the others, and its README says how to make it again:
    the trained student and prune command it came from, the first run's --restore-file and
    --reset options, the prune step, and how many of its parameters are not zero."""
    work, _ = tiny_shipment
    pruning = {"METHODS": "baseline", "PRUNE_FROM": "baseline", "PRUNE_RATIO": "0.5", "PRUNE_TRAIN": "--max-epoch 1",
               **OWN_VOCABULARY}
    run_bible_recipe(work, "prune", **pruning)
    run_bible_recipe(work, "ship_students", SHIP_STUDENTS="pruned_baseline", **pruning)
    folder = work / "shipped_students" / "pruned_baseline"
    check_shipped_student(folder, tmp_path, tolerance=0, machine_paths=(str(work), str(REPO), HOME))
    readme = (folder / "README.md").read_text()
    rows = readme_rows(readme)
    assert "(its `prune` step)" in readme
    assert rows["method"] == (
        f"`pruned_baseline`: trained on the gold pairs (`bin/`) from `baseline`'s trained student, 50% of its "
        f"linear weights set to zero (`fairseq-kd prune --path student_baseline/checkpoint_{chosen(work)}.pt "
        f"--ratio 0.5 --out pruned/baseline.pt`), then retrained with the mask held")
    assert ("--prune-mask pruned/baseline.mask.pt --restore-file pruned/baseline.pt --reset-optimizer "
            "--reset-dataloader --reset-lr-scheduler --reset-meters") in rows["fairseq-train"]
    system = json.loads((folder / "evaluation.json").read_text())["systems"][0]
    # its non-zero parameters, counted here from the shipped weights: the embeddings are kept
    weights = torch.load(folder / "student.pt", map_location="cpu", weights_only=True)["model"]
    linear = [v for k, v in weights.items() if k.endswith(".weight") and v.dim() == 2
              and "embed" not in k and "output_projection" not in k]
    dense, kept = sum(v.numel() for v in linear), sum(int(torch.count_nonzero(v)) for v in linear)
    assert dense // 2 - 5 <= kept <= dense - dense // 2  # half pruned (float16 may zero a few more)
    assert f"{system['nonzero_params'] / 1e6:.2f}M of them non-zero (pruned)" in rows["model"]


def test_an_unfinished_or_unknown_student_is_refused(tmp_path):
    """A student still training (no stamp of the students step) is not shipped."""
    fresh = tmp_path / "work"
    proc = run_bible_recipe(fresh, "ship_students", check=False, METHODS="baseline seq_kd")
    assert proc.returncode != 0 and not (fresh / "shipped_students").exists()
    assert proc.stderr.strip().splitlines()[-1].endswith(
        f"ship_students: baseline has not finished training (no {fresh}/done/student_baseline); ship it once it has")
    proc = run_bible_recipe(fresh, "ship_students", check=False, METHODS="baseline", SHIP_STUDENTS="baseline a2d")
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "ship_students: a2d is not a student of this study (baseline); set SHIP_STUDENTS")
