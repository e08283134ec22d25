"""The recipes (recipes/*/run.sh): every script parses, every option they pass
exists (both profiles), and (slow) they run end to end on a tiny Bible slice
on CPU, the custom recipe on a corpus with made-up language codes, and a
rerun skips finished work while a removed result or stamp is redone."""
import json
import os
import re
import shlex
import subprocess

import pytest
import torch
from sacrebleu.metrics import BLEU, CHRF

from helpers import BIN, REPO, env

RECIPES = ["bible_es_en", "wmt14_en_de", "custom"]
METHODS = ["baseline", "word_kd", "seq_kd", "seq_inter", "hybrid_kd", "ckd", "a2d"]
STUDENTS = METHODS + ["pruned_seq_kd"]
# the results rows: each system, then its CTranslate2 model (CT2_QUANT=int8 by default)
ROWS = [row for name in ["teacher", *STUDENTS] for row in (name, f"{name} (ct2 int8)")]

# Tiny sizes for CPU: every variable of config.sh can be set from the environment.
TINY = {
    "GPUS": "cpu", "DATA_SOURCE": "bible", "TRAIN_LINES": "400", "VALID_LINES": "30",
    "TEST_LINES": "20", "VOCAB": "300", "PREPROCESS_WORKERS": "1", "STUDENT_JOBS": "2",
    "OPTIM_ARGS": "--optimizer adam --adam-betas (0.9,0.98) --lr 2e-3 --lr-scheduler inverse_sqrt --warmup-updates 10",
    "MAX_TOKENS": "2000",
    "TEACHER_ARGS": "--arch transformer --share-all-embeddings --encoder-layers 2 --decoder-layers 2 "
                    "--encoder-embed-dim 64 --decoder-embed-dim 64 --encoder-ffn-embed-dim 128 "
                    "--decoder-ffn-embed-dim 128 --encoder-attention-heads 4 --decoder-attention-heads 4",
    "TEACHER_TRAIN": "--max-epoch 3",
    "STUDENT_ARGS": "--arch transformer --share-all-embeddings --encoder-layers 1 --decoder-layers 1 "
                    "--encoder-embed-dim 32 --decoder-embed-dim 32 --encoder-ffn-embed-dim 64 "
                    "--decoder-ffn-embed-dim 64 --encoder-attention-heads 2 --decoder-attention-heads 2",
    "STUDENT_TRAIN": "--max-epoch 1", "PRUNE_TRAIN": "--max-epoch 1",
    "BEAM": "2", "SEQ_INTER_N": "3", "MAX_LEN_B": "5", "EVAL_BATCH_SIZE": "16",
}


