"""Loss maths shared by every fairseq_kd criterion.

Pure functions on tensors, no fairseq state: each criterion calls these and a
test can check them against a brute-force formula.

Conventions (``../shared/METHODS.md`` section 1):

* A teacher distribution is given by *scores* ``s`` such that the teacher's
  distribution at temperature T is ``q_T = softmax(s / T)`` over its support.
  For one teacher the scores are its logits; for an ensemble they are the
  log of the members' averaged T=1 probabilities (so the temperature is
  applied to the ensemble, the same way for dense, top-k and cached
  teachers); for a top-k teacher they are the k best scores and the support
  is those k token ids (``q`` renormalised over them).
* Word-level KD is ``KL(q_T || p_T)`` summed over non-padding target tokens.
  It differs from the cross-entropy ``-sum q_T log p_T`` of Kim & Rush only by
  the teacher's entropy, a constant for the student, so gradients are equal;
  KL is reported because it is 0 when the student matches the teacher.
* Every loss is sum-reduced over tokens, like fairseq's own criterions; the
  trainer divides by ``sample_size``.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

# Rows of the flattened (tokens x vocab) logits processed at once by the KL:
# bounds the temporaries to CHUNK x V floats whatever the batch size.
DEFAULT_CHUNK_TOKENS = 256


@dataclass
class TeacherDistribution:
    """Teacher scores for every target position of a batch, flattened to rows.

    ``scores``: (N, V) dense, or (N, k) with ``index`` (N, k) token ids for a
    top-k teacher.  Rows follow ``target.view(-1)`` of the batch.
    """

    scores: torch.Tensor
    index: Optional[torch.Tensor] = None

    @property
    def is_sparse(self):
        return self.index is not None

    def topk(self, k):
        """Keep the k highest-scoring tokens of each row (no-op for k <= 0)."""
        if k <= 0 or (self.is_sparse and k >= self.index.size(1)):
            return self
        if self.is_sparse:
            scores, pos = self.scores.topk(k, dim=-1)
            return TeacherDistribution(scores, self.index.gather(-1, pos))
        scores, index = self.scores.topk(k, dim=-1)
        return TeacherDistribution(scores, index)


def _upcast(x):
    """fp16/bf16 -> fp32 for softmax maths; fp32/fp64 kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def ensemble_scores(member_logits):
    """Scores of an averaged-probability ensemble: log mean_m softmax(z_m).

    A single member's logits are returned as they are (softmax is invariant
    to the shift by log Z), which spares one B*T*V tensor.
    """
    if len(member_logits) == 1:
        return member_logits[0]
    stacked = torch.stack([F.log_softmax(_upcast(z), dim=-1) for z in member_logits])
    return torch.logsumexp(stacked, dim=0) - math.log(len(member_logits))


def _chunk_kl_and_grad(student, scores, index, temperature, need_grad):
    """KL(q_T || p_T) per row for one chunk, and optionally d KL / d student."""
    log_p = F.log_softmax(_upcast(student) / temperature, dim=-1)
    log_q = F.log_softmax(_upcast(scores) / temperature, dim=-1)
    q = log_q.exp()
    log_p_support = log_p if index is None else log_p.gather(-1, index)
    kl = (q * (log_q - log_p_support)).sum(-1)
    if not need_grad:
        return kl, None
    # d/ds KL(q || softmax(s/T)) = (p_T - q) / T, with q zero off its support.
    grad = log_p.exp()
    if index is None:
        grad -= q
    else:
        grad.scatter_add_(-1, index, -q)
    return kl, grad / temperature


