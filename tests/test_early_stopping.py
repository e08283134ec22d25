"""--patience across a stopped and resumed fairseq-train run: the task keeps fairseq's count
in the checkpoint (fairseq alone counts afresh in every run)."""
import re

import torch

from helpers import STUDENT_ARCH, fairseq_train

VALIDATION = re.compile(r"\| valid on 'valid' subset \|")
EARLY_STOP = "early stop since valid performance hasn't improved for last 3 runs"


def train(tiny_data, teacher, save, max_epoch):
    # --lr 0: the student never changes, so no validation is better than the first one
    proc = fairseq_train(tiny_data / "bin", save, *STUDENT_ARCH, "--task", "translation_kd",
                         "--teacher-path", teacher, "--criterion", "word_kd", "--lr", "0",
                         "--patience", "3", "--max-epoch", str(max_epoch), "--no-epoch-checkpoints")
    return proc.stdout + proc.stderr


def saved_count(save):
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    return state["extra_state"]["TranslationKDTask"]["patience"]


def test_a_resumed_run_continues_the_count(tiny_data, tiny_teacher, tmp_path):
    first = train(tiny_data, tiny_teacher, tmp_path, max_epoch=2)
    assert len(VALIDATION.findall(first)) == 2 and EARLY_STOP not in first
    count = saved_count(tmp_path)
    assert count["num_runs"] == 1  # epoch 1 set the best, epoch 2 was no better
    resumed = train(tiny_data, tiny_teacher, tmp_path, max_epoch=10)
    # two more validations make three without a better one: stopped after epoch 4 (counted
    # afresh, fairseq would take epoch 3 as its best and stop after epoch 6)
    assert len(VALIDATION.findall(resumed)) == 2 and EARLY_STOP in resumed, resumed[-3000:]
    assert saved_count(tmp_path) == {"best": count["best"], "num_runs": 3}