def run_recipe(recipe, extra_env, *steps, check=True):
    e = env()
    e["PATH"] = f"{BIN}{os.pathsep}{e['PATH']}"
    e.update(extra_env)
    proc = subprocess.run(["bash", REPO / "recipes" / recipe / "run.sh", *steps],
                          capture_output=True, text=True, env=e, timeout=3600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{recipe} failed ({proc.returncode})\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


# ---------------------------------------------------------------- fast checks

def test_every_script_parses():
    scripts = sorted((REPO / "recipes").rglob("*.sh"))
    assert len(scripts) >= 7
    for script in scripts:
        proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def dry_run_commands(recipe, tmp_path, *steps, **extra):
    settings = {"DRY_RUN": "1", "GPUS": "cpu", "WORK": str(tmp_path / recipe)}
    if recipe == "custom":  # its data folder is only read by the prepare step, not in a dry run
        settings.update(DATA_DIR=str(tmp_path), SRC="de", TGT="en")
    out = run_recipe(recipe, {**settings, **extra}, *steps).stdout
    return [shlex.split(line[4:]) for line in out.splitlines() if line.startswith("RUN:")]


def check_options(cmd):
    """Parse a recipe command with the tool's own parser (SystemExit on an unknown option)."""
    from fairseq import options

    from fairseq_kd.cli import build_parser

    tool, args = os.path.basename(cmd[0]), cmd[1:]
    if tool == "fairseq-train":
        ns = options.parse_args_and_arch(options.get_training_parser(), args)
        return ns.arch, ns.criterion
    if tool == "fairseq-preprocess":
        options.get_preprocessing_parser().parse_args(args)
    elif tool == "fairseq-kd":
        build_parser().parse_args(args)
    return None


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_commands_use_existing_options(recipe, tmp_path):
    cmds = dry_run_commands(recipe, tmp_path)
    trained = [check_options(c) for c in cmds if c[0] == "fairseq-train"]
    teacher_arch = {"bible_es_en": "transformer_iwslt_de_en", "wmt14_en_de": "transformer_vaswani_wmt_en_de_big",
                    "custom": "transformer_iwslt_de_en"}
    assert trained[0] == (teacher_arch[recipe], "label_smoothed_cross_entropy")
    assert [c for _, c in trained[1:]] == ["label_smoothed_cross_entropy", "word_kd", "seq_kd", "seq_kd",
                                           "hybrid_kd", "ckd", "a2d", "seq_kd"]  # + pruned retraining
    for cmd in cmds:
        if cmd[0] != "fairseq-train":
            check_options(cmd)
    kd = [c[1] for c in cmds if c[0] == "fairseq-kd"]
    assert kd.count("corpus") == 2 and kd.count("prune") == 1 and kd.count("export") == len(STUDENTS)
    assert kd.count("evaluate") == len(ROWS) and kd.count("plot") == 2 and kd.count("table") == 1
    evaluated = [c for c in cmds if c[1:2] == ["evaluate"]]
    assert sum(c[c.index("--backend") + 1:c.index("--backend") + 4] == ["ctranslate2", "--quantization", "int8"]
               for c in evaluated if "--backend" in c) == len(STUDENTS) + 1
    assert {c[c.index("--backend") + 1] for c in cmds if c[1:2] == ["corpus"]} == {"fairseq"}
    # the --seq-inter corpus feeds seq_inter, the beam corpus seq_kd and hybrid_kd
    train_data = {c[c.index("--save-dir") + 1].rsplit("/", 1)[1]: c[1].rsplit("/", 1)[1]
                  for c in cmds if c[0] == "fairseq-train"}
    assert train_data["student_seq_kd"] == "distilled" and train_data["student_seq_inter"] == "distilled_inter"
    assert train_data["student_baseline"] == train_data["student_hybrid_kd"] == "bin"


def train_option(cmd, option):
    return cmd[cmd.index(option) + 1]


@pytest.mark.parametrize("recipe", ["bible_es_en", "custom"])
def test_cpu_profile_sizes_teacher_and_students_for_cpu(recipe, tmp_path):
    cmds = dry_run_commands(recipe, tmp_path, PROFILE="cpu", GPUS="")  # GPUS from the profile
    trained = [c for c in cmds if c[0] == "fairseq-train"]
    assert all("--cpu" in c and "--fp16" not in c for c in trained)
    assert train_option(trained[0], "--arch") == "transformer_student_small"
    assert {train_option(c, "--arch") for c in trained[1:]} == {"transformer_student_tiny"}
    # students: the same number of updates for every method (the time limit is only a safety net)
    assert {train_option(c, "--max-update") for c in trained[1:-1]} == {"1600"}
    # the learned hybrid gate is compared with a fixed 0.5 gate on the same data
    hybrid = {train_option(c, "--save-dir").rsplit("/", 1)[1]: c for c in trained if "hybrid_kd" in c}
    assert sorted(hybrid) == ["student_hybrid_fixed", "student_hybrid_kd"]
    assert train_option(hybrid["student_hybrid_kd"], "--gate") == "complexity"
    assert train_option(hybrid["student_hybrid_fixed"], "--gate") == "fixed"
    assert train_option(hybrid["student_hybrid_fixed"], "--gate-value") == "0.5"
    assert {train_option(c, "--distilled-data").rsplit("/", 1)[1] for c in hybrid.values()} == {"distilled"}
    for cmd in cmds:
        check_options(cmd)


def test_ship_step_exports_the_teacher_in_half_precision_and_scores_it_with_stock_fairseq(tmp_path):
    cmds = dry_run_commands("bible_es_en", tmp_path, PROFILE="cpu", SHIP_DIR=str(tmp_path / "shipped"))
    assert not any("--half" in c for c in cmds)  # only when named
    cmds = dry_run_commands("bible_es_en", tmp_path, "ship", PROFILE="cpu", SHIP_DIR=str(tmp_path / "shipped"))
    export, evaluate, spm, check = [c for c in cmds if c[0] == "fairseq-kd"]
    assert export[1] == "export" and "--half" in export and "--portable" in export
    assert train_option(export, "--path").endswith("/teacher/checkpoint_best.pt")
    assert train_option(export, "--out") == str(tmp_path / "shipped" / "teacher.pt")
    assert evaluate[1] == "evaluate" and "--no-user-dir" in evaluate
    assert train_option(evaluate, "--checkpoint") == train_option(export, "--out")
    assert [c[1] for c in cmds if c[0] == "cp"] == [f"{tmp_path}/bible_es_en/pieces/spm.model",
                                                  f"{tmp_path}/bible_es_en/bin/dict.es.txt"]
    # the check slice is encoded and binarized from the shipped folder alone, as the test of
    # the shipped teacher does from a clean clone
    shipped = tmp_path / "shipped"
    assert [c[3] for c in cmds if c[0] == "head"] == [f"{tmp_path}/bible_es_en/raw/test.es",
                                                      f"{tmp_path}/bible_es_en/raw/test.en"]
    assert [c[2] for c in cmds if c[0] == "head"] == ["300", "300"]
    assert spm[1] == "spm" and train_option(spm, "--model") == str(shipped / "spm.model")
    preprocess, = [c for c in cmds if c[0] == "fairseq-preprocess"]
    assert train_option(preprocess, "--srcdict") == str(shipped / "dict.txt")
    assert check[1] == "evaluate" and "--no-user-dir" in check
    assert train_option(check, "--checkpoint") == str(shipped / "teacher.pt")
    assert train_option(check, "--results") == str(shipped / "evaluation.check.json")
    for cmd in cmds:
        check_options(cmd)


def test_ship_students_step_ships_each_students_evaluated_checkpoint_in_half_precision(tmp_path):
    """ship_students (only when named): for each SHIP_STUDENTS (default baseline seq_kd), the
    checkpoint the export and evaluate steps use, exported as the teacher is, scored on the test
    split and on its first SHIP_CHECK_LINES pairs from the shipped folder alone."""
    work, shipped = tmp_path / "bible_es_en", tmp_path / "students"
    cmds = dry_run_commands("bible_es_en", tmp_path, PROFILE="cpu_converged", GPUS="", SHIP_STUDENTS_DIR=str(shipped))
    assert not any("--half" in c for c in cmds)  # only when named
    cmds = dry_run_commands("bible_es_en", tmp_path, "ship_students", PROFILE="cpu_converged", GPUS="",
                            SHIP_STUDENTS_DIR=str(shipped))
    for cmd in cmds:
        check_options(cmd)
    kd = [c for c in cmds if c[0] == "fairseq-kd"]
    assert [c[1] for c in kd] == ["export", "evaluate", "spm", "evaluate"] * 2
    for name, (export, evaluate, spm, check) in zip(("baseline", "seq_kd"), (kd[:4], kd[4:])):
        partial = shipped / f"{name}.partial"  # written beside its place, then moved there
        # cpu_converged's checkpoint is the checkpoint step's choice: a dry run names its placeholder
        assert train_option(export, "--path") == str(work / f"student_{name}" / "checkpoint_best_or_avg5.pt")
        assert train_option(export, "--out") == str(partial / "student.pt")
        assert "--half" in export and "--portable" in export and train_option(export, "--data") == str(work / "bin")
        for scored, results in ((evaluate, "evaluation.json"), (check, "evaluation.check.json")):
            assert train_option(scored, "--checkpoint") == str(partial / "student.pt") and "--no-user-dir" in scored
            assert train_option(scored, "--name") == name and train_option(scored, "--results") == str(partial / results)
        assert train_option(evaluate, "--data") == str(work / "bin")
        assert train_option(check, "--data") == str(work / "ship_check" / "bin")
        assert train_option(spm, "--model") == str(partial / "spm.model")
    assert [c[1:] for c in cmds if c[0] == "mv"] == [[str(shipped / f"{n}.partial"), str(shipped / n)]
                                                     for n in ("baseline", "seq_kd")]
    assert [c[2] for c in cmds if c[0] == "head"] == ["300"] * 4
    # the cpu profile compares students at equal updates: its last checkpoints; any student, pruned ones too
    cmds = dry_run_commands("bible_es_en", tmp_path, "ship_students", PROFILE="cpu", GPUS="",
                            SHIP_STUDENTS="pruned_seq_kd a2d")
    assert [train_option(c, "--path") for c in cmds if c[1:2] == ["export"]] == [
        str(work / "student_pruned_seq_kd" / "checkpoint_last.pt"), str(work / "student_a2d" / "checkpoint_last.pt")]
    assert train_option([c for c in cmds if c[1:2] == ["export"]][0], "--out") == str(
        work / "shipped_students" / "pruned_seq_kd.partial" / "student.pt")
    proc = run_recipe("bible_es_en", {"DRY_RUN": "1", "GPUS": "cpu", "WORK": str(work), "PROFILE": "cpu_converged",
                                      "SHIP_STUDENTS": "seq_kd word-kd"}, "ship_students", check=False)
    assert proc.returncode != 0 and "RUN:" not in proc.stdout
    assert proc.stderr.strip().endswith("ship_students: word-kd is not a student of this study (baseline seq_kd "
                                        "seq_word_kd word_kd hybrid_kd ckd a2d seq_inter pruned50_word_kd pruned0_word_kd "
                                        "pruned80_word_kd); set SHIP_STUDENTS")


def test_students_are_trained_with_the_command_their_readme_shows(tmp_path):
    """The students and prune steps run the command lines student_train_args and pruned_train_args
    build, which ship_students writes into a shipped student's README."""
    def commands(*steps):
        return [c for c in dry_run_commands("bible_es_en", tmp_path, *steps, PROFILE="cpu", GPUS="")
                if c[0] == "fairseq-train"]

    trained = commands("students", "prune")
    script = (f'source "{REPO}/recipes/bible_es_en/config.sh"; source "{REPO}/recipes/common/pipeline.sh"; '
              'resolve_devices; for m in $METHODS; do student_train_args "$m"; printf "%q " "${TRAIN_ARGS[@]}"; '
              'echo; done; pruned_train_args pruned_seq_kd; printf "%q " "${TRAIN_ARGS[@]}"; echo; '
              'pruned_train_args pruned_seq_kd $(pruned_start_args pruned_seq_kd); printf "%q " "${TRAIN_ARGS[@]}"')
    e = env()
    e.update(PROFILE="cpu", GPUS="cpu", WORK=str(tmp_path / "bible_es_en"))
    shown = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=e, check=True).stdout
    *shown, shipped_pruned = [shlex.split(line) for line in shown.splitlines()]
    assert len(shown) == len(trained) == 9
    assert shown[:-1] == trained[:-1]
    # the retraining's first run also starts from the pruned weights (--restore-file ... --reset-*),
    # as a shipped pruned student's README shows it (pruned_start_args); a resumed run does not
    first_run = trained[-1]
    restore = first_run.index("--restore-file")
    assert first_run[:restore] + first_run[restore + 6:] == shown[-1]
    assert shipped_pruned == first_run


def test_several_prune_ratios_prune_the_trained_student_once_each(tmp_path):
    """PRUNE_RATIO="0.5 0.8": two pruned students, each pruned from the trained (dense) student
    to its own ratio and retrained with its own mask; both exported and evaluated."""
    cmds = dry_run_commands("bible_es_en", tmp_path, "prune", "export", PROFILE="cpu", PRUNE_RATIO="0.5 0.8")
    work = f"{tmp_path}/bible_es_en"
    prunes = [c for c in cmds if c[1:2] == ["prune"]]
    assert [(c[c.index("--path") + 1], c[c.index("--ratio") + 1], c[c.index("--out") + 1]) for c in prunes] == [
        (f"{work}/student_seq_kd/checkpoint_last.pt", ratio, f"{work}/pruned/seq_kd.{pct}.pt")
        for ratio, pct in (("0.5", 50), ("0.8", 80))]
    retrains = [c for c in cmds if c[0] == "fairseq-train"]
    assert [(c[c.index("--save-dir") + 1], c[c.index("--prune-mask") + 1], c[c.index("--restore-file") + 1])
            for c in retrains] == [(f"{work}/student_pruned{pct}_seq_kd", f"{work}/pruned/seq_kd.{pct}.mask.pt",
                                    f"{work}/pruned/seq_kd.{pct}.pt") for pct in (50, 80)]
    exported = [c[c.index("--path") + 1] for c in cmds if c[1:2] == ["export"]]
    assert [p for p in exported if "pruned" in p] == [
        f"{work}/student_pruned{pct}_seq_kd/checkpoint_last.pt" for pct in (50, 80)]
    # cpu_converged prunes its best student (word_kd) to 50% and Kim & Rush's 80%, beside the
    # control retrained with nothing pruned (ratio 0); cpu keeps its single pruned Seq-KD student
    for profile, names in (("cpu_converged", ["pruned50_word_kd", "pruned0_word_kd", "pruned80_word_kd"]),
                           ("cpu", ["pruned_seq_kd"])):
        exported = [c[c.index("--path") + 1] for c in dry_run_commands("bible_es_en", tmp_path, "export", PROFILE=profile)
                    if c[1:2] == ["export"]]
        assert [p.rsplit("/", 2)[1] for p in exported if "pruned" in p] == [f"student_{n}" for n in names]