class _ChunkedKL(torch.autograd.Function):
    """Per-row KL, computed and differentiated chunk by chunk.

    Autograd through log_softmax would keep (N, V) float32 activations for the
    backward pass; here only the inputs are kept and the backward pass
    recomputes each chunk's gradient, so peak extra memory is CHUNK x V.
    The output is one value per row, so callers can weight rows freely
    (padding masks, per-sentence gates) at O(N) cost.
    """

    @staticmethod
    def forward(ctx, student, scores, index, temperature, chunk):
        rows = _upcast(student).new_empty(student.size(0))
        for start in range(0, student.size(0), chunk):
            sl = slice(start, start + chunk)
            rows[sl], _ = _chunk_kl_and_grad(
                student[sl], scores[sl], None if index is None else index[sl],
                temperature, need_grad=False,
            )
        ctx.save_for_backward(student, scores, index)
        ctx.temperature, ctx.chunk = temperature, chunk
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        student, scores, index = ctx.saved_tensors
        grad_student = torch.zeros_like(student)
        for start in range(0, student.size(0), ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            _, grad = _chunk_kl_and_grad(
                student[sl], scores[sl], None if index is None else index[sl],
                ctx.temperature, need_grad=True,
            )
            grad_student[sl] = (grad * grad_rows[sl].unsqueeze(-1)).to(student.dtype)
        return grad_student, None, None, None, None


def kd_kl_rows(student_logits, teacher, temperature=1.0, chunk_tokens=DEFAULT_CHUNK_TOKENS):
    """KL(q_T || p_T) of every row, shape (N,), differentiable w.r.t. the student.

    student_logits: (N, V) raw student logits (any float dtype); teacher:
    :class:`TeacherDistribution` with N rows.  Padding rows are *not* masked
    here: multiply by a mask (or any per-row weights) before summing.
    """
    if student_logits.size(0) != teacher.scores.size(0):
        raise ValueError(
            f"student has {student_logits.size(0)} target positions, "
            f"teacher {teacher.scores.size(0)}"
        )
    return _ChunkedKL.apply(
        student_logits, teacher.scores.detach(), teacher.index,
        float(temperature), int(chunk_tokens),
    )


def kd_kl_divergence(student_logits, teacher, mask, temperature=1.0,
                     chunk_tokens=DEFAULT_CHUNK_TOKENS):
    """sum over rows with ``mask`` of KL(q_T || p_T).

    student_logits: (N, V) raw student logits (any float dtype);
    teacher: :class:`TeacherDistribution` with N rows; mask: (N,) bool.
    No gradient flows to the teacher.
    """
    rows = kd_kl_rows(student_logits, teacher, temperature, chunk_tokens)
    return (rows * mask.to(rows.dtype)).sum()


def _mix_word_kd(ls_loss, kd, alpha, temperature):
    return (1.0 - alpha) * ls_loss + alpha * temperature ** 2 * kd


class _FusedWordKD(torch.autograd.Function):
    """Label-smoothed NLL and KL(q_T || p_T) in one chunked pass.

    fairseq's NLL keeps the (N, V) float32 log-probs for its backward pass and
    autograd would add a second (N, V) gradient for the KL branch; here both
    terms read the raw logits chunk by chunk and the backward pass writes one
    (N, V) gradient, so word-level KD needs no more memory than plain
    cross-entropy.  Per row, with p = softmax(s), p_T = softmax(s / T):
        d LS / ds = (1 - eps - eps_i) (p - onehot(y)) + eps_i (V p - 1)
        d KL / ds = (p_T - q_T) / T
    """

    @staticmethod
    def forward(ctx, student, target, scores, index, mask, alpha, temperature, epsilon, chunk):
        dtype = _upcast(student).dtype
        sums = torch.zeros(3, dtype=dtype, device=student.device)  # ls, nll, kd
        eps_i = epsilon / (student.size(-1) - 1)
        for start in range(0, student.size(0), chunk):
            sl = slice(start, start + chunk)
            lp = F.log_softmax(_upcast(student[sl]), dim=-1)
            nll = -lp.gather(-1, target[sl, None]).squeeze(-1)
            ls = (1.0 - epsilon - eps_i) * nll - eps_i * lp.sum(-1)
            kd, _ = _chunk_kl_and_grad(student[sl], scores[sl], None if index is None else index[sl],
                                       temperature, need_grad=False)
            m = mask[sl]
            sums += torch.stack([(ls * m).sum(), (nll * m).sum(), (kd * m).sum()])
        ctx.save_for_backward(student, target, scores, index, mask)
        ctx.params = (alpha, temperature, epsilon, chunk)
        loss = (1.0 - alpha) * sums[0] + alpha * temperature ** 2 * sums[2]
        nll_sum, kd_sum = sums[1].clone(), sums[2].clone()
        ctx.mark_non_differentiable(nll_sum, kd_sum)
        return loss, nll_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll, _grad_kd):
        student, target, scores, index, mask = ctx.saved_tensors
        alpha, temperature, epsilon, chunk = ctx.params
        V = student.size(-1)
        eps_i = epsilon / (V - 1)
        grad_student = torch.empty_like(student)
        for start in range(0, student.size(0), chunk):
            sl = slice(start, start + chunk)
            p = F.softmax(_upcast(student[sl]), dim=-1)
            g = p * ((1.0 - epsilon - eps_i) + eps_i * V) - eps_i
            g.scatter_add_(-1, target[sl, None],
                           torch.full_like(g[:, :1], -(1.0 - epsilon - eps_i)))
            g *= 1.0 - alpha
            _, g_kd = _chunk_kl_and_grad(student[sl], scores[sl], None if index is None else index[sl],
                                         temperature, need_grad=True)
            g += (alpha * temperature ** 2) * g_kd
            grad_student[sl] = (g * (mask[sl, None] * grad_loss)).to(student.dtype)
        return grad_student, None, None, None, None, None, None, None, None


