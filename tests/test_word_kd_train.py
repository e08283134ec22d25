"""word_kd end to end: fairseq-train -> checkpoint -> fairseq-generate -> resume, and bad input."""
import re

import pytest
import torch

import helpers
from helpers import STUDENT_ARCH, fairseq_train

EPOCH_LINE = re.compile(r"\| train \| epoch (\d+) \| loss ([\d.]+) \| nll_loss ([\d.]+) \| kd_loss ([\d.]+)")


def epoch_losses(log):
    return {int(m.group(1)): tuple(map(float, m.group(2, 3, 4))) for m in EPOCH_LINE.finditer(log)}


@pytest.fixture(scope="module")
def word_kd_run(tiny_data, tiny_teacher, tmp_path_factory):
    save = tmp_path_factory.mktemp("word_kd")
    proc = fairseq_train(
        tiny_data / "bin", save, *STUDENT_ARCH, "--task", "translation_kd",
        "--teacher-path", tiny_teacher, "--criterion", "word_kd", "--kd-alpha", "0.5",
        "--kd-temperature", "2", "--label-smoothing", "0.1", "--max-epoch", "3",
    )
    return save, proc.stdout + proc.stderr


def test_training_lowers_loss_and_kd_term(word_kd_run):
    _, log = word_kd_run
    losses = epoch_losses(log)
    assert sorted(losses) == [1, 2, 3], log[-2000:]
    assert losses[3][0] < losses[1][0]  # total loss
    assert losses[3][2] < losses[1][2]  # KD term


def test_checkpoint_holds_student_only(word_kd_run, tiny_teacher):
    save, _ = word_kd_run
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    teacher = torch.load(tiny_teacher, map_location="cpu", weights_only=False)
    n_student = sum(v.numel() for v in state["model"].values())
    n_teacher = sum(v.numel() for v in teacher["model"].values())
    assert all(k.startswith(("encoder.", "decoder.")) for k in state["model"])
    assert n_student < n_teacher / 3
    assert state.get("criterion") is None  # word_kd has no parameters
    # the optimizer's state covers exactly the student's (shared-once) parameters
    unique = {v.data_ptr(): v.numel() for k, v in state["model"].items()
              if not k.endswith(("version", "_float_tensor"))}
    opt_numel = sum(s["exp_avg"].numel() for s in state["last_optimizer_state"]["state"].values())
    assert opt_numel == sum(unique.values())


def test_generate_loads_student_without_teacher(word_kd_run, tiny_data):
    save, _ = word_kd_run
    helpers.assert_generate_loads_student(tiny_data, save / "checkpoint_best.pt")


def test_resume_from_checkpoint_last(word_kd_run, tiny_data, tiny_teacher):
    save, _ = word_kd_run
    proc = fairseq_train(
        tiny_data / "bin", save, *STUDENT_ARCH, "--task", "translation_kd",
        "--teacher-path", tiny_teacher, "--criterion", "word_kd", "--kd-alpha", "0.5",
        "--kd-temperature", "2", "--label-smoothing", "0.1", "--max-epoch", "4",
    )
    log = proc.stdout + proc.stderr
    assert re.search(r"Loaded checkpoint \S*checkpoint_last.pt \(epoch 4 @ \d+ updates\)", log), log[-3000:]
    assert sorted(epoch_losses(log)) == [4]


def test_missing_teacher_file_is_one_line_error(tiny_data, tmp_path):
    proc = fairseq_train(tiny_data / "bin", tmp_path, *STUDENT_ARCH, "--task", "translation_kd",
                         "--teacher-path", tmp_path / "nope.pt", "--criterion", "word_kd",
                         "--max-epoch", "1", check=False)
    assert "teacher checkpoint not found" in helpers.one_line_error(proc)
    assert "nope.pt" in proc.stderr


def test_alpha_out_of_range_is_one_line_error(tiny_data, tiny_teacher, tmp_path):
    proc = fairseq_train(tiny_data / "bin", tmp_path, *STUDENT_ARCH, "--task", "translation_kd",
                         "--teacher-path", tiny_teacher, "--criterion", "word_kd",
                         "--kd-alpha", "1.5", "--max-epoch", "1", check=False)
    assert "--kd-alpha must be in [0, 1], got 1.5" in helpers.one_line_error(proc)


def test_dictionary_mismatch_is_one_line_error(tiny_teacher, tmp_path):
    other = helpers.prepare_tiny_data(tmp_path / "other", {"train": 200, "valid": 20}, vocab_size=300)
    proc = fairseq_train(other / "bin", tmp_path / "ck", *STUDENT_ARCH, "--task", "translation_kd",
                         "--teacher-path", tiny_teacher, "--criterion", "word_kd",
                         "--max-epoch", "1", check=False)
    assert "teacher/student dictionary mismatch" in helpers.one_line_error(proc)
    # checked before training: fairseq wrote no crash checkpoint of the student
    assert not list((tmp_path / "ck").glob("*.pt"))


def test_non_checkpoint_teacher_stops_before_training(tiny_data, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 4)
    proc = fairseq_train(tiny_data / "bin", tmp_path / "ck", *STUDENT_ARCH, "--task", "translation_kd",
                         "--teacher-path", junk, "--criterion", "word_kd", "--max-epoch", "1",
                         "--no-save", check=False)
    assert helpers.one_line_error(proc).endswith(
        f"{junk} is not a fairseq checkpoint (torch cannot read it: UnpicklingError)")
    assert not list((tmp_path / "ck").glob("*.pt"))  # no crash.pt