# fairseq-kd and fairseq-train as the prune step calls them: each call is logged with its
# start and end; average writes its --out, fairseq-train takes FAKE_SECONDS
FAKE_TOOL = """#!/usr/bin/env python3
import json, os, sys, time
args = [os.path.basename(sys.argv[0])] + sys.argv[1:]
def log(event):
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps([event, time.time()] + args) + "\\n")
log("start")
if args[:2] == ["fairseq-kd", "average"]:
    open(args[args.index("--out") + 1], "w").write("averaged")
if args[0] == "fairseq-train":
    time.sleep(float(os.environ["FAKE_SECONDS"]))
log("end")
"""


def test_pruned_students_retrain_side_by_side_from_one_average(tmp_path):
    """Several PRUNE_RATIO values: the trained student's chosen average is written once, before
    any pruning, and the pruned students retrain STUDENT_JOBS at a time, as the students do."""
    work, stub = tmp_path / "work", tmp_path / "bin"
    for folder in (work / "done", work / "student_word_kd", stub):
        folder.mkdir(parents=True)
    for stamp in ("student_baseline", "student_word_kd"):
        (work / "done" / stamp).touch()
    (work / "student_word_kd" / "checkpoint_last.pt").touch()
    (work / "checkpoint_choice").write_text("avg5\n")
    for tool in ("fairseq-kd", "fairseq-train"):
        (stub / tool).write_text(FAKE_TOOL)
        (stub / tool).chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    run_recipe("bible_es_en", {"WORK": str(work), "GPUS": "cpu", "PROFILE": "cpu_converged", "STUDENT_JOBS": "2",
                               "PRUNE_RATIO": "0.5 0.8", "FAKE_CALLS": str(calls), "FAKE_SECONDS": "4",
                               "PATH": f"{stub}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"}, "prune")
    made = [json.loads(line) for line in calls.read_text().splitlines()]
    started = [c[2:] for c in made if c[0] == "start"]
    averaged = f"{work}/student_word_kd/checkpoint_avg5.pt"
    assert started[0] == ["fairseq-kd", "average", "--dir", f"{work}/student_word_kd", "--last", "5", "--out", averaged]
    assert sum(c[:2] == ["fairseq-kd", "average"] for c in started) == 1
    prunes = sorted((c[c.index("--ratio") + 1], c[c.index("--path") + 1]) for c in started if c[1:2] == ["prune"])
    assert prunes == [("0.5", averaged), ("0.8", averaged)]
    spans = {}  # save dir: {"start": time, "end": time} of its fairseq-train
    for event, when, *cmd in made:
        if cmd[0] == "fairseq-train":
            spans.setdefault(cmd[cmd.index("--save-dir") + 1].rsplit("/", 1)[1], {})[event] = when
    assert sorted(spans) == ["student_pruned50_word_kd", "student_pruned80_word_kd"]
    first, second = sorted(spans.values(), key=lambda span: span["start"])
    assert second["start"] < first["end"]  # side by side, not one after the other
    assert all((work / "done" / f"student_pruned{pct}_word_kd").exists() for pct in (50, 80))


# fairseq-kd as the checkpoint step calls it: each call is logged; average writes its --out,
# evaluate records --name with the greedy BLEU FAKE_SCORES gives it
FAKE_FAIRSEQ_KD = """#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(args) + "\\n")
value = lambda option: args[args.index(option) + 1]
if args[0] == "average":
    open(value("--out"), "w").close()
elif args[0] == "evaluate":
    path = value("--results")
    results = json.load(open(path)) if os.path.exists(path) else {"systems": []}
    bleu = json.loads(os.environ["FAKE_SCORES"])[value("--name")]
    results["systems"].append({"name": value("--name"), "greedy": {"bleu": bleu}, "beam": {"bleu": bleu}})
    json.dump(results, open(path, "w"))
"""


@pytest.mark.parametrize("best, average, expected", [(20.0, 20.5, "avg5"), (20.5, 20.5, "best"), (21.0, 20.5, "best")])
def test_checkpoint_step_uses_the_kind_that_scores_the_baseline_higher(tmp_path, best, average, expected):
    """STUDENT_CHECKPOINT=choose (cpu_converged): the baseline's best checkpoint and the mean of its
    last 5 translate the validation split; every student is then used from the kind that scored
    the higher greedy BLEU (a tie keeps best); a rerun keeps the choice."""
    work, stub = tmp_path / "work", tmp_path / "bin"
    for folder in (work / "done", work / "student_baseline", stub):
        folder.mkdir(parents=True)
    (work / "done" / "student_baseline").touch()
    (work / "student_baseline" / "checkpoint_last.pt").touch()
    (stub / "fairseq-kd").write_text(FAKE_FAIRSEQ_KD)
    (stub / "fairseq-kd").chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    settings = {"WORK": str(work), "GPUS": "cpu", "PROFILE": "cpu_converged", "FAKE_CALLS": str(calls),
                "PATH": f"{stub}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
                "FAKE_SCORES": json.dumps({"baseline (best)": best, "baseline (avg5)": average})}
    run_recipe("bible_es_en", settings, "checkpoint")
    assert (work / "checkpoint_choice").read_text() == expected + "\n"
    made = [json.loads(line) for line in calls.read_text().splitlines()]
    assert made[0] == ["average", "--dir", f"{work}/student_baseline", "--last", "5",
                       "--out", f"{work}/student_baseline/checkpoint_avg5.pt"]
    evaluated = [(c[c.index("--checkpoint") + 1], c[c.index("--gen-subset") + 1], c[c.index("--ref") + 1])
                 for c in made[1:]]
    assert evaluated == [(f"{work}/student_baseline/checkpoint_{kind}.pt", "valid", f"{work}/raw/valid.en")
                         for kind in ("best", "avg5")]
    # the students are then exported from that kind; a rerun chooses nothing again
    export = dry_run_commands("bible_es_en", tmp_path, "export", PROFILE="cpu_converged", WORK=str(work))
    paths = [c[c.index("--path") + 1] for c in export if c[1:2] == ["export"]]
    assert paths and all(p.endswith(f"/checkpoint_{expected}.pt") for p in paths)
    assert (("fairseq-kd", "average") in {tuple(c[:2]) for c in export}) == (expected == "avg5")
    rerun = run_recipe("bible_es_en", settings, "checkpoint")
    assert f"skip checkpoint (chose {expected};" in rerun.stdout and len(calls.read_text().splitlines()) == 3


def test_checkpoint_choice_needs_a_trained_baseline(tmp_path):
    settings = {"WORK": str(tmp_path / "work"), "GPUS": "cpu", "PROFILE": "cpu_converged"}
    proc = run_recipe("bible_es_en", {**settings, "METHODS": "seq_kd"}, "checkpoint", check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].endswith(
        "STUDENT_CHECKPOINT=choose compares the baseline's checkpoints: add baseline to METHODS, "
        "or set STUDENT_CHECKPOINT to best, last or average")
    (tmp_path / "work" / "done").mkdir(parents=True)
    (tmp_path / "work" / "done" / "student_baseline").touch()  # a finished student to export
    proc = run_recipe("bible_es_en", settings, "export", check=False)
    assert proc.returncode != 0 and "STUDENT_CHECKPOINT=choose: nothing chosen yet" in proc.stderr


@pytest.mark.parametrize("best_epoch, resumes", [(16, False), (17, True)])
def test_teacher_whose_best_checkpoint_is_patience_epochs_old_is_not_resumed(tmp_path, best_epoch, resumes):
    # fairseq restarts its --patience count in a resumed run, so the recipe decides from the
    # checkpoints: last at the end of epoch 18 (its iterator points at 19), PROFILE=cpu's patience 3
    teacher = tmp_path / "bible_es_en" / "teacher"
    teacher.mkdir(parents=True)
    for name, epoch in (("best", best_epoch), ("last", 19)):
        torch.save({"extra_state": {"train_iterator": {"epoch": epoch}}}, teacher / f"checkpoint_{name}.pt")
    proc = run_recipe("bible_es_en", {"DRY_RUN": "1", "GPUS": "cpu", "WORK": str(tmp_path / "bible_es_en"),
                                      "PROFILE": "cpu"}, "teacher")
    trains = [line for line in proc.stdout.splitlines() if line.startswith("RUN: fairseq-train")]
    assert bool(trains) == resumes
    assert ("early-stopped (its best checkpoint is 3 epochs old, --patience 3)" in proc.stdout) != resumes


