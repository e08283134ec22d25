"""word_kd maths against an independent, loop-based computation."""
import math

import pytest
import torch

from fairseq_kd.losses import (
    TeacherDistribution,
    ensemble_scores,
    kd_kl_divergence,
    word_kd_loss,
    token_losses,
)

PAD = 1


def random_batch(seed=0, B=3, T=5, V=11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    target = torch.randint(2, V, (B, T), generator=g)
    target[0, 3:] = PAD  # padded tails of different lengths
    target[B - 1, 1:] = PAD
    return student, teacher, target


def brute_force_token_terms(student, teacher, target, T, eps, topk=0):
    """(ls, nll, kd) of every token, shape (B, L) each, 0 on padding: python loops and
    explicit softmax definitions."""
    B, L, V = student.shape
    out = torch.zeros(3, B, L, dtype=torch.float64)
    for b in range(B):
        for j in range(L):
            y = int(target[b, j])
            if y == PAD:
                continue
            z = student[b, j].tolist()
            t = teacher[b, j].tolist()
            # label-smoothed NLL, fairseq's convention: eps spread over V-1 others
            logZ = math.log(sum(math.exp(v) for v in z))
            logp = [v - logZ for v in z]
            nll = -logp[y]
            eps_i = eps / (V - 1)
            out[0, b, j] = (1 - eps - eps_i) * nll + eps_i * (-sum(logp))
            out[1, b, j] = nll
            # teacher q_T, optionally restricted to its top-k and renormalised
            support = sorted(range(V), key=lambda k: -t[k])[:topk] if topk else range(V)
            qz = sum(math.exp(t[k] / T) for k in support)
            q = {k: math.exp(t[k] / T) / qz for k in support}
            pz = sum(math.exp(v / T) for v in z)
            out[2, b, j] = sum(q[k] * (math.log(q[k]) - math.log(math.exp(z[k] / T) / pz)) for k in support)
    return out[0], out[1], out[2]


def brute_force_word_kd(student, teacher, target, alpha, T, eps, topk=0):
    """Summed over tokens: (loss, nll, kd) as python floats."""
    ls, nll, kd = (x.sum().item() for x in brute_force_token_terms(student, teacher, target, T, eps, topk))
    return (1 - alpha) * ls + alpha * T * T * kd, nll, kd


@pytest.mark.parametrize("alpha,T,eps,topk", [
    (0.5, 1.0, 0.0, 0), (0.3, 2.0, 0.1, 0), (0.7, 3.0, 0.1, 4), (1.0, 1.5, 0.0, 1),
])
def test_word_kd_matches_brute_force(alpha, T, eps, topk):
    student, teacher, target = random_batch()
    dist = TeacherDistribution(teacher.reshape(-1, teacher.size(-1))).topk(topk)
    loss, nll, kd = word_kd_loss(student, target, dist, PAD, alpha, T, eps)
    exp_loss, exp_nll, exp_kd = brute_force_word_kd(student, teacher, target, alpha, T, eps, topk)
    assert loss.item() == pytest.approx(exp_loss, rel=1e-9)
    assert nll.item() == pytest.approx(exp_nll, rel=1e-9)
    assert kd.item() == pytest.approx(exp_kd, rel=1e-9)


def test_padding_rows_contribute_nothing():
    student, teacher, target = random_batch()
    dist = TeacherDistribution(teacher.reshape(-1, teacher.size(-1)))
    base = word_kd_loss(student, target, dist, PAD, 0.5, 2.0, 0.1)[0]
    student2 = student.clone()
    student2[target.eq(PAD)] = torch.randn_like(student2[target.eq(PAD)]) * 10
    assert word_kd_loss(student2, target, dist, PAD, 0.5, 2.0, 0.1)[0].item() == pytest.approx(base.item(), rel=1e-12)


@pytest.mark.parametrize("topk", [0, 3])
def test_kl_gradient_gradcheck(topk):
    student, teacher, target = random_batch(seed=1, B=2, T=3, V=7)
    mask = target.reshape(-1).ne(PAD)
    dist = TeacherDistribution(teacher.reshape(-1, 7)).topk(topk)
    s = student.reshape(-1, 7).clone().requires_grad_(True)
    # chunk of 2 rows: the chunked forward/backward must agree with finite differences
    assert torch.autograd.gradcheck(lambda x: kd_kl_divergence(x, dist, mask, 1.7, chunk_tokens=2), (s,))


def test_chunking_does_not_change_value_or_gradient():
    student, teacher, target = random_batch(seed=2, B=4, T=6, V=13)
    mask = target.reshape(-1).ne(PAD)
    dist = TeacherDistribution(teacher.reshape(-1, 13))
    results = []
    for chunk in (1, 5, 10_000):
        s = student.reshape(-1, 13).clone().requires_grad_(True)
        kd_kl_divergence(s, dist, mask, 2.0, chunk_tokens=chunk).backward()
        results.append((s.grad, kd_kl_divergence(s, dist, mask, 2.0, chunk_tokens=chunk).item()))
    for grad, value in results[1:]:
        assert torch.allclose(grad, results[0][0], atol=1e-12)
        assert value == pytest.approx(results[0][1], rel=1e-12)


def test_kl_is_zero_when_student_equals_teacher_and_no_grad_to_teacher():
    _, teacher, target = random_batch()
    t = teacher.reshape(-1, teacher.size(-1)).clone().requires_grad_(True)
    kd = kd_kl_divergence(t.detach().clone().requires_grad_(True), TeacherDistribution(t), target.reshape(-1).ne(PAD), 2.0)
    assert abs(kd.item()) < 1e-10
    assert kd.grad_fn is not None
    assert t.grad is None


def test_ensemble_scores_average_probabilities():
    g = torch.Generator().manual_seed(3)
    members = [torch.randn(4, 9, generator=g, dtype=torch.float64) for _ in range(3)]
    expected = torch.stack([m.softmax(-1) for m in members]).mean(0)
    assert torch.allclose(ensemble_scores(members).softmax(-1), expected, atol=1e-12)
    assert ensemble_scores(members[:1]) is members[0]


@pytest.mark.parametrize("topk,eps", [(0, 0.1), (3, 0.0)])
def test_fused_word_kd_gradient_gradcheck(topk, eps):
    student, teacher, target = random_batch(seed=4, B=2, T=3, V=7)
    dist = TeacherDistribution(teacher.reshape(-1, 7)).topk(topk)
    s = student.clone().requires_grad_(True)
    # chunks of 2 rows: the fused forward/backward must agree with finite differences
    assert torch.autograd.gradcheck(
        lambda x: word_kd_loss(x, target, dist, PAD, 0.4, 1.7, eps, chunk_tokens=2)[0], (s,))


def test_fused_word_kd_gradient_equals_autograd_of_the_formula():
    student, teacher, target = random_batch(seed=5, B=3, T=6, V=13)
    dist = TeacherDistribution(teacher.reshape(-1, 13))
    s1 = student.clone().requires_grad_(True)
    word_kd_loss(s1, target, dist, PAD, 0.3, 2.0, 0.1, chunk_tokens=4)[0].backward()
    # plain autograd through the textbook formula
    s2 = student.clone().requires_grad_(True)
    lp = s2.log_softmax(-1).reshape(-1, 13)
    y = target.reshape(-1)
    m = y.ne(PAD).double()
    eps, V = 0.1, 13
    ls = ((1 - eps - eps / (V - 1)) * -lp.gather(-1, y[:, None]).squeeze(-1) - eps / (V - 1) * lp.sum(-1))
    q = (teacher.reshape(-1, 13) / 2.0).softmax(-1)
    kl = (q * (q.log() - (s2.reshape(-1, 13) / 2.0).log_softmax(-1))).sum(-1)
    ((0.7 * ls + 0.3 * 4.0 * kl) * m).sum().backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-12)


