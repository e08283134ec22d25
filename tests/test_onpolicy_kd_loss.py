"""The generalized JSD(beta) of onpolicy_kd against a brute-force float64 formula."""
import math

import numpy as np
import pytest
import torch

from fairseq_kd.losses import TeacherDistribution, jsd_kd_loss, jsd_rows, word_kd_loss

PAD = 1


def softmax(z, T):
    e = np.exp((z - z.max()) / T)
    return e / e.sum()


def brute_force_jsd(student_row, teacher_row, beta, T=1.0):
    """The scaled divergence of one row from its definition, numpy float64: the paper's
    beta*KL(q||m) + (1-beta)*KL(p||m), m = beta*q + (1-beta)*p, over beta*(1-beta); the
    KLs themselves at the ends."""
    p = softmax(np.asarray(student_row, dtype=np.float64), T)
    q = softmax(np.asarray(teacher_row, dtype=np.float64), T)

    def kl(a, b):
        return float(sum(ai * math.log(ai / bi) for ai, bi in zip(a, b)))

    if beta == 0:
        return kl(q, p)
    if beta == 1:
        return kl(p, q)
    m = beta * q + (1 - beta) * p
    return (beta * kl(q, m) + (1 - beta) * kl(p, m)) / (beta * (1 - beta))


def random_rows(seed=0, N=7, V=13, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, V, generator=g, dtype=torch.float64) * scale,
            torch.randn(N, V, generator=g, dtype=torch.float64) * scale)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_rows_match_the_definition_in_float32(beta, T):
    student, teacher = random_rows()
    rows = jsd_rows(student.float(), TeacherDistribution(teacher.float()), beta, T, chunk_tokens=3)
    expected = [brute_force_jsd(s, t, beta, T) for s, t in zip(student.numpy(), teacher.numpy())]
    assert rows.dtype == torch.float32
    assert rows.tolist() == pytest.approx(expected, rel=2e-5, abs=1e-6)
    assert min(expected) > 1e-3  # the rows are not trivially zero


def test_beta_half_is_four_times_the_classic_jsd():
    """At beta = 1/2 the paper's divergence is the classic JSD (bounded by log 2), scaled by 4."""
    student, teacher = random_rows(1)
    p, q = student.softmax(-1), teacher.softmax(-1)
    m = (p + q) / 2
    classic = 0.5 * (q * (q / m).log()).sum(-1) + 0.5 * (p * (p / m).log()).sum(-1)
    rows = jsd_rows(student, TeacherDistribution(teacher), 0.5)
    assert torch.allclose(rows, 4 * classic, rtol=1e-12)
    assert bool((classic <= math.log(2)).all())


def test_ends_are_the_exact_kls_not_zero():
    student, teacher = random_rows(2)
    p, q = student.log_softmax(-1), teacher.log_softmax(-1)
    forward = (q.exp() * (q - p)).sum(-1)
    reverse = (p.exp() * (p - q)).sum(-1)
    dist = TeacherDistribution(teacher)
    assert torch.allclose(jsd_rows(student, dist, 0.0), forward, rtol=1e-12)
    assert torch.allclose(jsd_rows(student, dist, 1.0), reverse, rtol=1e-12)
    assert not torch.allclose(forward, reverse, rtol=0.1)


@pytest.mark.parametrize("end", [0.0, 1.0])
def test_scaled_divergence_is_continuous_at_the_ends(end):
    """|D_beta - D_end| (values and gradients) shrinks linearly with the distance to the
    end once that distance is below the row's smallest p/q (at 0) or q/p (at 1)."""
    student, teacher = random_rows(3, scale=1.0)
    s32, dist32 = student.float().requires_grad_(), TeacherDistribution(teacher.float())
    at_end = jsd_rows(s32, dist32, end)
    (grad_end,) = torch.autograd.grad(at_end.sum(), s32)
    gaps, grad_gaps = [], []
    for eps in (1e-2, 1e-3, 1e-4):
        beta = eps if end == 0.0 else 1.0 - eps
        rows = jsd_rows(s32, dist32, beta)
        (grad,) = torch.autograd.grad(rows.sum(), s32)
        gaps.append((rows - at_end).abs().max().item())
        grad_gaps.append((grad - grad_end).abs().max().item())
    for series in (gaps, grad_gaps):
        assert series[0] > 1e-3  # the divergences differ away from the end...
        assert 5 < series[0] / series[1] < 20 and 5 < series[1] / series[2] < 20  # ...by O(eps)
    assert gaps[2] < 1e-3 * at_end.abs().max().item()