def test_unknown_profile_is_one_line_error(tmp_path):
    proc = run_recipe("bible_es_en", {"DRY_RUN": "1", "WORK": str(tmp_path), "PROFILE": "tpu"}, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "bible_es_en: PROFILE must be gpu, cpu or cpu_converged, not 'tpu'")


def test_custom_recipe_refuses_missing_or_misaligned_data(tmp_path):
    proc = run_recipe("custom", {"DRY_RUN": "1", "SRC": "de"}, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("custom: set DATA_DIR TGT (e.g.")
    data = tmp_path / "corpus"
    data.mkdir()
    for split in ("train", "valid", "test"):
        (data / f"{split}.xx").write_text("a\nb\n")
        (data / f"{split}.yy").write_text("a\nb\n" if split != "valid" else "a\n")
    proc = run_recipe("custom", {"DATA_DIR": str(data), "SRC": "xx", "TGT": "yy", "WORK": str(tmp_path / "w"),
                                 "GPUS": "cpu"}, "prepare", check=False)
    assert proc.returncode != 0 and f"custom: {data}/valid.xx has 2 lines but valid.yy has 1" in proc.stderr


def test_report_replaces_only_its_own_section_of_the_results_page(tmp_path):
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nHand-written introduction.\n")

    def report(key, text):
        subprocess.run(["bash", "-c", f'source "{REPO}/recipes/common/pipeline.sh"; replace_section "$0" "$1"',
                        page, key], input=text, text=True, check=True)

    report("bible_es_en cpu", "## CPU\nfirst run")
    report("bible_es_en gpu", "## GPU\nnot run")
    report("bible_es_en cpu", "## CPU\nsecond run")
    assert page.read_text() == (
        "# Results\n\nHand-written introduction.\n\n"
        "<!-- results bible_es_en cpu -->\n## CPU\nsecond run\n<!-- /results bible_es_en cpu -->\n\n"
        "<!-- results bible_es_en gpu -->\n## GPU\nnot run\n<!-- /results bible_es_en gpu -->\n")


@pytest.mark.parametrize("profile, checkpoint", [("gpu", "best"), ("cpu", "last")])
def test_students_are_exported_and_pruned_from_the_profiles_checkpoint(profile, checkpoint, tmp_path):
    """gpu trains students to early stopping (best); cpu compares them at equal updates (last)."""
    def used(**extra):
        cmds = dry_run_commands("bible_es_en", tmp_path, "prune", "export", PROFILE=profile, **extra)
        return {c[1]: c[c.index("--path") + 1] for c in cmds if c[1:2] in (["prune"], ["export"])}, cmds

    paths, cmds = used()
    exported = [c[c.index("--path") + 1] for c in cmds if c[1:2] == ["export"]]
    assert {p.rsplit("/", 2)[1] for p in exported} >= {f"student_{n}" for n in STUDENTS}
    assert {p.rsplit("/", 1)[1] for p in exported} == {f"checkpoint_{checkpoint}.pt"}
    assert paths["prune"] == f"{tmp_path}/bible_es_en/student_seq_kd/checkpoint_{checkpoint}.pt"
    other = {"best": "last", "last": "best"}[checkpoint]
    paths, _ = used(STUDENT_CHECKPOINT=other)
    assert paths["prune"].endswith(f"/checkpoint_{other}.pt") and paths["export"].endswith(f"/checkpoint_{other}.pt")


def test_dry_run_check_catches_a_misspelt_option(tmp_path):
    cmds = dry_run_commands("bible_es_en", tmp_path, ARGS_word_kd="--kd-alpah 0.5")
    word_kd = [c for c in cmds if c[0] == "fairseq-train" and "word_kd" in c]
    assert len(word_kd) == 1
    with pytest.raises(SystemExit):
        check_options(word_kd[0])


def test_unknown_method_or_step_is_one_line_error(tmp_path):
    proc = run_recipe("bible_es_en", {"DRY_RUN": "1", "GPUS": "cpu", "WORK": str(tmp_path),
                                      "METHODS": "baseline word-kd"}, "students", check=False)
    assert proc.returncode != 0 and "unknown method 'word-kd'" in proc.stderr
    proc = run_recipe("bible_es_en", {"DRY_RUN": "1", "GPUS": "cpu", "WORK": str(tmp_path)}, "train", check=False)
    assert proc.returncode != 0 and "unknown step 'train'" in proc.stderr
    proc = run_recipe("bible_es_en", {"DRY_RUN": "1", "GPUS": "cpu", "WORK": str(tmp_path),
                                      "STUDENT_CHECKPOINT": "final"}, "export", check=False)
    assert proc.returncode != 0 and "STUDENT_CHECKPOINT must be best, last, average or choose, got 'final'" in proc.stderr


# ---------------------------------------------------------------- end to end (slow)

def zero_fraction_of_linear_weights(checkpoint):
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    weights = [v for k, v in state.items() if v.dim() == 2 and "embed" not in k and "output_projection" not in k]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["bible_es_en", "wmt14_en_de"])
def test_recipe_end_to_end_then_resume(recipe, tmp_path):
    work, docs = tmp_path / "work", tmp_path / "docs"
    settings = {**TINY, "WORK": str(work), "RESULTS_MD": str(docs / "results.md"), "PLOT_DIR": str(docs)}
    run_recipe(recipe, settings)

    raw = work / "raw"
    assert [len((raw / f"{s}.{lang}").read_text().splitlines()) for s in ("train", "valid", "test")
            for lang in ("es", "en")] == [400, 400, 30, 30, 20, 20]
    results = json.loads((work / "results.json").read_text())
    assert [s["name"] for s in results["systems"]] == ROWS
    refs = (raw / "test.en").read_text().splitlines()
    for system in results["systems"]:
        assert system["params"] > 0
        for label in ("greedy", "beam"):
            stem = system["name"].replace(" (ct2 int8)", ".ct2-int8")
            hyps = (work / f"results.{stem}.{label}.txt").read_text().splitlines()
            assert len(hyps) == len(refs)
            assert system[label]["bleu"] == round(BLEU().corpus_score(hyps, [refs]).score, 2)
            assert system[label]["chrf"] == round(CHRF().corpus_score(hyps, [refs]).score, 2)
            assert system[label]["sentences_per_s"] > 0
    # the students are stock-fairseq exports; the pruned one kept its mask through retraining
    for name in STUDENTS:
        assert torch.load(work / "exported" / f"{name}.pt", weights_only=True)["cfg"]["model"]["_name"] == "transformer"
    assert zero_fraction_of_linear_weights(work / "exported" / "pruned_seq_kd.pt") >= 0.5
    assert zero_fraction_of_linear_weights(work / "exported" / "seq_kd.pt") < 0.01
    # the retraining trained (fairseq would restore the original training time with the
    # weights, and a --stop-time-hours budget would then be spent before the first update)
    pruned = torch.load(work / "pruned" / "seq_kd.pt", map_location="cpu", weights_only=False)
    assert "previous_training_time" not in pruned["extra_state"]
    assert re.search(r"\| train \| epoch 001 \|", (work / "logs" / "student_pruned_seq_kd.log").read_text())
    page = (docs / "results.md").read_text()
    for name in ["teacher", *STUDENTS]:
        assert f"| {name} |" in page
    assert "BLEU signature: `nrefs:1" in page
    for png in (f"{recipe}.speed.png", f"{recipe}.params.png"):
        assert (docs / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in page

    # a rerun skips every step and touches nothing
    outputs = [work / "results.json", work / "teacher" / "checkpoint_best.pt", work / "distilled" / "train.es-en.en.bin",
               *(work / f"student_{n}" / "checkpoint_last.pt" for n in STUDENTS)]
    mtimes = [p.stat().st_mtime_ns for p in outputs]
    log = run_recipe(recipe, settings).stdout
    assert [p.stat().st_mtime_ns for p in outputs] == mtimes
    for step in ["prepare", "spm", "binarize", "teacher", "distilled", "distilled_inter",
                 *(f"student_{n}" for n in STUDENTS), *(f"export_{n}" for n in STUDENTS)]:
        assert f"skip {step} (done" in log, step
    assert log.count("skip evaluate") == len(ROWS)

    # resume after a lost stamp and result: a2d's training resumes from its own
    # checkpoint (already at --max-epoch, so nothing to train), only a2d is evaluated again
    (work / "done" / "student_a2d").unlink()
    results["systems"] = [s for s in results["systems"] if s["name"] not in ("a2d", "a2d (ct2 int8)")]
    (work / "results.json").write_text(json.dumps(results))
    log = run_recipe(recipe, settings).stdout
    assert "student a2d on" in log and "skip student_word_kd" in log and "evaluate a2d" in log
    assert log.count("skip evaluate") == len(ROWS) - 2 and "evaluate a2d (ct2 int8)" in log
    train_log = (work / "logs" / "student_a2d.log").read_text()
    assert train_log.count("Loaded checkpoint") == 1 and "(epoch 2 @" in train_log.split("Loaded checkpoint")[1][:300]
    names = [s["name"] for s in json.loads((work / "results.json").read_text())["systems"]]
    assert sorted(names) == sorted(ROWS)


@pytest.mark.slow
def test_custom_recipe_end_to_end_on_made_up_language_codes(tmp_path):
    """Any folder of {train,valid,test}.{SRC,TGT} is a study: here the Bible
    slice renamed to xx -> yy, with three methods and no pruning."""
    import tarfile

    from helpers import BIBLE_ARCHIVE

    data = tmp_path / "corpus"
    data.mkdir()
    with tarfile.open(BIBLE_ARCHIVE) as tar:
        for split, n in (("train", 300), ("valid", 20), ("test", 15)):
            for lang, code in (("es", "xx"), ("en", "yy")):
                lines = tar.extractfile(f"bible.es-en/{split}.{lang}").read().decode().splitlines()
                (data / f"{split}.{code}").write_text("\n".join(lines[:n]) + "\n")
    work = tmp_path / "work"
    settings = {**TINY, "DATA_DIR": str(data), "SRC": "xx", "TGT": "yy", "WORK": str(work),
                "TRAIN_LINES": "0", "VALID_LINES": "0", "TEST_LINES": "0",
                "METHODS": "baseline word_kd seq_kd", "PRUNE_FROM": ""}
    run_recipe("custom", settings)
    assert (work / "bin" / "train.xx-yy.yy.bin").exists() and (work / "distilled" / "train.xx-yy.yy.bin").exists()
    results = json.loads((work / "results.json").read_text())
    # each system evaluated with fairseq, then as the CTranslate2 int8 model a user would ship
    assert [s["name"] for s in results["systems"]] == [
        name for system in ("teacher", "baseline", "word_kd", "seq_kd") for name in (system, f"{system} (ct2 int8)")]
    refs = (data / "test.yy").read_text().splitlines()
    for name in ("teacher", "seq_kd"):
        hyps = (work / f"results.{name}.beam.txt").read_text().splitlines()
        assert len(hyps) == len(refs) == 15
        assert results["systems"][[s["name"] for s in results["systems"]].index(name)]["beam"]["bleu"] == \
            round(BLEU().corpus_score(hyps, [refs]).score, 2)
    page = (work / "results.md").read_text()
    assert "<!-- results custom gpu -->" in page and "| seq_kd |" in page and "xx -> yy" in page


def test_table_compares_with_the_baseline():
    from fairseq_kd.results import markdown_table
    from fairseq_kd.errors import KDError

    def system(name, greedy, beam):
        return {"name": name, "params": 7.6e6, "greedy": {"bleu": greedy, "chrf": 50.0, "sentences_per_s": 100.0},
                "beam": {"beam": 5, "bleu": beam, "chrf": 51.0, "sentences_per_s": 40.0}}

    results = {"systems": [system("baseline", 37.24, 40.0), system("seq_kd", 39.31, 39.96)]}
    rows = markdown_table(results, "baseline").splitlines()
    assert rows[0].endswith("| BLEU greedy vs baseline | BLEU beam vs baseline |")
    assert rows[2].endswith("| +0.0 | +0.0 |")
    assert rows[3].endswith("| 39.3 | 50.0 | 100 | 40.0 | 51.0 | 40 | +2.1 | +0.0 |")  # -0.04 is shown as +0.0, not -0.0
    assert "vs" not in markdown_table(results).splitlines()[0]  # unchanged without --baseline
    with pytest.raises(KDError, match="--baseline teacher: no such system"):
        markdown_table(results, "teacher")
    # --teacher: BLEU against its beam score, and speed as a multiple of its beam speed
    teacher = system("teacher", 38.0, 39.05)
    teacher["beam"]["sentences_per_s"] = 20.0
    rows = markdown_table({"systems": [teacher, *results["systems"]]}, teacher="teacher").splitlines()
    assert rows[0].endswith("| BLEU greedy vs teacher beam | BLEU beam vs teacher beam | sent/s greedy / teacher beam "
                            "| sent/s beam / teacher beam |")
    assert rows[4].endswith("| +0.3 | +0.9 | 5.0x | 2.0x |") and rows[2].endswith("| 5.0x | 1.0x |")
    assert "/ teacher beam: the row's sentences/s over teacher's beam sentences/s (20.0, fairseq)" in "\n".join(rows)
    assert "sent/s" not in markdown_table({"systems": [teacher]}, teacher="teacher", speed=False)
    # a pruned row (a non-zero count well below its parameters) adds the non-zero column; a row
    # evaluated before counts were recorded shows none
    assert "non-zero" not in markdown_table(results).splitlines()[0]
    dense = {**system("seq_kd", 39.3, 40.0), "nonzero_params": 7.6e6 - 128}  # the zero padding embedding
    assert "non-zero" not in markdown_table({"systems": [dense]}).splitlines()[0]
    pruned = {**system("pruned80_seq_kd", 38.0, 39.0), "nonzero_params": 2.1e6}
    rows = markdown_table({"systems": [*results["systems"], pruned]}).splitlines()
    assert rows[0].startswith("| system | params | non-zero params | BLEU greedy |")
    assert [row.split(" | ")[1:3] for row in rows[2:5]] == [["7.6M", "-"], ["7.6M", "-"], ["7.6M", "2.1M"]]


def test_converged_profile_trains_students_to_early_stopping_on_valid_bleu(tmp_path):
    """PROFILE=cpu_converged: the shipped teacher, its vocabulary, no teacher training; every
    student validated by greedy BLEU, stopped by --patience, its epoch checkpoints kept."""
    cmds = dry_run_commands("bible_es_en", tmp_path, PROFILE="cpu_converged", GPUS="")
    teacher = REPO / "examples" / "teacher"
    spm, = [c for c in cmds if c[1:2] == ["spm"]]
    assert train_option(spm, "--model") == str(teacher / "spm.model") and "--vocab-size" not in spm
    preprocess, = [c for c in cmds if c[0] == "fairseq-preprocess"]
    assert train_option(preprocess, "--srcdict") == str(teacher / "dict.txt")
    corpus = [c for c in cmds if c[1:2] == ["corpus"]]
    assert {train_option(c, "--path") for c in corpus} == {str(teacher / "teacher.pt")}
    trained = [c for c in cmds if c[0] == "fairseq-train"]
    names = [train_option(c, "--save-dir").rsplit("/", 1)[1] for c in trained]
    assert names == ["student_" + m for m in ("baseline", "seq_kd", "seq_word_kd", "word_kd", "hybrid_kd",
                                               "ckd", "a2d", "seq_inter", "pruned50_word_kd", "pruned0_word_kd",
                                               "pruned80_word_kd")]
    # word-level terms read the teacher's top-8 from caches built once over the folder each trains on
    caches = {train_option(c, "--out").rsplit("/", 1)[1]: c[2].rsplit("/", 1)[1]
              for c in cmds if c[1:2] == ["cache-teacher"]}
    assert caches == {"teacher_cache": "bin", "teacher_cache_distilled": "distilled"}
    # (the pruned word_kd students retrain as word_kd did, from the same cache)
    cached = {"student_word_kd": "teacher_cache", "student_hybrid_kd": "teacher_cache",
              "student_seq_word_kd": "teacher_cache_distilled", "student_pruned50_word_kd": "teacher_cache",
              "student_pruned0_word_kd": "teacher_cache", "student_pruned80_word_kd": "teacher_cache"}
    for name, cmd in zip(names, trained):
        if name in cached:
            assert train_option(cmd, "--teacher-cache").rsplit("/", 1)[1] == cached[name]
            assert train_option(cmd, "--kd-topk") == "8" and "--teacher-path" not in cmd
        else:
            assert train_option(cmd, "--teacher-path") == str(teacher / "teacher.pt")
    for cmd in trained:
        assert "--eval-bleu" in cmd and train_option(cmd, "--best-checkpoint-metric") == "bleu"
        assert "--maximize-best-checkpoint-metric" in cmd and "--no-epoch-checkpoints" not in cmd
        assert json.loads(train_option(cmd, "--eval-bleu-args"))["beam"] == 1
        assert train_option(cmd, "--eval-bleu-remove-bpe") == "sentencepiece"
        assert int(train_option(cmd, "--patience")) > 0 and "--max-update" not in cmd
        assert train_option(cmd, "--arch") == "transformer_student_tiny"
    seq_word = trained[names.index("student_seq_word_kd")]
    assert seq_word[1].endswith("/distilled") and train_option(seq_word, "--word-kd-alpha") == "0.5"
    exported = [train_option(c, "--path") for c in cmds if c[1:2] == ["export"]]
    # the checkpoint step (after the students) chooses best or the average: a dry run names its placeholder
    assert {p.rsplit("/", 1)[1] for p in exported} == {"checkpoint_best_or_avg5.pt"}
    checkpoint = [c for c in cmds if c[1:2] == ["evaluate"] and "valid" in c]
    assert [train_option(c, "--checkpoint").rsplit("/", 2)[1:] for c in checkpoint] == [
        ["student_baseline", "checkpoint_best.pt"], ["student_baseline", "checkpoint_avg5.pt"]]
    for cmd in cmds:
        check_options(cmd)


@pytest.mark.parametrize("best_epoch, resumes", [(13, False), (14, True)])
def test_student_whose_best_checkpoint_is_patience_epochs_old_is_not_resumed(tmp_path, best_epoch, resumes):
    # cpu_converged's --patience 6; checkpoint_last at the end of epoch 18 (iterator at 19)
    student = tmp_path / "bible_es_en" / "student_baseline"
    student.mkdir(parents=True)
    for name, epoch in (("best", best_epoch), ("last", 19)):
        torch.save({"extra_state": {"train_iterator": {"epoch": epoch}}}, student / f"checkpoint_{name}.pt")
    proc = run_recipe("bible_es_en", {"DRY_RUN": "1", "WORK": str(tmp_path / "bible_es_en"),
                                      "PROFILE": "cpu_converged", "METHODS": "baseline"}, "students")
    trains = [line for line in proc.stdout.splitlines() if line.startswith("RUN: fairseq-train")]
    assert bool(trains) == resumes
    assert ("student_baseline: early-stopped (its best checkpoint is 6 epochs old, --patience 6)"
            in proc.stdout) != resumes


def test_teacher_path_replaces_teacher_training_and_its_vocabulary_encodes_the_corpus(tmp_path):
    teacher = REPO / "examples" / "teacher"
    cmds = dry_run_commands("custom", tmp_path, "spm", "binarize", "teacher", "corpus", "evaluate",
                            TEACHER_PATH=str(teacher / "teacher.pt"))
    assert [train_option(c, "--model") for c in cmds if c[1:2] == ["spm"]] == [str(teacher / "spm.model")]
    preprocess, = [c for c in cmds if c[0] == "fairseq-preprocess"]
    assert train_option(preprocess, "--srcdict") == str(teacher / "dict.txt")
    saved = [train_option(c, "--save-dir").rsplit("/", 1)[1] for c in cmds if c[0] == "fairseq-train"]
    assert saved == []  # the teacher step trains nothing
    evaluated = [train_option(c, "--checkpoint") for c in cmds if c[1:2] == ["evaluate"]]
    assert evaluated[0] == str(teacher / "teacher.pt")
    # a teacher without its SentencePiece model beside it: one line naming the file, nothing run
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "teacher.pt").write_bytes((teacher / "teacher.pt").read_bytes()[:64])
    proc = run_recipe("custom", {"WORK": str(tmp_path / "w"), "DATA_DIR": str(tmp_path), "SRC": "de", "TGT": "en",
                                 "GPUS": "cpu", "TEACHER_PATH": str(lone / "teacher.pt")}, "spm", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].endswith(
        f"{lone}/spm.model not found (set TEACHER_SPM and TEACHER_DICT to its SentencePiece model and dictionary)")
    assert not (tmp_path / "w" / "pieces").exists()


