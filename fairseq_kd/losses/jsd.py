"""Generalized Jensen-Shannon divergence JSD(beta) between teacher and student
(GKD, Agarwal et al., ICLR 2024), per target position, as ``onpolicy_kd`` trains it.

With the teacher's q = q_T, the student's p = p_T (softmaxes at temperature T)
and their mixture m = beta * q + (1 - beta) * p, the paper's divergence is

    JSD_beta(q || p) = beta * KL(q || m) + (1 - beta) * KL(p || m)

(teacher first: D(p_teacher || p_student) in the paper's notation, the
convention of TRL's GKDTrainer too).  Near beta = 0 it behaves as
beta * KL(q || p), the forward KL of word-level KD; near beta = 1 as
(1 - beta) * KL(p || q), the mode-seeking reverse KL; it vanishes at both
ends.  What is computed here is the *scaled* divergence

    D_beta = JSD_beta / (beta * (1 - beta))      for 0 < beta < 1
    D_0    = KL(q || p)                          (forward KL, exactly)
    D_1    = KL(p || q)                          (reverse KL, exactly)

which is continuous on [0, 1] (D_beta -> D_0 as beta -> 0 and -> D_1 as
beta -> 1), so the loss and gradient keep their scale as beta moves to an
end.  The approach is linear in beta (in 1 - beta) once beta is below the
row's smallest p/q (1 - beta below its smallest q/p); before that the JSD
saturates on the tokens one distribution misses, which is the point of it.
Inside (0, 1) it is the paper's JSD times the constant 1 / (beta (1 - beta))
(4 at beta = 0.5): the same minimiser, a rescaled learning rate (nothing at
all under Adam, up to its epsilon).

Numerics, float32 (fp16/bf16 logits are upcast): with d = log q - log p,

    r = log(m / p) = log((1 - beta) + beta e^d)   = logaddexp(log1p(-beta), log beta + d)
    s = log(m / q) = log(beta + (1 - beta) e^-d)  = logaddexp(log beta, log1p(-beta) - d)
    D_beta = - sum_k q_k s_k / (1 - beta) - sum_k p_k r_k / beta

Both logs are formed from d and the log weights, never from log m minus a
log-probability, so r / beta keeps full precision as beta -> 0 (r is O(beta))
and s / (1 - beta) as beta -> 1.  With z the student's logits over T, the
gradient is

    d D_beta / d z_j = p_j (g_j - sum_k p_k g_k),   g = -r / beta

(d JSD_beta / d p_k = -(1 - beta) r_k + const), which at beta = 1 (r = d) is the
reverse-KL gradient; at beta = 0 the forward-KL one, p - q, is word.py's.
As in word.py, rows are processed in chunks and the backward pass recomputes
each chunk, so nothing (N, V) is kept for it beyond the inputs.

The mixture needs the teacher's probability of every token the student can
put mass on: a top-k teacher (zero off its k tokens) is accepted only at
beta = 0, where only q's support matters.
"""
import math

import torch
import torch.nn.functional as F

from fairseq_kd.losses.common import upcast
from fairseq_kd.losses.word import DEFAULT_CHUNK_TOKENS, kd_kl_rows, token_losses


def check_beta(beta):
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"JSD beta must be in [0, 1], got {beta}")


def log_mixture_ratios(log_q, log_p, beta):
    """``(log(m / p), log(m / q))`` for m = beta q + (1 - beta) p, 0 < beta <= 1.

    At beta = 1 the second is 0 and the first is log q - log p exactly.
    """
    d = log_q - log_p
    if beta == 1.0:
        return d, torch.zeros_like(d)
    log_b, log_1mb = math.log(beta), math.log1p(-beta)
    return (torch.logaddexp(d + log_b, d.new_tensor(log_1mb)),
            torch.logaddexp(-d + log_1mb, d.new_tensor(log_b)))


def _chunk_jsd_and_grad(student, scores, beta, temperature, need_grad):
    """D_beta per row for one chunk (0 < beta <= 1), and optionally d D_beta / d student."""
    log_p = F.log_softmax(upcast(student) / temperature, dim=-1)
    log_q = F.log_softmax(upcast(scores) / temperature, dim=-1)
    r, s = log_mixture_ratios(log_q, log_p, beta)
    p = log_p.exp()
    value = -(p * r).sum(-1) / beta
    if beta < 1.0:  # KL(q || m) vanishes at beta = 1 (m = q) and 1 / (1 - beta) is undefined
        value = value - (log_q.exp() * s).sum(-1) / (1.0 - beta)
    if not need_grad:
        return value, None
    g = r.div_(-beta)
    grad = p * (g - (p * g).sum(-1, keepdim=True))
    return value, grad / temperature


