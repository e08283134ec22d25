"""hybrid_kd end to end: fairseq-train -> checkpoint (with the gate) -> restore -> generate -> resume."""
import math
import re

import pytest
import torch
from fairseq.trainer import Trainer

import helpers
from helpers import STUDENT_ARCH, build_training, fairseq_train

EPOCH_LINE = re.compile(r"\| train \| epoch (\d+) \| .*?tok_loss ([\d.]+) \| sent_loss ([\d.]+)")
INNER_GATE = re.compile(r"train_inner \| epoch (\d+):.*? gate=([\d.]+), gate_std=([\d.]+)")
VALID_GATE = re.compile(r"valid on 'valid' subset \|.*? \| gate ([\d.]+) \| gate_std ([\d.]+)")


def hybrid_args(teacher, distilled):
    return [*STUDENT_ARCH, "--task", "translation_kd", "--teacher-path", teacher,
            "--distilled-data", distilled, "--criterion", "hybrid_kd", "--gate", "complexity",
            "--gate-complexity-warmup", "100", "--kd-temperature", "2", "--label-smoothing", "0.1"]


@pytest.fixture(scope="module")
def hybrid_run(tiny_data, tiny_teacher, tiny_distilled, tmp_path_factory):
    save = tmp_path_factory.mktemp("hybrid_kd")
    args = hybrid_args(tiny_teacher, tiny_distilled[0])
    proc = fairseq_train(tiny_data / "bin", save, *args, "--max-epoch", "3")
    return save, args, proc.stdout + proc.stderr


def test_training_lowers_both_terms_and_logs_the_gate(hybrid_run):
    _, _, log = hybrid_run
    epochs = {int(m.group(1)): (float(m.group(2)), float(m.group(3))) for m in EPOCH_LINE.finditer(log)}
    assert sorted(epochs) == [1, 2, 3], log[-3000:]
    assert epochs[3][0] < epochs[1][0]  # tok_loss
    assert epochs[3][1] < epochs[1][1]  # sent_loss
    gates = [(float(g), float(s)) for _, g, s in INNER_GATE.findall(log)]
    assert len(gates) > 10
    assert all(0.05 < g < 0.95 for g, _ in gates)
    # the first update is before the warm-up (100 sentences): every sentence at the level, then apart
    assert gates[0][1] == 0.0 and any(s > 0 for _, s in gates[1:])
    # validation: the fixed mixture g = --gate-prior (0.5) for every sentence, whatever was learned
    assert VALID_GATE.findall(log) == [("0.5", "0")] * 3, log[-3000:]


def test_checkpoint_holds_gate_and_fairseq_restores_it(hybrid_run, tiny_data):
    save, args, _ = hybrid_run
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert all(k.startswith(("encoder.", "decoder.")) for k in state["model"])  # student only
    crit = state["criterion"]
    assert set(crit) == {"gate.weight", "loss_scales", "scale_updates", "complexity_stats", "complexity_seen"}
    assert crit["gate.weight"].abs() > 0  # the level was trained (it starts at zero)
    assert int(crit["scale_updates"]) == state["optimizer_history"][-1]["num_updates"]
    assert (crit["loss_scales"] > 0).all()
    assert int(crit["complexity_seen"]) == 3 * 600  # every training sentence, each epoch
    n, total, total_sq = crit["complexity_stats"].tolist()  # decayed sums of the teacher's entropy
    mean, mean_sq = total / n, total_sq / n  # nats per token
    # E[c^2] >= E[c]^2 up to float32 rounding (this weak teacher's entropies differ little)
    assert 0 < mean < math.log(400) and mean_sq >= mean * mean * (1 - 1e-6)
    # fairseq's own restore path (what --restore-file / resume runs)
    cfg, task, model, criterion = build_training(tiny_data / "bin", *args, *helpers.TRAIN_COMMON)
    assert criterion.gate.weight == 0 and not criterion.complexity_stats.any()
    trainer = Trainer(cfg, task, model, criterion)
    trainer.load_checkpoint(str(save / "checkpoint_last.pt"))
    for key, value in trainer.get_criterion().state_dict().items():
        assert torch.equal(value, crit[key]), key


def test_generate_loads_student(hybrid_run, tiny_data):
    save, _, _ = hybrid_run
    helpers.assert_generate_loads_student(tiny_data, save / "checkpoint_best.pt")


def test_resume_continues_with_the_trained_gate(hybrid_run, tiny_data):
    save, args, _ = hybrid_run
    proc = fairseq_train(tiny_data / "bin", save, *args, "--max-epoch", "4")
    log = proc.stdout + proc.stderr
    assert re.search(r"Loaded checkpoint \S*checkpoint_last.pt \(epoch 4 @ \d+ updates\)", log), log[-3000:]
    gates = [(int(e), float(s)) for e, _, s in INNER_GATE.findall(log)]
    assert gates and all(e == 4 for e, _ in gates)
    assert gates[0][1] > 0  # restored statistics: a fresh gate gives every sentence the same value
