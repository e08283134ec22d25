"""A2D attention KL (fairseq_kd.losses.attention_kl) against a loop-based computation."""
import math

import pytest
import torch

from fairseq_kd.attention import AttentionAlignment
from fairseq_kd.losses import attention_kl


def random_rows(shape, allowed, g):
    """Random attention rows: softmax over the allowed keys, exact zeros elsewhere."""
    scores = torch.randn(*shape, generator=g, dtype=torch.float64) * 2
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def random_maps(seed=0, B=3, C=4, Tq=5, Tk=6, causal=False):
    """Teacher/student maps with left-padded keys and right-padded queries."""
    g = torch.Generator().manual_seed(seed)
    query_mask = torch.ones(B, Tq, dtype=torch.bool)
    key_mask = torch.ones(B, Tk, dtype=torch.bool)
    query_mask[0, 3:] = False  # right padding (targets)
    query_mask[2, 1:] = False
    key_mask[1, :2] = False  # left padding (fairseq's source default)
    key_mask[2, :4] = False
    allowed = key_mask[:, None, None, :].expand(B, C, Tq, Tk)
    if causal:
        allowed = allowed & torch.ones(Tq, Tk, dtype=torch.bool).tril()
    teacher = random_rows((B, C, Tq, Tk), allowed, g)
    student = random_rows((B, C, Tq, Tk), allowed, g)
    return teacher, student, query_mask, key_mask


def brute_force_attention_kl(teacher, student, query_mask, key_mask):
    """sum over real queries, mean over heads, of sum_k t log(t/s) over real keys."""
    B, C, Tq, Tk = teacher.shape
    total = 0.0
    for b in range(B):
        for q in range(Tq):
            if not query_mask[b, q]:
                continue
            for h in range(C):
                for k in range(Tk):
                    t, s = float(teacher[b, h, q, k]), float(student[b, h, q, k])
                    if key_mask[b, k] and t > 0:
                        total += t * math.log(t / s) / C
    return total


@pytest.mark.parametrize("causal", [False, True])
def test_matches_brute_force(causal):
    teacher, student, qm, km = random_maps(seed=1, causal=causal)
    got = attention_kl(teacher, student, qm, km)
    assert got.item() == pytest.approx(brute_force_attention_kl(teacher, student, qm, km), rel=1e-10)
    assert got.item() > 0
    assert attention_kl(teacher, teacher, qm, km).item() == pytest.approx(0.0, abs=1e-12)


def test_padded_positions_contribute_nothing():
    teacher, student, qm, km = random_maps(seed=2)
    reference = attention_kl(teacher, student, qm, km)
    padded = ~(qm[:, None, :, None] & km[:, None, None, :]).expand_as(teacher)
    garbage_t, garbage_s = teacher.clone(), student.clone().requires_grad_(False)
    garbage_t[padded] = 7.0
    garbage_s[padded] = float("nan")
    garbage_s.requires_grad_(True)
    value = attention_kl(garbage_t, garbage_s, qm, km)
    assert value.item() == pytest.approx(reference.item(), rel=1e-12)
    value.backward()
    assert torch.isfinite(garbage_s.grad).all()
    assert (garbage_s.grad[padded] == 0).all()


def test_duplicated_batch_doubles_sum_and_keeps_per_token_value():
    teacher, student, qm, km = random_maps(seed=3)
    once = attention_kl(teacher, student, qm, km)
    twice = attention_kl(torch.cat([teacher, teacher]), torch.cat([student, student]),
                         torch.cat([qm, qm]), torch.cat([km, km]))
    assert twice.item() == pytest.approx(2 * once.item(), rel=1e-12)
    # per real query token (what the trainer reports after dividing by sample_size)
    assert (twice / (2 * qm.sum())).item() == pytest.approx((once / qm.sum()).item(), rel=1e-12)


def test_gradient_flows_to_student_only_and_is_correct():
    teacher, student, qm, km = random_maps(seed=4, B=3, C=2, Tq=4, Tk=5)
    # strictly positive student rows where the KL is evaluated, so gradcheck is smooth
    student = (student + 0.05) / (1 + 0.05 * student.size(-1))
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    attention_kl(teacher, student, qm, km).backward()
    assert teacher.grad is None
    assert torch.autograd.gradcheck(lambda s: attention_kl(teacher.detach(), s, qm, km),
                                    (student.detach().requires_grad_(True),))


def test_alignment_module_keeps_rows_distributions():
    teacher, student, qm, km = random_maps(seed=5, C=6)
    aam = AttentionAlignment(n_student=6, n_teacher=10).double()
    with torch.no_grad():
        aam.logits.normal_(0, 2)
    aligned = aam(student)
    assert aligned.shape == (3, 10, 5, 6)
    w = aam.weights()
    assert torch.allclose(w.sum(-1), torch.ones(10, dtype=w.dtype))
    assert (w > 0).all()
    # each aligned map is the weighted sum of the student maps (a 1x1 convolution)
    expected = torch.nn.functional.conv2d(student, w.to(student.dtype)[:, :, None, None])
    assert torch.allclose(aligned, expected, atol=1e-12)
    real_rows = (student.sum(-1) > 0).all(1, keepdim=True).expand(3, 10, 5)
    assert torch.allclose(aligned.sum(-1)[real_rows], torch.ones(()).double())
    assert (aligned[km[:, None, None, :].expand_as(aligned).logical_not()] == 0).all()
    # it is trained by the KL and starts as the plain mean of the student's heads
    fresh = AttentionAlignment(6, 10).double()
    assert torch.allclose(fresh(student)[:, 0], student.mean(1))
    attention_kl(teacher.repeat(1, 2, 1, 1)[:, :10], fresh(student), qm, km).backward()
    assert fresh.logits.grad.abs().sum() > 0