@pytest.mark.parametrize("beta", [1e-6, 1.0 - 1e-6])
def test_float32_keeps_precision_next_to_the_ends(beta):
    """Peaked rows (q/p up to e^20), beta 1e-6 from an end: float32 values and gradients
    agree with float64 (a mixture formed as log m - log p would lose them to cancellation)."""
    student, teacher = random_rows(3, scale=3.0)
    grads = []
    for dtype in (torch.float32, torch.float64):
        s = student.to(dtype).requires_grad_()
        rows = jsd_rows(s, TeacherDistribution(teacher.to(dtype)), beta)
        grads.append((rows.detach().double(), torch.autograd.grad(rows.sum(), s)[0].double()))
    (v32, g32), (v64, g64) = grads
    assert torch.allclose(v32, v64, rtol=1e-4, atol=1e-5)
    assert torch.allclose(g32, g64, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gradient_is_that_of_the_definition(beta):
    student, teacher = random_rows(4, N=3, V=6)
    dist = TeacherDistribution(teacher)
    s = student.clone().requires_grad_()
    weights = torch.arange(1.0, 4)  # per-row upstream gradients
    (grad,) = torch.autograd.grad((jsd_rows(s, dist, beta, 1.5, chunk_tokens=2) * weights).sum(), s)
    # autograd through the plain formula, float64
    s2 = student.clone().requires_grad_()
    p, q = (s2 / 1.5).softmax(-1), (teacher / 1.5).softmax(-1)
    if beta == 0.0:
        ref = (q * (q / p).log()).sum(-1)
    elif beta == 1.0:
        ref = (p * (p / q).log()).sum(-1)
    else:
        m = beta * q + (1 - beta) * p
        ref = (beta * (q * (q / m).log()).sum(-1)
               + (1 - beta) * (p * (p / m).log()).sum(-1)) / (beta * (1 - beta))
    (expected,) = torch.autograd.grad((ref * weights).sum(), s2)
    assert torch.allclose(grad, expected, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: jsd_rows(x, dist, beta, 1.5, chunk_tokens=2), (s,))


def brute_force_loss(student, teacher, target, beta, T):
    """(T^2 * sum D, sum NLL, sum D) over non-pad tokens, row by row."""
    jsd = nll = 0.0
    for b in range(target.size(0)):
        for j in range(target.size(1)):
            y = int(target[b, j])
            if y == PAD:
                continue
            jsd += brute_force_jsd(student[b, j].numpy(), teacher[b, j].numpy(), beta, T)
            nll -= math.log(softmax(student[b, j].numpy(), 1.0)[y])
    return T * T * jsd, nll, jsd


@pytest.mark.parametrize("beta,T", [(0.0, 1.0), (0.0, 2.0), (0.5, 1.0), (0.8, 2.0), (1.0, 1.0)])
def test_summed_loss_masks_padding(beta, T):
    g = torch.Generator().manual_seed(5)
    student = torch.randn(3, 4, 9, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(3, 4, 9, generator=g, dtype=torch.float64) * 2
    target = torch.randint(2, 9, (3, 4), generator=g)
    target[0, 2:] = PAD
    target[2, 1:] = PAD
    loss, nll, jsd = jsd_kd_loss(student, target, TeacherDistribution(teacher.reshape(-1, 9)), PAD, beta, T)
    exp_loss, exp_nll, exp_jsd = brute_force_loss(student, teacher, target, beta, T)
    assert loss.item() == pytest.approx(exp_loss, rel=1e-9)
    assert nll.item() == pytest.approx(exp_nll, rel=1e-9)
    assert jsd.item() == pytest.approx(exp_jsd, rel=1e-9)
    # padded positions get no gradient
    s = student.clone().requires_grad_()
    jsd_kd_loss(s, target, TeacherDistribution(teacher.reshape(-1, 9)), PAD, beta, T)[0].backward()
    assert s.grad[target.eq(PAD)].abs().max() == 0 and s.grad[target.ne(PAD)].abs().max() > 0


def test_beta_zero_is_word_kd_at_alpha_one():
    g = torch.Generator().manual_seed(6)
    student = torch.randn(2, 5, 11, generator=g)
    teacher = TeacherDistribution(torch.randn(10, 11, generator=g) * 2)
    target = torch.randint(2, 11, (2, 5), generator=g)
    target[1, 3:] = PAD
    for k in (0, 4):  # the full distribution and a top-k teacher
        s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
        ours = jsd_kd_loss(s1, target, teacher.topk(k), PAD, 0.0, 2.0)
        word = word_kd_loss(s2, target, teacher.topk(k), PAD, alpha=1.0, temperature=2.0)
        assert [x.item() for x in ours] == [x.item() for x in word]
        ours[0].backward()
        word[0].backward()
        assert torch.equal(s1.grad, s2.grad)


def test_topk_teacher_is_refused_when_the_mixture_needs_every_token():
    student, teacher = random_rows(7)
    with pytest.raises(ValueError, match="needs the teacher's full distribution"):
        jsd_rows(student, TeacherDistribution(teacher).topk(3), 0.5)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        jsd_rows(student, TeacherDistribution(teacher), 1.5)