# -- the per-row fused function (token_losses), which word_kd_loss sums ------------

@pytest.mark.parametrize("T,eps,topk", [(1.0, 0.0, 0), (2.0, 0.1, 0), (1.5, 0.1, 4), (3.0, 0.0, 1)])
def test_token_losses_match_brute_force_per_token(T, eps, topk):
    student, teacher, target = random_batch(seed=6)
    V = student.size(-1)
    dist = TeacherDistribution(teacher.reshape(-1, V)).topk(topk)
    ls, nll, kd = token_losses(student.reshape(-1, V), target.reshape(-1), dist, PAD, T, eps,
                               chunk_tokens=4)
    for got, exp in zip((ls, nll, kd), brute_force_token_terms(student, teacher, target, T, eps, topk)):
        assert torch.allclose(got.view(target.shape), exp, rtol=1e-10, atol=1e-12)
    assert (ls[target.reshape(-1).eq(PAD)] == 0).all() and (kd[target.reshape(-1).eq(PAD)] == 0).all()
    # without a teacher (alpha = 0): the same LS and NLL rows, KL 0
    ls0, nll0, kd0 = token_losses(student.reshape(-1, V), target.reshape(-1), None, PAD, T, eps)
    assert torch.equal(ls0, ls) and torch.equal(nll0, nll) and not kd0.any()


