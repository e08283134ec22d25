"""The recipes' finetune step (FINETUNE_FROM): every run starts from one trained student's
checkpoint with a fresh optimizer, a constant learning rate and the same wall-clock budget
counted from the checkpoint's own training time; its students get rows, a table of their
own against the continued method (paired bootstrap) and Settings rows on the results page.
(slow) A real fine-tune of a tiny student: it starts from the given weights, stops at its
budget, and a killed run resumes from its own checkpoint to the same total."""
import os
import re
import shutil
import subprocess

import pytest
import torch

from fairseq_kd import cli
from fairseq_kd.results import read_results
from fairseq_kd.study import paired_significance
import helpers
from helpers import BIN, REPO, STUDENT_ARCH, fairseq_train
from test_recipes import check_options, dry_run_commands, run_recipe, train_option
from test_study import make_study

RUNS = "seq_kd onpolicy_kd_b0 onpolicy_kd_b0.5 onpolicy_kd_b1"


def fake_checkpoint(path, updates, seconds, lr=None):
    """What the recipe reads of a fairseq checkpoint: its updates, training time and last lr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"optimizer_history": [{"criterion_name": "SeqKDCriterion", "num_updates": updates}],
             "extra_state": {"previous_training_time": seconds, "train_iterator": {"epoch": 3}}}
    if lr is not None:
        state["last_optimizer_state"] = {"state": {}, "param_groups": [{"lr": lr}]}
    torch.save(state, path)


def pipeline(script, **variables):
    """Run bash SCRIPT with recipes/common/pipeline.sh sourced and VARIABLES set: its stdout."""
    env = {**helpers.env(), "RECIPE": "test", **{k: str(v) for k, v in variables.items()}}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    for name in ("WORK", "DRY_RUN", "FINETUNE_MINUTES", "FINETUNE_LR", "STUDENT_JOBS"):
        if name not in variables:
            env.pop(name, None)
    proc = subprocess.run(["bash", "-c", f'source "{REPO}/recipes/common/pipeline.sh"; {script}'],
                          capture_output=True, text=True, env=env, check=True)
    return proc.stdout


# ---------------------------------------------------------------- the budget

def test_budget_is_the_checkpoints_training_time_plus_the_minutes_and_is_kept_by_the_run(tmp_path):
    # fairseq restores extra_state["previous_training_time"] even with every --reset-*, and stops
    # when the cumulative time passes --stop-time-hours: the budget counts from the checkpoint's
    source = tmp_path / "student_seq_kd" / "checkpoint_best.pt"
    fake_checkpoint(source, 4321, 5400.0, lr=3.2e-4)
    assert pipeline(f'checkpoint_facts "{source}"') == "4321 1.500000 0.00032\n"
    run = tmp_path / "student_ft_seq_kd"
    budget = dict(FINETUNE_MINUTES=30, FINETUNE_LR="1e-4", STUDENT_JOBS=2)
    # a dry run reads it and writes nothing
    assert pipeline(f'finetune_budget "{source}" "{run}"', DRY_RUN=1, **budget) == "1.500000 2.000000 30 1e-4 2\n"
    assert not run.exists()
    assert pipeline(f'finetune_budget "{source}" "{run}"', **budget) == "1.500000 2.000000 30 1e-4 2\n"
    assert (run / "finetune_budget").read_text() == "1.500000 2.000000 30 1e-4 2\n"
    # a resumed run keeps its budget, whatever the settings (or the start checkpoint) are now
    fake_checkpoint(source, 5000, 9000.0)
    assert pipeline(f'finetune_budget "{source}" "{run}"', FINETUNE_MINUTES=5, FINETUNE_LR="1", STUDENT_JOBS=1) \
        == "1.500000 2.000000 30 1e-4 2\n"
    # a dry run without the checkpoint counts from 0 h
    assert pipeline(f'finetune_budget "{tmp_path}/none.pt" "{tmp_path}/other"', DRY_RUN=1, **budget) \
        == "0.000000 0.500000 30 1e-4 2\n"


def test_run_names_map_to_methods_and_beta(tmp_path):
    names = pipeline('for r in seq_kd onpolicy_kd onpolicy_kd_b0 onpolicy_kd_b0.5 onpolicy_kd_b1; do '
                     'echo "$r: $(finetune_method $r) | $(finetune_args $r)"; done',
                     WORK=tmp_path, LABEL_SMOOTHING=0.1, TEACHER_PATH="t.pt", CACHE_METHODS="",
                     FINETUNE_ARGS_onpolicy_kd_b0_5="--sample-temperature 0.5")
    assert names.splitlines() == [
        "seq_kd: seq_kd | --label-smoothing 0.1 --task translation_kd --teacher-path t.pt --criterion seq_kd ",
        "onpolicy_kd: onpolicy_kd | --task translation_kd --teacher-path t.pt --criterion onpolicy_kd "
        "--onpolicy-ratio 0.5 --jsd-beta 0.5 ",
        "onpolicy_kd_b0: onpolicy_kd | --task translation_kd --teacher-path t.pt --criterion onpolicy_kd "
        "--onpolicy-ratio 0.5 --jsd-beta 0 ",
        "onpolicy_kd_b0.5: onpolicy_kd | --task translation_kd --teacher-path t.pt --criterion onpolicy_kd "
        "--onpolicy-ratio 0.5 --jsd-beta 0.5 --sample-temperature 0.5",
        "onpolicy_kd_b1: onpolicy_kd | --task translation_kd --teacher-path t.pt --criterion onpolicy_kd "
        "--onpolicy-ratio 0.5 --jsd-beta 1 "]


# ---------------------------------------------------------------- the commands (dry run)

def test_without_finetune_from_nothing_is_fine_tuned(tmp_path):
    cmds = dry_run_commands("bible_es_en", tmp_path, "finetune", "export", "evaluate", "report", PROFILE="cpu")
    assert not any("ft_" in arg for cmd in cmds for arg in cmd)


def test_finetune_commands_start_every_run_from_one_checkpoint_with_the_same_budget(tmp_path):
    work = tmp_path / "bible_es_en"
    source = work / "student_seq_kd" / "checkpoint_best.pt"
    fake_checkpoint(source, 20000, 7.25 * 3600, lr=2.2e-4)
    (work / "checkpoint_choice").write_text("best\n")  # the checkpoint step chose each student's best
    cmds = dry_run_commands("bible_es_en", tmp_path, "finetune", "export", "evaluate", "report",
                            PROFILE="cpu_converged", GPUS="", FINETUNE_FROM="seq_kd", FINETUNE_METHODS=RUNS,
                            FINETUNE_MINUTES="45", FINETUNE_ARGS_onpolicy_kd_b0_5="--sample-temperature 0.5")
    trained = {train_option(c, "--save-dir").rsplit("/", 1)[1]: c for c in cmds if c[0] == "fairseq-train"}
    assert list(trained) == ["student_ft_" + r for r in RUNS.split()]
    betas = {"student_ft_onpolicy_kd_b0": 0.0, "student_ft_onpolicy_kd_b0.5": 0.5, "student_ft_onpolicy_kd_b1": 1.0}
    from fairseq import options
    for name, cmd in trained.items():
        criterion = "seq_kd" if name == "student_ft_seq_kd" else "onpolicy_kd"
        assert check_options(cmd) == ("transformer_student_tiny", criterion)
        ns = options.parse_args_and_arch(options.get_training_parser(), cmd[1:])
        # the same weights, a fresh optimizer and schedule: fairseq's --finetune-from-model resets
        # optimizer, lr scheduler, meters and data loader (and is used only without checkpoint_last.pt)
        assert ns.finetune_from_model == str(source) and ns.restore_file == "checkpoint_last.pt"
        assert not (ns.reset_optimizer or ns.reset_lr_scheduler or ns.reset_dataloader or ns.reset_meters)
        # the same constant rate, seed, data and budget for every run
        assert ns.lr_scheduler == "fixed" and ns.lr == [1e-4] and ns.warmup_updates == 0 and ns.optimizer == "adam"
        assert ns.seed == 1 and cmd[1] == str(work / "distilled")
        assert train_option(cmd, "--stop-time-hours") == "8.000000"  # 7.25 h + 45 min
        assert ns.max_update == 0 and ns.max_epoch == 0 and "--patience" not in cmd
        assert ns.disable_validation and ns.no_epoch_checkpoints and ns.save_interval_updates == 200
        if name in betas:
            assert ns.jsd_beta == betas[name] and cmd.count("--jsd-beta") == 1
    assert "--sample-temperature" in trained["student_ft_onpolicy_kd_b0.5"]
    # every fine-tuned run is a student: exported from the end of its budget, evaluated, reported
    exported = {train_option(c, "--out").rsplit("/", 1)[1]: train_option(c, "--path")
                for c in cmds if c[1:2] == ["export"]}
    for run in RUNS.split():
        assert exported[f"ft_{run}.pt"] == str(work / f"student_ft_{run}" / "checkpoint_last.pt")
    evaluated = [train_option(c, "--name") for c in cmds if c[1:2] == ["evaluate"]]
    assert evaluated.count("ft_onpolicy_kd_b0.5") == 2  # fairseq and CTranslate2 int8
    tables = [c for c in cmds if c[1:2] == ["table"]]
    assert len(tables) == 2
    ft_table = tables[1]
    assert ft_table[ft_table.index("--systems") + 1:ft_table.index("--baseline")] == [
        "seq_kd", "ft_seq_kd", "ft_onpolicy_kd_b0", "ft_onpolicy_kd_b0.5", "ft_onpolicy_kd_b1"]
    assert train_option(ft_table, "--baseline") == "ft_seq_kd"
    assert train_option(ft_table, "--significance") == str(work / "raw" / "test.en")
    curves, = [c for c in cmds if c[1:2] == ["curves"]]
    assert not any("ft_" in arg for arg in curves)  # they do not validate: no learning curve
    for cmd in cmds:
        check_options(cmd)


@pytest.mark.parametrize("settings, error", [
    ({"FINETUNE_METHODS": "seq_kd_b0.5"},
     "FINETUNE_METHODS: seq_kd_b0.5: _bBETA sets --jsd-beta, an option of onpolicy_kd only"),
    ({"FINETUNE_METHODS": "seq_kd on_policy"}, "unknown method 'on_policy'"),
    ({"FINETUNE_FROM": "ft_seq_kd"}, "FINETUNE_FROM=ft_seq_kd: a fine-tuned student"),
    ({"DRY_RUN": ""}, "student_seq_kd/checkpoint_last.pt not found (train that student first"),
])
def test_finetune_refuses_bad_settings_in_one_line(tmp_path, settings, error):
    proc = run_recipe("bible_es_en", {"DRY_RUN": "1", "GPUS": "cpu", "WORK": str(tmp_path / "w"), "PROFILE": "cpu",
                                      "FINETUNE_FROM": "seq_kd", **settings}, "finetune", check=False)
    assert proc.returncode != 0 and "RUN: fairseq-train" not in proc.stdout
    assert error in proc.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- the report

def test_table_systems_shows_some_rows_with_the_full_tables_p_values(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SACREBLEU_SEED", raising=False)
    results_path, ref = make_study(str(tmp_path))
    assert cli.main(["table", results_path, "--systems", "student", "baseline", "--baseline", "baseline",
                     "--significance", ref, "--bootstrap-samples", "300"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:4]] == ["student", "baseline"] and lines[4] == ""
    full = paired_significance(results_path, read_results(results_path), ref, "baseline", 300)
    for i, d in enumerate(("greedy", "beam")):
        assert f"(p {full[d]['student']['p']:.4f}" in lines[2].split("|")[9 + i]
    assert cli.main(["table", results_path, "--systems", "student", "--baseline", "baseline"]) == 2
    assert "--baseline baseline: not one of --systems" in capsys.readouterr().err
    assert cli.main(["table", results_path, "--systems", "pupil"]) == 2
    assert "--systems pupil: no such system in the results" in capsys.readouterr().err


def test_report_tests_the_fine_tuned_rows_against_the_continued_run_and_says_what_each_did(tmp_path, monkeypatch):
    monkeypatch.delenv("SACREBLEU_SEED", raising=False)
    work, docs = tmp_path / "work", tmp_path / "docs"
    (work / "raw").mkdir(parents=True)
    rows = {"seq_kd": (0.3, 0.25), "ft_seq_kd": (0.29, 0.25), "ft_onpolicy_kd_b1": (0.2, 0.15)}
    make_study(str(work), rows, ref_path=work / "raw" / "test.en")
    (work / "raw" / "train.es").write_text("a verse\n" * 7)
    fake_checkpoint(work / "student_seq_kd" / "checkpoint_last.pt", 1600, 3 * 3600, lr=7.91e-4)
    for run, updates, seconds in (("seq_kd", 2345, 3 * 3600 + 3605), ("onpolicy_kd_b1", 876, 3 * 3600 + 3612)):
        fake_checkpoint(work / f"student_ft_{run}" / "checkpoint_last.pt", updates, seconds, lr=1e-4)
        (work / f"student_ft_{run}" / "finetune_budget").write_text("3.000000 4.000000 60 1e-4 2\n")
    run_recipe("bible_es_en", {"WORK": str(work), "PROFILE": "cpu", "GPUS": "cpu", "CT2_QUANT": "",
                               "METHODS": "seq_kd", "PRUNE_FROM": "", "FINETUNE_FROM": "seq_kd",
                               "FINETUNE_METHODS": "seq_kd onpolicy_kd_b1 onpolicy_kd_b0",
                               "RESULTS_MD": str(docs / "results.md"), "PLOT_DIR": str(docs)}, "report")
    page = (docs / "results.md").read_text()
    assert str(tmp_path) not in page and str(REPO) not in page
    section = page[page.index("### Fine-tuning seq_kd"):page.index("### Settings")]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0].endswith(
        "| BLEU greedy vs ft_seq_kd | BLEU beam vs ft_seq_kd | BLEU greedy 95% CI | BLEU beam 95% CI |")
    assert [line.split("|")[1].strip() for line in table[1:]] == ["seq_kd", "ft_seq_kd", "ft_onpolicy_kd_b1"]
    assert re.search(r"\| ft_onpolicy_kd_b1 \|.* \| [+-]\d+\.\d \(p \d\.\d{4}\*?\) \|", table[3])
    assert "paired bootstrap resampling test of the BLEU difference from ft_seq_kd" in section
    assert ("| fine-tune | each `ft_` run starts from `student_seq_kd/checkpoint_last.pt` (1600 updates, 3.00 h of "
            "training, last lr 0.000791) with a fresh optimizer `--optimizer adam") in page
    assert ("| ft_seq_kd | `--label-smoothing 0.1 --task translation_kd --teacher-path teacher/checkpoint_best.pt "
            "--criterion seq_kd`; budget 60 min at lr 1e-4, 2 runs at a time: 2345 updates in 60.1 min |") in page
    assert ("--criterion onpolicy_kd --onpolicy-ratio 0.5 --jsd-beta 1`; budget 60 min at lr 1e-4, 2 runs at a "
            "time: 876 updates in 60.2 min |") in page
    assert "--jsd-beta 0`; not run |" in page
    assert "sent/s" in section
    # REPORT_SPEED=0 (scored beside other jobs): no speed in the fine-tune's table either
    run_recipe("bible_es_en", {"WORK": str(work), "PROFILE": "cpu", "GPUS": "cpu", "CT2_QUANT": "",
                               "METHODS": "seq_kd", "PRUNE_FROM": "", "FINETUNE_FROM": "seq_kd",
                               "FINETUNE_METHODS": "seq_kd onpolicy_kd_b1 onpolicy_kd_b0", "REPORT_SPEED": "0",
                               "RESULTS_MD": str(docs / "results.md"), "PLOT_DIR": str(docs)}, "report")
    page = (docs / "results.md").read_text()
    assert "### Fine-tuning seq_kd" in page and "sent/s" not in page


# ---------------------------------------------------------------- a real fine-tune (slow)

def model_of(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def rewrite_training_time(path, seconds):
    state = model_of(path)
    state["extra_state"]["previous_training_time"] = seconds
    torch.save(state, path)


@pytest.mark.slow
def test_fine_tune_starts_from_the_weights_stops_at_the_budget_and_resumes_to_it(tiny_data, tiny_teacher, tmp_path):
    work = tmp_path / "work"
    (work / "distilled").parent.mkdir(parents=True)
    (work / "distilled").symlink_to(tiny_data / "bin")  # the corpus seq_kd and onpolicy_kd learn from
    source_dir = work / "student_seq_kd"
    fairseq_train(tiny_data / "bin", source_dir, *STUDENT_ARCH, "--task", "translation_kd", "--teacher-path",
                  tiny_teacher, "--criterion", "seq_kd", "--max-update", "30", "--no-epoch-checkpoints")
    source = source_dir / "checkpoint_last.pt"
    # 5 h of earlier training: a budget counted from 0 would stop every run after its first update
    t0 = 5 * 3600.0
    rewrite_training_time(source, t0)
    minutes, lr = 0.75, 1e-5
    settings = {"WORK": str(work), "PROFILE": "cpu", "GPUS": "cpu", "TEACHER_PATH": str(tiny_teacher),
                "STUDENT_ARGS": " ".join(STUDENT_ARCH), "MAX_TOKENS": "2000", "STUDENT_JOBS": "2",
                "FINETUNE_FROM": "seq_kd", "FINETUNE_METHODS": "seq_kd onpolicy_kd_b1",
                "FINETUNE_MINUTES": str(minutes),
                "FINETUNE_LR": str(lr), "FINETUNE_SAVE_UPDATES": "5",
                # a run's own options; shorter samples than the barely trained student's run-ons
                "FINETUNE_ARGS_onpolicy_kd_b1": "--onpolicy-max-len-a 1 --onpolicy-max-len-b 5"}
    proc = run_recipe("bible_es_en", settings, "finetune")
    stop = t0 / 3600 + minutes / 60
    start_weights = model_of(source)["model"]
    for run in ("seq_kd", "onpolicy_kd_b1"):
        log = (work / "logs" / f"student_ft_{run}.log").read_text()
        assert (f"loading pretrained model from {source}: "
                "optimizer, lr scheduler, meters, dataloader will be reset") in log
        assert "Stopping training due to cumulative_training_time" in log
        # a constant rate
        assert set(re.findall(r"\| train(?:_inner)? \|.*\blr[= ]([\d.e-]+)", log)) == {"1e-05"}, log[-2000:]
        state = model_of(work / f"student_ft_{run}" / "checkpoint_last.pt")
        updates = state["optimizer_history"][-1]["num_updates"]
        hours = state["extra_state"]["previous_training_time"] / 3600
        assert updates > 1, log[-3000:]  # trained its budget: counted from the checkpoint's 5 h
        assert stop < hours < stop + 30 / 3600  # stopped at the budget (+ its last update and save)
        # from the given weights: an Adam step (betas 0.9, 0.98) moves a weight by at most
        # lr * sqrt(0.5 / (1 - 0.81 / 0.98)) = 1.7 lr (Cauchy-Schwarz on its bias-corrected
        # moments), far less than a run from any other start would be from these weights
        moved = max(float((state["model"][k].float() - v.float()).abs().max()) for k, v in start_weights.items())
        assert 0 < moved <= 1.7 * updates * lr + 1e-7, (moved, updates)
        assert (work / "done" / f"student_ft_{run}").exists()
    assert "ft_seq_kd finished" in proc.stdout and "ft_onpolicy_kd_b1 finished" in proc.stdout
    # the same batches: the first epoch's number of updates and mean sentences per batch
    epoch_1 = [re.search(r"\| train \| epoch 001 \|.*\| bsz ([\d.]+) \| num_updates (\d+) ",
                         (work / "logs" / f"student_ft_{r}.log").read_text()).groups()
               for r in ("seq_kd", "onpolicy_kd_b1")]
    assert epoch_1[0] == epoch_1[1]

    # killed halfway: its checkpoint_last.pt holds half the budget; resumed (with another
    # FINETUNE_MINUTES now: a run keeps the budget it started with), it continues from its own
    # checkpoint, not the start weights, and stops at the same total
    run_dir = work / "student_ft_seq_kd"
    before = model_of(run_dir / "checkpoint_last.pt")["optimizer_history"][-1]["num_updates"]
    rewrite_training_time(run_dir / "checkpoint_last.pt", t0 + minutes * 30)
    (work / "done" / "student_ft_seq_kd").unlink()
    run_recipe("bible_es_en", {**settings, "FINETUNE_MINUTES": "5", "FINETUNE_METHODS": "seq_kd"}, "finetune")
    log = (work / "logs" / "student_ft_seq_kd.log").read_text()
    resumed = log[log.rindex("Preparing to load checkpoint"):]
    assert re.search(rf"Loaded checkpoint {run_dir}/checkpoint_last.pt \(epoch \d+ @ {before} updates\)", resumed)
    assert "loading pretrained model" not in resumed
    state = model_of(run_dir / "checkpoint_last.pt")
    assert state["optimizer_history"][-1]["num_updates"] > before
    assert stop < state["extra_state"]["previous_training_time"] / 3600 < stop + 30 / 3600

    # a finished run is not trained again, even without its stamp
    (work / "done" / "student_ft_seq_kd").unlink()
    shutil.copy(run_dir / "checkpoint_last.pt", tmp_path / "last.pt")
    proc = run_recipe("bible_es_en", {**settings, "FINETUNE_METHODS": "seq_kd"}, "finetune")
    assert "ft_seq_kd: its budget is spent" in proc.stdout
    assert (run_dir / "checkpoint_last.pt").read_bytes() == (tmp_path / "last.pt").read_bytes()