def test_gpu_profile_without_a_gpu_is_refused_and_early_stopping_ends_its_training(tmp_path):
    # this machine has no nvidia-smi: GPUS=auto finds no GPU
    proc = run_recipe("custom", {"DRY_RUN": "1", "WORK": str(tmp_path / "w"), "DATA_DIR": str(tmp_path),
                                 "SRC": "de", "TGT": "en", "GPUS": "auto"}, check=False)
    assert proc.returncode != 0 and "RUN:" not in proc.stdout
    assert "GPUS=auto found no GPU (nvidia-smi lists none): PROFILE=gpu" in proc.stderr.strip().splitlines()[-1]
    cpu = run_recipe("custom", {"DRY_RUN": "1", "WORK": str(tmp_path / "w"), "DATA_DIR": str(tmp_path),
                                "SRC": "de", "TGT": "en", "GPUS": "auto", "PROFILE": "cpu"}, "spm")
    assert "GPUS=auto: no GPU found, the CPU" in cpu.stdout
    # gpu: no clock limit sized for one corpus on one GPU; --patience decides
    trained = [c for c in dry_run_commands("custom", tmp_path, "teacher", "students", "prune")
               if c[0] == "fairseq-train"]
    assert trained and all("--stop-time-hours" not in c and "--patience" in c for c in trained)