@pytest.mark.parametrize("topk,eps,with_teacher", [(0, 0.1, True), (3, 0.0, True), (0, 0.1, False)])
def test_token_losses_gradcheck_every_output(topk, eps, with_teacher):
    """Each of the three (N,) outputs against finite differences, per-row upstream gradients,
    padding rows included (they must get no gradient), chunks of 2 rows."""
    student, teacher, target = random_batch(seed=7, B=2, T=3, V=7)
    dist = TeacherDistribution(teacher.reshape(-1, 7)).topk(topk) if with_teacher else None
    s = student.reshape(-1, 7).clone().requires_grad_(True)
    y = target.reshape(-1)
    assert torch.autograd.gradcheck(lambda x: token_losses(x, y, dist, PAD, 1.7, eps, chunk_tokens=2), (s,))
    # a weighted sum of all three at once (every upstream gradient non-zero)
    w = torch.rand(3, y.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def f(x):
        return sum((r * wi).sum() for r, wi in zip(token_losses(x, y, dist, PAD, 1.7, eps, chunk_tokens=2), w))
    assert torch.autograd.gradcheck(f, (s,))
    f(s).backward()
    assert (s.grad[y.eq(PAD)] == 0).all()


@pytest.mark.parametrize("topk", [0, 3])
def test_token_losses_with_teacher_on_some_rows(topk):
    """teacher_rows maps each teacher row to a student row; the other rows get KL 0 (any chunking)."""
    student, teacher, target = random_batch(seed=8, B=3, T=4, V=9)
    V, N = 9, 12
    rows = torch.tensor([1, 2, 3, 6, 7, 10])
    dist = TeacherDistribution(teacher.reshape(-1, V)[rows]).topk(topk)
    y = target.reshape(-1)
    full = TeacherDistribution(teacher.reshape(-1, V)).topk(topk)
    ref_ls, ref_nll, ref_kd = (t.reshape(-1) for t in brute_force_token_terms(
        student, teacher, target, 2.0, 0.1, topk))
    has = torch.zeros(N, dtype=torch.bool)
    has[rows] = True
    for chunk in (1, 2, 5, 100):
        s = student.reshape(-1, V).clone().requires_grad_(True)
        ls, nll, kd = token_losses(s, y, dist, PAD, 2.0, 0.1, teacher_rows=rows, chunk_tokens=chunk)
        assert torch.allclose(ls, ref_ls, atol=1e-12) and torch.allclose(nll, ref_nll, atol=1e-12)
        assert torch.allclose(kd, torch.where(has, ref_kd, torch.zeros_like(ref_kd)), atol=1e-12)
        (0.4 * ls.sum() + 2.0 * kd.sum()).backward()
        # the same as the full teacher with the KL of the other rows weighted 0
        s2 = student.reshape(-1, V).clone().requires_grad_(True)
        ls2, _, kd2 = token_losses(s2, y, full, PAD, 2.0, 0.1, chunk_tokens=chunk)
        (0.4 * ls2.sum() + 2.0 * (kd2 * has).sum()).backward()
        assert torch.allclose(s.grad, s2.grad, atol=1e-12)
    s = student.reshape(-1, V).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: token_losses(x, y, dist, PAD, 2.0, 0.1, teacher_rows=rows, chunk_tokens=5), (s,))
    with pytest.raises(ValueError, match="strictly increasing"):
        token_losses(s, y, dist, PAD, 2.0, 0.1, teacher_rows=rows.flip(0))


def test_word_kd_loss_is_the_sum_of_the_rows():
    student, teacher, target = random_batch(seed=9, B=3, T=6, V=13)
    dist = TeacherDistribution(teacher.reshape(-1, 13)).topk(5)
    s1 = student.clone().requires_grad_(True)
    loss, nll, kd = word_kd_loss(s1, target, dist, PAD, 0.3, 2.0, 0.1, chunk_tokens=4)
    loss.backward()
    s2 = student.clone().requires_grad_(True)
    ls_r, nll_r, kd_r = token_losses(s2.reshape(-1, 13), target.reshape(-1), dist, PAD, 2.0, 0.1,
                                     chunk_tokens=4)
    (0.7 * ls_r.sum() + 0.3 * 4.0 * kd_r.sum()).backward()
    assert loss.item() == pytest.approx(0.7 * ls_r.sum().item() + 1.2 * kd_r.sum().item(), rel=1e-12)
    assert nll.item() == pytest.approx(nll_r.sum().item(), rel=1e-12)
    assert kd.item() == pytest.approx(kd_r.sum().item(), rel=1e-12)
    assert torch.allclose(s1.grad, s2.grad, atol=1e-12)
