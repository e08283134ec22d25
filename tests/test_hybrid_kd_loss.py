"""Maths of hybrid_kd (fairseq_kd.losses) against independent computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from fairseq_kd.losses import (
    TeacherDistribution,
    gate_objective,
    kd_kl_divergence,
    kd_kl_rows,
    optimal_gate,
    word_kd_loss,
    word_kd_sentence_losses,
)
from test_word_kd_loss import PAD, brute_force_word_kd, random_batch


def test_kl_rows_match_formula_and_gradcheck():
    student, teacher, _ = random_batch(seed=3)
    s = student.reshape(-1, student.size(-1)).clone().requires_grad_(True)
    dist = TeacherDistribution(teacher.reshape(-1, teacher.size(-1))).topk(4)
    rows = kd_kl_rows(s, dist, temperature=2.0, chunk_tokens=4)
    # independent: renormalised top-4 teacher vs student at T=2
    q = F.softmax(dist.scores / 2.0, -1)
    log_p = F.log_softmax(s.detach() / 2.0, -1).gather(-1, dist.index)
    assert torch.allclose(rows.detach(), (q * (q.log() - log_p)).sum(-1), atol=1e-12)
    weights = torch.rand(rows.shape, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: (kd_kl_rows(x, dist, 2.0, chunk_tokens=4) * weights).sum(), (s,))


def test_sentence_losses_sum_to_word_kd_loss_and_match_brute_force():
    student, teacher, target = random_batch(seed=5)
    dist = TeacherDistribution(teacher.reshape(-1, teacher.size(-1)))
    loss_i, nll_i, kd_i = word_kd_sentence_losses(student, target, dist, PAD, 0.3, 2.0, 0.1)
    loss, nll, kd = word_kd_loss(student, target, dist, PAD, 0.3, 2.0, 0.1)
    assert loss_i.shape == (student.size(0),)
    for a, b in ((loss_i, loss), (nll_i, nll), (kd_i, kd)):
        assert a.sum().item() == pytest.approx(b.item(), rel=1e-12)
    for b in range(student.size(0)):  # sentence by sentence, with python loops
        exp = brute_force_word_kd(student[b:b + 1], teacher[b:b + 1], target[b:b + 1], 0.3, 2.0, 0.1)
        assert loss_i[b].item() == pytest.approx(exp[0], rel=1e-10)
        assert kd_i[b].item() == pytest.approx(exp[2], rel=1e-10)
    # the unmasked KL rows of padding never leak in
    assert kd_kl_divergence(student.reshape(-1, student.size(-1)), dist, target.reshape(-1).ne(PAD),
                            2.0).item() == pytest.approx(kd_i.sum().item(), rel=1e-12)


@pytest.mark.parametrize("r_tok,r_sent,prior,strength", [
    (1.0, 1.0, 0.5, 0.5), (0.4, 1.7, 0.5, 0.5), (2.5, 0.3, 0.3, 1.0), (1.2, 0.9, 0.8, 0.1),
])
def test_gate_objective_minimiser_is_closed_form(r_tok, r_sent, prior, strength):
    # brute force: evaluate J on a fine grid of gate values
    g = torch.linspace(1e-4, 1 - 1e-4, 200001, dtype=torch.float64)
    logits = torch.log(g) - torch.log1p(-g)
    J = gate_objective(logits, torch.tensor(r_tok), torch.tensor(r_sent), prior, strength)
    # same J written out directly
    kl = g * torch.log(g / prior) + (1 - g) * torch.log((1 - g) / (1 - prior))
    assert torch.allclose(J, g * r_tok + (1 - g) * r_sent + strength * kl, atol=1e-12)
    best = g[J.argmin()].item()
    expected = optimal_gate(torch.tensor(r_tok), torch.tensor(r_sent), prior, strength).item()
    assert best == pytest.approx(expected, abs=2e-5)
    assert 0 < expected < 1


def test_gate_objective_is_unit_free_but_the_naive_mixed_loss_is_not():
    """Per-token losses rescaled by their running means: a unit change does not move the gate."""
    tok, sent = torch.tensor([0.8, 1.5, 0.3]), torch.tensor([4.0, 3.0, 5.0])  # nats/token
    for factor in (1.0, 100.0):
        t = tok * factor
        rel_tok, rel_sent = t / t.mean(), sent / sent.mean()
        g = optimal_gate(rel_tok, rel_sent, 0.5, 0.5)
        assert torch.allclose(g, optimal_gate(tok / tok.mean(), sent / sent.mean(), 0.5, 0.5))
        assert ((g > 0.05) & (g < 0.95)).all()
    # minimising g*L_tok + (1-g)*L_sent instead drives g to the smaller term's side, and the
    # side flips when one term is multiplied by 100: the gate follows units, not sentences
    for factor, side in ((1.0, 1.0), (100.0, 0.0)):
        z = torch.zeros(3, requires_grad=True)
        opt = torch.optim.SGD([z], lr=1.0)
        for _ in range(200):
            opt.zero_grad()
            g = torch.sigmoid(z)
            (g * tok * factor + (1 - g) * sent).sum().backward()
            opt.step()
        assert torch.allclose(torch.sigmoid(z), torch.full((3,), side), atol=0.05)
    assert math.isclose(optimal_gate(torch.tensor(1.0), torch.tensor(1.0), 0.3, 2.0).item(), 0.3,
                        rel_tol=1e-6)
