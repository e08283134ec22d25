"""Maths of hybrid_kd (fairseq_kd.losses) against independent computations."""
import math

import pytest
import torch
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from fairseq_kd.losses import (
    TeacherDistribution,
    gate_objective,
    hybrid_sentence_losses,
    kd_kl_divergence,
    kd_kl_rows,
    optimal_gate,
    token_losses,
    word_kd_loss,
)
from test_word_kd_loss import PAD, brute_force_token_terms, brute_force_word_kd, random_batch


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
    # without distilled targets the token term is word-level KD per sentence
    loss_i, _, nll_i, kd_i = hybrid_sentence_losses(student, target, None, dist, PAD, 0.3, 2.0, 0.1)
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


def hybrid_batch(seed, B=3, T=4, T_hyp=6, V=9):
    """Student logits over gold and distilled prefixes stacked (2B, L, V), L = max(T, T_hyp)."""
    g = torch.Generator().manual_seed(seed)
    L = max(T, T_hyp)
    logits = torch.randn(2 * B, L, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    target = torch.randint(2, V, (B, T), generator=g)
    hyp = torch.randint(2, V, (B, T_hyp), generator=g)
    target[0, 2:] = PAD
    hyp[1, 3:] = PAD
    hyp[B - 1, 1:] = PAD
    return logits, teacher, target, hyp


def reference_hybrid_terms(logits, teacher, target, hyp, alpha, T, eps):
    """What hybrid_kd computed before the per-row fused function: autograd through full
    log-probs (fairseq's label_smoothed_nll_loss) plus the per-row KL."""
    B, Tg = target.shape
    lprobs = F.log_softmax(logits, -1)

    def ls_nll(lp, y):
        ls, nll = label_smoothed_nll_loss(lp.reshape(-1, lp.size(-1)), y.reshape(-1), eps,
                                          ignore_index=PAD, reduce=False)
        return ls.view(y.shape).sum(1), nll.view(y.shape).sum(1)

    gold_logits = logits[:B, :Tg]
    ls, nll = ls_nll(lprobs[:B, :Tg], target)
    kd = torch.zeros_like(ls)
    if alpha:
        rows = kd_kl_rows(gold_logits.reshape(-1, logits.size(-1)), teacher, T)
        kd = (rows * target.reshape(-1).ne(PAD)).view(B, Tg).sum(1)
    sent, _ = ls_nll(lprobs[B:, :hyp.size(1)], hyp)
    return (1 - alpha) * ls + alpha * T * T * kd, sent, nll, kd


@pytest.mark.parametrize("alpha,T,eps,topk,T_gold,T_hyp", [
    (0.0, 1.0, 0.1, 0, 4, 6), (1.0, 2.0, 0.0, 0, 4, 6), (0.3, 2.0, 0.1, 3, 6, 4), (0.6, 1.5, 0.1, 0, 5, 5),
])
def test_hybrid_sentence_losses_match_brute_force_and_the_log_prob_version(
        alpha, T, eps, topk, T_gold, T_hyp):
    logits, teacher, target, hyp = hybrid_batch(seed=11, T=T_gold, T_hyp=T_hyp)
    B, V = target.size(0), logits.size(-1)
    dist = TeacherDistribution(teacher.reshape(-1, V)).topk(topk) if alpha else None
    gates = torch.rand(B, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for chunk in (3, 256):  # chunks of 3 rows straddle sentences and the gold/distilled boundary
        x = logits.clone().requires_grad_(True)
        terms = hybrid_sentence_losses(x, target, hyp, dist, PAD, alpha, T, eps, chunk_tokens=chunk)
        (gates * terms[0] + (1 - gates) * terms[1]).sum().backward()
        results.append((terms, x.grad))
    x = logits.clone().requires_grad_(True)
    ref = reference_hybrid_terms(x, dist, target, hyp, alpha, T, eps)
    (gates * ref[0] + (1 - gates) * ref[1]).sum().backward()
    # brute force, token by token
    ls, nll, kd = (t.sum(1) for t in brute_force_token_terms(
        logits[:B, :T_gold], teacher, target, T, eps, topk))
    sent = brute_force_token_terms(logits[B:, :T_hyp], teacher.new_zeros(B, T_hyp, V), hyp, T, eps)[0].sum(1)
    kd = kd if alpha else torch.zeros_like(kd)
    brute = ((1 - alpha) * ls + alpha * T * T * kd, sent, nll, kd)
    for terms, grad in results:
        for got, exp_ref, exp_brute in zip(terms, ref, brute):
            assert got.shape == (B,)
            assert torch.allclose(got, exp_ref.detach(), rtol=1e-12, atol=1e-12)
            assert torch.allclose(got, exp_brute, rtol=1e-10, atol=1e-12)
        assert torch.allclose(grad, x.grad, rtol=1e-10, atol=1e-12)
    # padding positions, and gold positions past the gold length, get no gradient
    grad = results[0][1]
    assert (grad[:B][F.pad(target, (0, logits.size(1) - T_gold), value=PAD).eq(PAD)] == 0).all()
    assert (grad[B:][F.pad(hyp, (0, logits.size(1) - T_hyp), value=PAD).eq(PAD)] == 0).all()


@pytest.mark.parametrize("alpha,topk", [(0.0, 0), (0.5, 0), (1.0, 3)])
def test_hybrid_sentence_losses_gradcheck(alpha, topk):
    """Tiny float64 case against finite differences, every output, gold shorter than y_hat."""
    logits, teacher, target, hyp = hybrid_batch(seed=12, B=2, T=2, T_hyp=3, V=5)
    dist = TeacherDistribution(teacher.reshape(-1, 5)).topk(topk) if alpha else None
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: hybrid_sentence_losses(z, target, hyp, dist, PAD, alpha, 1.7, 0.1, chunk_tokens=2), (x,))


def test_hybrid_sentence_losses_without_distilled_targets():
    """Validation: one pass on gold, gold stands for y_hat (sent = its LS-NLL)."""
    student, teacher, target = random_batch(seed=13)
    dist = TeacherDistribution(teacher.reshape(-1, teacher.size(-1)))
    tok, sent, nll, kd = hybrid_sentence_losses(student, target, None, dist, PAD, 0.3, 2.0, 0.1)
    # the fused per-token function's rows, summed per sentence: the same numbers, bit for bit
    B, L, V = student.shape
    ls_r, nll_r, kd_r = (r.view(B, L).sum(1) for r in token_losses(
        student.reshape(-1, V), target.reshape(-1), dist, PAD, 2.0, 0.1))
    for a, b in ((tok, 0.7 * ls_r + 0.3 * 2.0 ** 2 * kd_r), (nll, nll_r), (kd, kd_r), (sent, ls_r)):
        assert torch.equal(a, b)
    # and the brute force, sentence by sentence
    ls_b, nll_b, kd_b = (x.sum(1) for x in brute_force_token_terms(student, teacher, target, 2.0, 0.1))
    for a, b in ((tok, 0.7 * ls_b + 0.3 * 4.0 * kd_b), (nll, nll_b), (kd, kd_b), (sent, ls_b)):
        assert torch.allclose(a, b, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="do not fit"):
        hybrid_sentence_losses(student, target[:, :3], None, dist, PAD, 0.3, 2.0, 0.1)


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