def test_converged_report_adds_curves_significance_and_hypotheses(tmp_path):
    """PROFILE=cpu_converged's report: every student's learning curve, the table against the
    teacher and with paired significance against the baseline, the test hypotheses shipped."""
    work, docs = tmp_path / "bible_es_en", tmp_path / "docs"
    cmds = dry_run_commands("bible_es_en", tmp_path, "report", PROFILE="cpu_converged", GPUS="",
                            RESULTS_MD=str(docs / "results.md"), PLOT_DIR=str(docs))
    for cmd in cmds:
        check_options(cmd)
    kd = {c[1]: c for c in cmds if c[0] == "fairseq-kd" and c[1] != "plot"}
    table, curves, hypotheses = kd["table"], kd["curves"], kd["hypotheses"]
    assert train_option(table, "--baseline") == "baseline" and train_option(table, "--teacher") == "teacher"
    assert train_option(table, "--significance") == str(work / "raw" / "test.en")
    students = ["baseline", "seq_kd", "seq_word_kd", "word_kd", "hybrid_kd", "ckd", "a2d", "seq_inter", "pruned50_word_kd",
                "pruned0_word_kd", "pruned80_word_kd"]
    assert [curves[i + 1] for i, a in enumerate(curves) if a == "--log"] == [
        f"{name}={work}/logs/student_{name}.log" for name in students]
    assert train_option(curves, "--metric") == "bleu" and train_option(curves, "--baseline") == "baseline"
    assert train_option(curves, "--out") == str(docs / "bible_es_en_cpu_converged.curves.png")
    assert hypotheses[2] == str(work / "results.json") and train_option(hypotheses, "--ref") == str(work / "raw" / "test.en")
    assert train_option(hypotheses, "--out") == str(docs / "hypotheses" / "bible_es_en_cpu_converged")
    # the other profiles' reports are as they were
    cmds = dry_run_commands("bible_es_en", tmp_path, "report", PROFILE="cpu", GPUS="")
    assert [c[1] for c in cmds if c[0] == "fairseq-kd"] == ["plot", "plot", "table"]
    assert [c for c in cmds if c[1:2] == ["table"]][0][3:] == ["--baseline", "baseline"]