def word_kd_loss(student_logits, target, teacher, padding_idx, alpha, temperature,
                 epsilon=0.0, lprobs=None, chunk_tokens=DEFAULT_CHUNK_TOKENS):
    """Word-level KD: ``(1-alpha) * LS-NLL + alpha * T^2 * KL(q_T || p_T)``.

    student_logits: (B, T, V); target: (B, T); teacher: rows of
    ``target.view(-1)`` (unused, may be None, when alpha = 0).
    Returns ``(loss, nll_loss, kd_loss)``, each summed over non-pad tokens.

    alpha = 0 is computed exactly as fairseq's ``label_smoothed_cross_entropy``
    (from ``lprobs``, the student's float log-probs, when given); alpha > 0 by
    the fused chunked function above, which keeps no (N, V) activation.
    """
    flat_target = target.reshape(-1)
    if alpha == 0.0:
        if lprobs is None:
            lprobs = F.log_softmax(_upcast(student_logits), dim=-1)
        ls_loss, nll_loss = label_smoothed_nll_loss(
            lprobs.reshape(-1, lprobs.size(-1)), flat_target, epsilon,
            ignore_index=padding_idx, reduce=True,
        )
        return ls_loss, nll_loss, ls_loss.new_zeros(())
    logits = student_logits.reshape(-1, student_logits.size(-1))
    if logits.size(0) != teacher.scores.size(0):
        raise ValueError(f"student has {logits.size(0)} target positions, teacher {teacher.scores.size(0)}")
    mask = flat_target.ne(padding_idx).to(_upcast(logits).dtype)
    return _FusedWordKD.apply(
        logits, flat_target, teacher.scores.detach(), teacher.index, mask,
        float(alpha), float(temperature), float(epsilon), int(chunk_tokens),
    )


def attention_kl(teacher_maps, student_maps, query_mask, key_mask):
    """Attention-map KD (A2D): KL(teacher row || student row), masked and normalised.

    teacher_maps, student_maps: (B, C, Tq, Tk) attention probabilities, C
    heads each (the student's already aligned to the teacher's heads); every
    valid row is a distribution over the valid keys.  query_mask (B, Tq) and
    key_mask (B, Tk) are True at real (non-padding) tokens.

    Returns sum over valid query rows of the mean over the C heads of
    ``sum_k t log(t / s)`` over valid keys: sum-reduced over tokens like
    every other term (the trainer divides by ``sample_size``), so its weight
    does not depend on the batch size, and averaged over heads so ``beta``
    does not depend on the teacher's size.  Padded queries and keys
    contribute nothing, whatever the maps hold there (even NaN).  Maps are
    used as given (no second softmax); student zeros where the teacher has
    mass are clamped to the smallest positive float instead of giving inf.
    No gradient flows to the teacher.
    """
    if teacher_maps.shape != student_maps.shape:
        raise ValueError(f"teacher maps {tuple(teacher_maps.shape)} and student maps "
                         f"{tuple(student_maps.shape)} differ")
    t = _upcast(teacher_maps.detach())
    s = _upcast(student_maps)
    valid = (query_mask.bool()[:, None, :, None] & key_mask.bool()[:, None, None, :])
    t = torch.where(valid, t, torch.zeros((), dtype=t.dtype, device=t.device))
    s = torch.where(valid, s, torch.ones((), dtype=s.dtype, device=s.device))
    tiny = torch.finfo(s.dtype).tiny
    kl = torch.xlogy(t, t) - t * torch.log(s.clamp_min(tiny))
    return kl.sum() / teacher_maps.size(1)


# -- intermediate-layer KD (METHODS.md section 4) -----------------------------
# Floor of the L2 norm in the normalisation: a zero vector stays zero instead
# of becoming NaN (fairseq zeroes padded embeddings; padding is masked anyway).
NORM_EPS = 1e-6


def normalized_mse(student, teacher, eps=NORM_EPS):
    """sum over rows of ``|| s/|s| - t/|t| ||^2`` (PKD's normalised MSE).

    student, teacher: (N, C) rows already restricted to real tokens.  Each
    row contributes ``2 - 2 cos(s, t)``, in [0, 4], so the term does not
    depend on the (very different) scales of teacher and student states.
    """
    s = F.normalize(_upcast(student), dim=-1, eps=eps)
    t = F.normalize(_upcast(teacher).to(s.dtype), dim=-1, eps=eps)
    return (s - t).pow(2).sum()


def combine_teacher_layers(teacher_states, group):
    """Concatenate the teacher layers of a group on the hidden dimension."""
    return torch.cat([teacher_states[j] for j in group], dim=-1)


