"""The registered word_kd criterion against fairseq's own criterion and a plain teacher."""
import pytest
import torch
from fairseq import checkpoint_utils

from helpers import STUDENT_ARCH, build_training, first_batch
from test_word_kd_loss import brute_force_word_kd


def kd_setup(tiny_data, teacher, *criterion_args):
    _, task, model, criterion = build_training(
        tiny_data / "bin", "--task", "translation_kd", "--teacher-path", teacher,
        *STUDENT_ARCH, *criterion_args,
    )
    torch.manual_seed(0)
    model.eval()  # no dropout: both criteria see the same student outputs
    return task, model, criterion, first_batch(task)


def test_alpha_zero_is_label_smoothed_cross_entropy(tiny_data, tiny_teacher):
    task, model, word_kd, sample = kd_setup(
        tiny_data, tiny_teacher, "--criterion", "word_kd", "--kd-alpha", "0", "--label-smoothing", "0.1")
    *_, ls_ce = build_training(
        tiny_data / "bin", "--task", "translation", *STUDENT_ARCH,
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1")
    loss_kd, size_kd, log_kd = word_kd(model, sample)
    loss_ce, size_ce, log_ce = ls_ce(model, sample)
    assert torch.equal(loss_kd, loss_ce)
    assert torch.equal(log_kd["nll_loss"], log_ce["nll_loss"])
    assert size_kd == size_ce
    assert task._teachers is None  # alpha = 0 never loads the teacher


def test_criterion_uses_the_checkpoint_teacher(tiny_data, tiny_teacher):
    task, model, word_kd, sample = kd_setup(
        tiny_data, tiny_teacher, "--criterion", "word_kd", "--kd-alpha", "0.4",
        "--kd-temperature", "2", "--kd-topk", "5", "--label-smoothing", "0.1")
    loss, _, log = word_kd(model.double(), sample)
    # an independent load of the teacher with fairseq's own loader
    [teacher], _ = checkpoint_utils.load_model_ensemble([str(tiny_teacher)], task=task)
    teacher.eval().double()
    with torch.no_grad():
        t_logits = teacher(**sample["net_input"])[0]
        s_logits = model(**sample["net_input"])[0]
    exp_loss, exp_nll, exp_kd = brute_force_word_kd(
        s_logits, t_logits, sample["target"], alpha=0.4, T=2.0, eps=0.1, topk=5)
    assert loss.item() == pytest.approx(exp_loss, rel=1e-6)
    assert log["kd_loss"].item() == pytest.approx(exp_kd, rel=1e-6)
    # the teacher followed the student to float64 and stayed frozen and in eval mode
    [t] = task.teachers
    assert next(t.parameters()).dtype == torch.float64
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    assert not any(p is q for p in t.parameters() for q in word_kd.parameters())


def test_ensemble_teacher_averages_member_probabilities(tiny_data, tiny_teacher, tmp_path):
    # a second, different teacher: the first with perturbed weights
    state = torch.load(tiny_teacher, map_location="cpu", weights_only=False)
    g = torch.Generator().manual_seed(0)
    state["model"] = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    other = tmp_path / "other.pt"
    torch.save(state, other)
    task, model, _, sample = kd_setup(
        tiny_data, f"{tiny_teacher}:{other}", "--criterion", "word_kd", "--kd-alpha", "0.5")
    dist = task.teacher_distribution(model, sample)
    members = []
    for path in (tiny_teacher, other):
        [t], _ = checkpoint_utils.load_model_ensemble([str(path)], task=task)
        with torch.no_grad():
            members.append(t.eval()(**sample["net_input"])[0].softmax(-1))
    expected = torch.stack(members).mean(0).reshape(dist.scores.shape)
    assert len(task.teachers) == 2
    assert not torch.allclose(members[0], members[1], atol=1e-3)
    assert torch.allclose(dist.scores.softmax(-1), expected, atol=1e-6)