class _ChunkedJSD(torch.autograd.Function):
    """Per-row D_beta, computed and differentiated chunk by chunk (as word._ChunkedKL)."""

    @staticmethod
    def forward(ctx, student, scores, beta, temperature, chunk):
        rows = upcast(student).new_empty(student.size(0))
        for start in range(0, student.size(0), chunk):
            sl = slice(start, start + chunk)
            rows[sl], _ = _chunk_jsd_and_grad(student[sl], scores[sl], beta, temperature, need_grad=False)
        ctx.save_for_backward(student, scores)
        ctx.params = (beta, temperature, chunk)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        student, scores = ctx.saved_tensors
        beta, temperature, chunk = ctx.params
        grad_student = torch.empty_like(student)
        for start in range(0, student.size(0), chunk):
            sl = slice(start, start + chunk)
            _, grad = _chunk_jsd_and_grad(student[sl], scores[sl], beta, temperature, need_grad=True)
            grad_student[sl] = (grad * grad_rows[sl].unsqueeze(-1)).to(student.dtype)
        return grad_student, None, None, None, None


def jsd_rows(student_logits, teacher, beta, temperature=1.0, chunk_tokens=DEFAULT_CHUNK_TOKENS):
    """D_beta(q_T || p_T) of every row, shape (N,), differentiable w.r.t. the student.

    student_logits: (N, V) raw logits (any float dtype); teacher: a
    :class:`~fairseq_kd.losses.word.TeacherDistribution` with N rows, dense
    unless beta = 0.  beta = 0 is :func:`~fairseq_kd.losses.word.kd_kl_rows`
    (forward KL), beta = 1 the reverse KL, in between the scaled JSD (module
    docstring).  Padding rows are not masked here.  No gradient reaches the teacher.
    """
    check_beta(beta)
    if beta == 0.0:
        return kd_kl_rows(student_logits, teacher, temperature, chunk_tokens)
    if teacher.is_sparse:
        raise ValueError("JSD with beta > 0 needs the teacher's full distribution, not its top-k")
    if student_logits.size(0) != teacher.scores.size(0):
        raise ValueError(f"student has {student_logits.size(0)} target positions, "
                         f"teacher {teacher.scores.size(0)}")
    return _ChunkedJSD.apply(student_logits, teacher.scores.detach(), float(beta),
                             float(temperature), int(chunk_tokens))


def jsd_kd_loss(student_logits, target, teacher, padding_idx, beta, temperature=1.0,
                chunk_tokens=DEFAULT_CHUNK_TOKENS):
    """``(T^2 * sum_j D_beta, sum_j NLL, sum_j D_beta)`` over non-pad target tokens.

    student_logits: (B, L, V); target: (B, L); teacher: rows of
    ``target.view(-1)``.  The loss is the divergence alone (no NLL term, GKD's
    objective), scaled by T^2 like word-level KD; the NLL of the target is
    returned for logging and carries no gradient.  beta = 0 is computed by
    :func:`~fairseq_kd.losses.word.token_losses`, the fused function of
    ``word_kd``'s loss, so it equals ``word_kd`` at alpha = 1 without label
    smoothing.
    """
    check_beta(beta)
    flat = student_logits.reshape(-1, student_logits.size(-1))
    flat_target = target.reshape(-1)
    if beta == 0.0:
        _, nll, div = token_losses(flat, flat_target, teacher, padding_idx, temperature,
                                   chunk_tokens=chunk_tokens)
        div = div.sum()
        return temperature ** 2 * div, nll.sum().detach(), div
    mask = flat_target.ne(padding_idx)
    div = (jsd_rows(flat, teacher, beta, temperature, chunk_tokens) * mask).sum()
    with torch.no_grad():  # for the log only
        _, nll, _ = token_losses(flat, flat_target, None, padding_idx, chunk_tokens=chunk_tokens)
    return temperature ** 2 * div, nll.sum(), div