def test_converged_report_page_links_relative_files_and_rescores(tmp_path, monkeypatch):
    """The report step on a work folder of made-up results and training logs: the page's
    section has the curves, the convergence table and the significance columns, links its
    files relative to itself and names no path of this machine."""
    from test_curves import train_line, valid_line
    from test_study import make_study

    monkeypatch.delenv("SACREBLEU_SEED", raising=False)
    work, docs = tmp_path / "work", tmp_path / "docs"
    (work / "raw").mkdir(parents=True)
    (work / "logs").mkdir()
    rows = {"teacher": (0.1, 0.05), "baseline": (0.4, 0.3), "seq_kd": (0.3, 0.25)}
    results, ref = make_study(str(work), rows, ref_path=work / "raw" / "test.en")
    for split, lang in (("valid", "en"), ("train", "es")):
        (work / "raw" / f"{split}.{lang}").write_text("a verse\n" * 7)
    (work / "done").mkdir()
    # word_kd is still training: a curve so far, no stamp, no results row
    for name, bleus in (("baseline", (10.0, 12.0, 11.0)), ("seq_kd", (12.0, 14.5, 14.0)), ("word_kd", (9.0, 11.5))):
        lines = [line for k, b in enumerate(bleus, 1) for line in (valid_line(k, 100 * k, b, 6.0),
                                                                    train_line(k, 100 * k, 720, 800 * k))]
        (work / "logs" / f"student_{name}.log").write_text("\n".join(lines) + "\n")
        if name != "word_kd":
            (work / "done" / f"student_{name}").touch()
    # hybrid_kd has just begun: a log without a validation yet
    (work / "logs" / "student_hybrid_kd.log").write_text(train_line(1, 50, 720, 400) + "\n")
    # seq_kd was adopted from a shipped folder (STUDENTS_FROM): its curve is a training record
    from fairseq_kd.curves import read_log, record_text, training_record
    log = work / "logs" / "student_seq_kd.log"
    (work / "logs" / "student_seq_kd.json").write_text(record_text(training_record(
        read_log(str(log), "seq_kd"), "bleu", "checkpoint_avg5.pt", "test")))
    log.unlink()
    # the checkpoint step's comparison on valid and its choice
    chosen = json.loads(open(results).read())
    chosen["systems"] = [{**system, "name": f"baseline ({kind})"} for system, kind in
                         zip([s for s in chosen["systems"] if s["name"] in ("baseline", "seq_kd")], ("best", "avg5"))]
    (work / "checkpoints.json").write_text(json.dumps(chosen))
    (work / "checkpoint_choice").write_text("avg5\n")
    run_recipe("bible_es_en", {"WORK": str(work), "PROFILE": "cpu_converged", "GPUS": "cpu", "CT2_QUANT": "",
                               "METHODS": "baseline seq_kd word_kd hybrid_kd", "PRUNE_FROM": "word_kd",
                               "PRUNE_RATIO": "0.8", "RESULTS_MD": str(docs / "results.md"), "PLOT_DIR": str(docs)},
               "report")
    page = (docs / "results.md").read_text()
    assert ("Not finished when this page was written (no row yet; a curve as far as it got): word_kd, hybrid_kd, "
            "pruned_word_kd." in page)
    assert "| word_kd (training) | 11.50 | 200 (2) | 200 (2) | 0 | 0.40 | 200 (1.00) |" in page
    # not validated yet: no curve
    assert "hybrid_kd" not in page.split("### Convergence")[1].split("### Settings")[0]
    assert "| adopted students | seq_kd: trained to the end by this recipe in an earlier work folder" in page
    assert "not trained again: evaluated from the shipped float16 weights" in page  # word_kd is the one pruned
    assert "The adopted students (seq_kd) trained as their shipped README says (`STUDENT_JOBS` there)." in page
    assert ("Students trained 2 at a time (`STUDENT_JOBS`) sharing the machine: each row's hours include that,\n"
            "and the wall clock above is what the runs with a log took together.") in page
    assert re.search(r"^Wall clock: \d+\.\d\d h in which at least one of the 2 runs with a log was running .*; seq_kd: a training record", page, re.M)
    assert str(tmp_path) not in page and str(REPO) not in page
    assert "![validation BLEU by update](bible_es_en_cpu_converged.curves.png)" in page
    assert (docs / "bible_es_en_cpu_converged.curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # within 1 BLEU of the baseline's best (12.0): the baseline at update 200, seq_kd at 100
    assert "| seq_kd | 14.50 | 200 (2) | 300 (3) | 1 | 0.60 | 100 (0.50) |" in page
    assert ("| BLEU greedy vs teacher beam | BLEU beam vs teacher beam | sent/s greedy / teacher beam "
            "| sent/s beam / teacher beam | BLEU greedy 95% CI |") in page
    assert re.search(r"\| seq_kd \|.* \| [+-]\d+\.\d \(p \d\.\d{4}\*?\) \|", page)
    assert "the 7 sentences of `raw/valid.en`" in page
    assert "[`hypotheses/bible_es_en_cpu_converged/`](hypotheses/bible_es_en_cpu_converged/)" in page
    shipped = docs / "hypotheses" / "bible_es_en_cpu_converged"
    assert sorted(p.name for p in shipped.iterdir()) == sorted(
        [f"results.{n}.{d}.txt.xz" for n in rows for d in ("greedy", "beam")] + ["test.en.xz", "README.md"]
        + ["results.json", "training.baseline.json", "training.seq_kd.json"])  # word_kd: not finished
    assert [(r["num_updates"], r["bleu"]) for r in json.loads((shipped / "training.seq_kd.json").read_text())[
        "validations"]] == [(100, 12.0), (200, 14.5), (300, 14.0)]
    assert str(tmp_path) not in (shipped / "results.json").read_text()
    # which checkpoint: the comparison on valid, the choice every student is evaluated from
    assert "### Which checkpoint" in page and "| baseline (avg5) |" in page and "| baseline (best) |" in page
    assert "greedy BLEU, `checkpoint_avg5.pt`, is the kind every student above is evaluated" in page
    assert "evaluated (and pruned) from each student's `checkpoint_avg5.pt` (the mean of its last 5 checkpoints" in page
    # Kim & Rush's rows beside ours; what was not run says so
    assert "### Beside Kim & Rush (2016)" in page and "| 2x500 Seq-KD | 84M | 18.9 | 19.0 | -0.6 / -0.5 |" in page
    assert "| `word_kd` | not run |" in page
    # the pruned row beside theirs is this study's student pruned to 80% (PRUNE_FROM, PRUNE_RATIO)
    assert "| `pruned_word_kd` (80% pruned) | not run |" in page
    # the repository's paths, not this machine's
    assert "--teacher-path examples/teacher/teacher.pt --criterion seq_kd" in page
    assert "| teacher | `examples/teacher/teacher.pt` (TEACHER_PATH: not trained by the recipe) |" in page
    # one student at a time: each row's hours its own, the wall clock what they took together
    run_recipe("bible_es_en", {"WORK": str(work), "PROFILE": "cpu_converged", "GPUS": "cpu", "CT2_QUANT": "",
                               "STUDENT_JOBS": "1", "METHODS": "baseline seq_kd", "RESULTS_MD": str(docs / "results.md"),
                               "PLOT_DIR": str(docs)}, "report")
    page = (docs / "results.md").read_text()
    assert ("Students trained one at a time in the run of this recipe (`STUDENT_JOBS=1`): each row's hours are its "
            "own run's,\nslower wherever something else shared the machine; the wall clock above is what the runs "
            "with a log took together.") in page and "at a time (`STUDENT_JOBS`)" not in page


def test_custom_recipe_keeps_each_profiles_work_in_its_own_folder(tmp_path):
    base = {"DRY_RUN": "1", "DATA_DIR": str(tmp_path), "SRC": "de", "TGT": "en", "GPUS": "cpu"}
    folders = set()
    for profile in ("gpu", "cpu", "cpu_converged"):
        out = run_recipe("custom", {**base, "PROFILE": profile}, "prepare").stdout
        folders.add(re.search(r"work folder (\S+),", out).group(1))
    assert {f.rsplit("/", 1)[1] for f in folders} == {"custom_de-en", "custom_de-en_cpu", "custom_de-en_cpu_converged"}


def test_onpolicy_kd_is_a_method_name_trained_on_the_distilled_corpus(tmp_path):
    cmds = dry_run_commands("bible_es_en", tmp_path, "students", PROFILE="cpu", METHODS="onpolicy_kd")
    train, = [c for c in cmds if c[0] == "fairseq-train"]
    assert check_options(train) == ("transformer_student_tiny", "onpolicy_kd")
    assert train[1].endswith("/distilled") and train_option(train, "--jsd-beta") == "0.5"


def test_corpus_variants_and_selective_kd_are_method_names(tmp_path):
    """Each seq_kd variant builds its own corpus with fairseq-kd corpus's options and trains seq_kd on it;
    word_kd_selective trains word_kd on gold with global selection."""
    methods = "seq_kd seq_kd_mbr seq_kd_mbr_n seq_kd_nbest seq_kd_filtered word_kd_selective"
    cmds = dry_run_commands("bible_es_en", tmp_path, "corpus", "students", PROFILE="cpu", METHODS=methods)
    corpora = {c[c.index("--out") + 1].rsplit("/", 1)[1]: c for c in cmds if c[1:2] == ["corpus"]}
    for cmd in corpora.values():
        check_options(cmd)
    assert sorted(corpora) == ["distilled", "distilled_filtered", "distilled_mbr", "distilled_mbr_n",
                               "distilled_nbest"]
    # MBR-n decodes first, whatever METHODS' order: MBR-1 merges from its chunks
    assert list(corpora).index("distilled_mbr_n") < list(corpora).index("distilled_mbr")
    assert train_option(corpora["distilled_mbr"], "--select") == "mbr"
    assert train_option(corpora["distilled_mbr"], "--candidates") == "8" and "--keep" not in corpora["distilled_mbr"]
    assert train_option(corpora["distilled_mbr_n"], "--keep") == "3"
    assert train_option(corpora["distilled_nbest"], "--keep") == "3" and "--select" not in corpora["distilled_nbest"]
    assert train_option(corpora["distilled_filtered"], "--filter") == "all"
    trained = {c[c.index("--save-dir") + 1].rsplit("/", 1)[1]: c for c in cmds if c[0] == "fairseq-train"}
    for name in ("mbr", "mbr_n", "nbest", "filtered"):
        cmd = trained[f"student_seq_kd_{name}"]
        assert check_options(cmd)[1] == "seq_kd" and cmd[1].endswith(f"/distilled_{name}")
    selective = trained["student_word_kd_selective"]
    assert check_options(selective)[1] == "word_kd" and selective[1].endswith("/bin")
    assert train_option(selective, "--kd-select") == "global"


def test_a_study_reports_in_a_section_of_its_own(tmp_path, monkeypatch):
    """STUDY=techniques beside the profile's own section: its own section, heading, plots and
    corpora line; the profile's section stays as it was."""
    from test_study import make_study

    monkeypatch.delenv("SACREBLEU_SEED", raising=False)
    work, docs = tmp_path / "work", tmp_path / "docs"
    (work / "raw").mkdir(parents=True)
    make_study(str(work), {"seq_kd": (0.3, 0.25), "seq_kd_filtered": (0.2, 0.2)}, ref_path=work / "raw" / "test.en")
    (work / "raw" / "train.es").write_text("a verse\n" * 7)
    docs.mkdir()
    profile_section = "<!-- results bible_es_en cpu -->\n## the CPU study\n<!-- /results bible_es_en cpu -->"
    (docs / "results.md").write_text(f"# Results\n\n{profile_section}\n")
    env = {"WORK": str(work), "PROFILE": "cpu", "STUDY": "techniques", "GPUS": "cpu", "CT2_QUANT": "",
           "METHODS": "seq_kd seq_kd_filtered", "PRUNE_FROM": "", "RESULTS_MD": str(docs / "results.md"),
           "PLOT_DIR": str(docs)}
    run_recipe("bible_es_en", env, "report")
    page = (docs / "results.md").read_text()
    assert page.startswith(f"# Results\n\n{profile_section}\n\n<!-- results bible_es_en cpu techniques -->\n"
                           "## bible_es_en, PROFILE=cpu, STUDY=techniques\n")
    assert "![BLEU vs speed](bible_es_en_cpu_techniques.speed.png)" in page and "| sent/s greedy |" in page
    assert (docs / "bible_es_en_cpu_techniques.speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # REPORT_SPEED=0: no speed anywhere on the page, and no speed plot
    (docs / "bible_es_en_cpu_techniques.speed.png").unlink()
    run_recipe("bible_es_en", {**env, "REPORT_SPEED": "0"}, "report")
    page = (docs / "results.md").read_text()
    assert "sent/s" not in page and "BLEU vs speed" not in page and "not reported (REPORT_SPEED=0" in page
    assert not (docs / "bible_es_en_cpu_techniques.speed.png").exists()
    assert "| corpora | Seq-KD beam 5; seq_kd_filtered: the beam corpus with `--filter all` |" in page


def shipped_student(folder, name, dictionary, checkpoint="checkpoint_avg5.pt"):
    """A folder as ship_students writes it, as far as adoption reads it: student.pt (bytes of
    its own), dict.txt and training.json."""
    folder = folder / name
    folder.mkdir(parents=True)
    (folder / "student.pt").write_bytes(f"weights of {name}".encode())
    (folder / "dict.txt").write_text(dictionary)
    (folder / "training.json").write_text(json.dumps({
        "version": 1, "name": name, "metric": "bleu", "checkpoint": checkpoint, "train_hours": 1.5, "source": "test",
        "validations": [{"epoch": 1, "num_updates": 100, "bleu": 10.0}, {"epoch": 2, "num_updates": 200, "bleu": 12.0}]}))
    return folder


def test_students_shipped_in_students_from_are_adopted_not_trained(tmp_path):
    """STUDENTS_FROM: a method shipped there (student.pt, training.json) becomes the study's
    trained student: its weights the checkpoint the study uses, its training.json the curve the
    report reads, the prune step prunes it; the other methods train.  Another checkpoint kind
    or another dictionary is a one-line error."""
    work, stub, shipped = tmp_path / "work", tmp_path / "bin", tmp_path / "shipped"
    for folder in (work / "bin", stub):
        folder.mkdir(parents=True)
    (work / "bin" / "dict.en.txt").write_text("the 5\n")
    for name in ("baseline", "seq_kd"):
        shipped_student(shipped, name, "the 5\n")
    for tool in ("fairseq-kd", "fairseq-train"):
        (stub / tool).write_text(FAKE_TOOL)
        (stub / tool).chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    settings = {"WORK": str(work), "GPUS": "cpu", "PROFILE": "cpu_converged", "STUDENT_JOBS": "1",
                "METHODS": "baseline seq_kd word_kd", "STUDENTS_FROM": str(shipped), "STUDENT_CHECKPOINT": "average",
                "PRUNE_FROM": "seq_kd", "PRUNE_RATIO": "0.5", "FAKE_CALLS": str(calls), "FAKE_SECONDS": "0",
                "PATH": f"{stub}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"}
    out = run_recipe("bible_es_en", settings, "students", "prune").stdout
    started = [json.loads(line)[2:] for line in calls.read_text().splitlines() if json.loads(line)[0] == "start"]
    trained = [c[c.index("--save-dir") + 1] for c in started if c[0] == "fairseq-train"]
    assert trained == [f"{work}/student_word_kd", f"{work}/student_pruned_seq_kd"]
    for name in ("baseline", "seq_kd"):
        assert (work / f"student_{name}" / "checkpoint_avg5.pt").read_bytes() == f"weights of {name}".encode()
        assert (work / "logs" / f"student_{name}.json").read_bytes() == (shipped / name / "training.json").read_bytes()
        assert (work / "done" / f"student_{name}").exists()
        assert f"student {name}: adopted from {shipped}/{name}" in out
    prunes = [c for c in started if c[1:2] == ["prune"]]
    assert [c[c.index("--path") + 1] for c in prunes] == [f"{work}/student_seq_kd/checkpoint_avg5.pt"]
    assert not any(c[1:2] == ["average"] for c in started)  # the shipped file is the average
    # the report's curves: the adopted students' training.json, the trained ones' logs
    cmds = dry_run_commands("bible_es_en", tmp_path, "report", **{k: v for k, v in settings.items() if k != "PATH"})
    curves = [c for c in cmds if c[1:2] == ["curves"]][0]
    assert [curves[i + 1] for i, a in enumerate(curves) if a == "--log"] == [
        f"baseline={work}/logs/student_baseline.json", f"seq_kd={work}/logs/student_seq_kd.json",
        f"word_kd={work}/logs/student_word_kd.log", f"pruned_seq_kd={work}/logs/student_pruned_seq_kd.log"]
    # a folder shipped from another kind of checkpoint, or with another dictionary: refused
    for name, folder_args, message in (
            ("best", ("the 5\n", "checkpoint_best.pt"),
             "ships its checkpoint_best.pt, the study uses checkpoint_avg5.pt (STUDENT_CHECKPOINT=average)"),
            ("dict", ("a 5\n",), "dict.txt is not the study's dictionary")):
        other = tmp_path / f"shipped_{name}"
        shipped_student(other, "baseline", *folder_args)
        (tmp_path / f"work_{name}" / "bin").mkdir(parents=True)
        (tmp_path / f"work_{name}" / "bin" / "dict.en.txt").write_text("the 5\n")
        proc = run_recipe("bible_es_en", {**settings, "WORK": str(tmp_path / f"work_{name}"), "METHODS": "baseline",
                                          "STUDENTS_FROM": str(other)}, "students", check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_export_and_evaluate_take_only_the_students_that_finished(tmp_path):
    """A study reports each student as it finishes: export and evaluate skip a student whose
    training has not finished (no stamp) and say so; the finished ones and the teacher go on."""
    work, stub = tmp_path / "work", tmp_path / "bin"
    for folder in (work / "done", work / "student_baseline", work / "raw", stub):
        folder.mkdir(parents=True)
    (work / "done" / "student_baseline").touch()
    (work / "student_baseline" / "checkpoint_last.pt").touch()
    (work / "student_baseline" / "checkpoint_avg5.pt").touch()  # newer than last: not averaged again
    (stub / "fairseq-kd").write_text(FAKE_FAIRSEQ_KD)
    (stub / "fairseq-kd").chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    out = run_recipe("bible_es_en", {"WORK": str(work), "GPUS": "cpu", "PROFILE": "cpu_converged", "CT2_QUANT": "",
                                     "METHODS": "baseline word_kd", "PRUNE_FROM": "", "STUDENT_CHECKPOINT": "average",
                                     "FAKE_CALLS": str(calls), "FAKE_SCORES": json.dumps({"teacher": 30, "baseline": 20}),
                                     "PATH": f"{stub}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"},
                     "export", "evaluate").stdout
    made = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [(c[0], c[c.index("--out") + 1]) for c in made if c[0] == "export"] == [
        ("export", f"{work}/exported/baseline.pt")]
    assert [c[c.index("--name") + 1] for c in made if c[0] == "evaluate"] == ["teacher", "baseline"]
    assert "not yet for word_kd (training not finished)" in out