def layer_kd_loss(student_states, teacher_states, groups, projections, mask):
    """CKD layer term: ``sum_i normalized_mse(W_i h_S^i, concat_{j in G_i} h_T^j)``.

    student_states: one (..., C_S) tensor per student layer; teacher_states:
    one (..., C_T) tensor per teacher layer (same leading shape, e.g. the
    T x B of fairseq); groups: teacher layer indices per student layer;
    projections: callables mapping C_S to ``len(G_i) * C_T``; mask: bool,
    the leading shape, True on real tokens.  Padding positions are dropped
    before the projection, so they contribute nothing and get no gradient.
    The teacher is detached.
    """
    if len(student_states) != len(groups) or len(projections) != len(groups):
        raise ValueError(f"{len(student_states)} student states, {len(groups)} groups, "
                         f"{len(projections)} projections: need one of each per student layer")
    total = None
    for h_s, group, project in zip(student_states, groups, projections):
        target = combine_teacher_layers(teacher_states, group).detach()
        term = normalized_mse(project(h_s[mask]), target[mask])
        total = term if total is None else total + term
    return total


# --------------------------------------------------------------------------
# Per-sentence terms and the gate of hybrid_kd (METHODS.md section 3)

def label_smoothed_sentence_nll(lprobs, target, epsilon, padding_idx):
    """Label-smoothed and plain NLL of each sentence, shapes (B,).

    lprobs: (B, T, V) float log-probabilities; target: (B, T).  Token terms
    are exactly fairseq's ``label_smoothed_nll_loss``, summed per row.
    """
    B, T = target.shape
    ls, nll = label_smoothed_nll_loss(
        lprobs.reshape(B * T, -1), target.reshape(-1), epsilon,
        ignore_index=padding_idx, reduce=False,
    )
    return ls.view(B, T).sum(1), nll.view(B, T).sum(1)


def word_kd_sentence_losses(student_logits, target, teacher, padding_idx, alpha, temperature,
                            epsilon=0.0, lprobs=None):
    """:func:`word_kd_loss` per sentence: ``(loss, nll_loss, kd_loss)``, each (B,).

    Their sums equal :func:`word_kd_loss`'s values (up to summation order).
    ``teacher`` may be None when ``alpha`` is 0.
    """
    if lprobs is None:
        lprobs = F.log_softmax(_upcast(student_logits), dim=-1)
    ls_loss, nll_loss = label_smoothed_sentence_nll(lprobs, target, epsilon, padding_idx)
    if alpha == 0.0:
        kd = torch.zeros_like(ls_loss)
    else:
        rows = kd_kl_rows(student_logits.reshape(-1, student_logits.size(-1)), teacher, temperature)
        kd = (rows * target.reshape(-1).ne(padding_idx).to(rows.dtype)).view(target.shape).sum(1)
    return _mix_word_kd(ls_loss, kd, alpha, temperature), nll_loss, kd


def hybrid_mix(gate, tok_loss, sent_loss):
    """sum_i g_i * L_tok_i + (1 - g_i) * L_sent_i  (all (B,); gate may be a scalar)."""
    return (gate * tok_loss + (1.0 - gate) * sent_loss).sum()


def bernoulli_kl_from_logits(logits, prior):
    """KL(Bernoulli(sigmoid(logits)) || Bernoulli(prior)), elementwise, stable."""
    g = torch.sigmoid(logits)
    log_g, log_1mg = F.logsigmoid(logits), F.logsigmoid(-logits)
    return g * (log_g - math.log(prior)) + (1.0 - g) * (log_1mg - math.log1p(-prior))


def gate_objective(gate_logits, rel_tok, rel_sent, prior, strength):
    """The gate's own objective, per sentence (the student never sees it).

        J_i = g_i * r_tok_i + (1 - g_i) * r_sent_i + strength * KL(Bern(g_i) || Bern(prior))

    ``rel_tok``/``rel_sent`` are *unit-free* losses (each per-token loss
    divided by that term's running mean), so rescaling either term leaves J
    unchanged.  J is convex in the gate's logit with minimiser
    :func:`optimal_gate`: the prior keeps g inside (0, 1), the data move it
    by ``(r_sent - r_tok) / strength`` logits.
    """
    g = torch.sigmoid(gate_logits)
    return (g * rel_tok + (1.0 - g) * rel_sent
            + strength * bernoulli_kl_from_logits(gate_logits, prior))


def optimal_gate(rel_tok, rel_sent, prior, strength):
    """argmin_g of :func:`gate_objective`: sigmoid(logit(prior) + (r_sent - r_tok) / strength)."""
    return torch.sigmoid(math.log(prior / (1.0 - prior)) + (rel_sent - rel_tok) / strength)
