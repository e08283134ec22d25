"""Word-level KD (Kim & Rush 2016; Hinton et al. 2015): teacher distributions,
the KL and the fused label-smoothed NLL + KL that every criterion's word part uses.

:func:`token_losses` is the one fused per-token function (LS-NLL, NLL and
KL in one chunked pass, no (N, V) activation kept); :func:`word_kd_loss`
sums it into a criterion's word part, :func:`fairseq_kd.losses.hybrid.
hybrid_sentence_losses` into hybrid_kd's per-sentence terms.
:func:`kd_kl_rows` / :func:`kd_kl_divergence` are the KL alone.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from fairseq_kd.losses.common import upcast

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


def ensemble_scores(member_logits):
    """Scores of an averaged-probability ensemble: log mean_m softmax(z_m).

    A single member's logits are returned as they are (softmax is invariant
    to the shift by log Z), which spares one B*T*V tensor.
    """
    if len(member_logits) == 1:
        return member_logits[0]
    stacked = torch.stack([F.log_softmax(upcast(z), dim=-1) for z in member_logits])
    return torch.logsumexp(stacked, dim=0) - math.log(len(member_logits))


def _chunk_kl_and_grad(student, scores, index, temperature, need_grad):
    """KL(q_T || p_T) per row for one chunk, and optionally d KL / d student."""
    log_p = F.log_softmax(upcast(student) / temperature, dim=-1)
    log_q = F.log_softmax(upcast(scores) / temperature, dim=-1)
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
        rows = upcast(student).new_empty(student.size(0))
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


def mix_word_kd(ls_loss, kd, alpha, temperature, nll_weight=None):
    """``nll_weight * LS-NLL + alpha * T^2 * KL``; ``nll_weight`` None: ``1 - alpha``.

    The one place the word-KD mix is written (``word_kd_loss`` and
    ``hybrid_sentence_losses`` use it).  A method whose own term takes part
    of the NLL's weight (``ckd``: ``1 - alpha - beta``) passes ``nll_weight``.
    """
    if nll_weight is None:
        nll_weight = 1.0 - alpha
    return nll_weight * ls_loss + alpha * temperature ** 2 * kd


def _chunk_bounds(n_rows, chunk, teacher_rows):
    """(student rows, teacher rows, local index) of each chunk of ``chunk`` student rows.

    ``teacher_rows``: None (teacher row i is student row i) or the strictly
    increasing student row of each teacher row.  The local index picks, inside the chunk,
    the rows that have a teacher (None: all of them, in order).
    """
    starts = list(range(0, n_rows, chunk))
    if teacher_rows is None:
        for s in starts:
            yield slice(s, s + chunk), slice(s, s + chunk), None
        return
    edges = torch.tensor(starts + [n_rows], device=teacher_rows.device)
    bounds = torch.searchsorted(teacher_rows, edges).tolist()
    for s, j0, j1 in zip(starts, bounds[:-1], bounds[1:]):
        rows = slice(s, min(s + chunk, n_rows))
        if j1 == j0:
            yield rows, None, None
        elif j1 - j0 == rows.stop - rows.start:  # every row of the chunk has a teacher
            yield rows, slice(j0, j1), None
        else:
            yield rows, slice(j0, j1), teacher_rows[j0:j1] - s


class _FusedWordKD(torch.autograd.Function):
    """Per-row label-smoothed NLL, NLL and KL(q_T || p_T) in one chunked pass.

    Autograd through fairseq's NLL keeps the (N, V) float32 log-probs for its
    backward pass and a KL branch would add a second (N, V) gradient; here
    every term reads the raw logits chunk by chunk, only the inputs are kept,
    and the backward pass recomputes each chunk and writes a single (N, V)
    gradient, so word-level KD needs no more memory than plain cross-entropy.
    The outputs are one value per row (0 on padding rows, and on rows without
    a teacher for the KL), so callers weight and sum rows freely (a total, per
    sentence) at O(N) cost; the backward pass takes one upstream gradient per
    row and term.  Per row, with p = softmax(s), p_T = softmax(s / T):
        d LS  / ds = (1 - eps - eps_i) (p - onehot(y)) + eps_i (V p - 1)
        d NLL / ds = p - onehot(y)
        d KL  / ds = (p_T - q_T) / T
    """

    @staticmethod
    def forward(ctx, student, target, mask, scores, index, teacher_rows, temperature, epsilon, chunk):
        N, V = student.shape
        dtype = upcast(student).dtype
        ls, nll, kd = (torch.zeros(N, dtype=dtype, device=student.device) for _ in range(3))
        eps_i = epsilon / (V - 1)
        has_teacher = scores is not None
        for rows, trows, local in _chunk_bounds(N, chunk, teacher_rows if has_teacher else None):
            s, m = upcast(student[rows]), mask[rows]
            lp = F.log_softmax(s, dim=-1)
            nll_rows = -lp.gather(-1, target[rows, None]).squeeze(-1)
            ls[rows] = ((1.0 - epsilon - eps_i) * nll_rows - eps_i * lp.sum(-1)) * m
            nll[rows] = nll_rows * m
            if not has_teacher or trows is None:
                continue
            kd_rows, _ = _chunk_kl_and_grad(
                s if local is None else s.index_select(0, local), scores[trows],
                None if index is None else index[trows], temperature, need_grad=False)
            if local is None:
                kd[rows] = kd_rows * m
            else:
                kd[rows].index_copy_(0, local, kd_rows * m[local])
        ctx.save_for_backward(student, target, mask, scores, index, teacher_rows)
        ctx.params = (temperature, epsilon, chunk)
        ctx.set_materialize_grads(False)
        return ls, nll, kd

    @staticmethod
    def backward(ctx, grad_ls, grad_nll, grad_kd):
        student, target, mask, scores, index, teacher_rows = ctx.saved_tensors
        temperature, epsilon, chunk = ctx.params
        if scores is None:
            grad_kd = None
        if grad_ls is None and grad_nll is None and grad_kd is None:
            return (None,) * 9
        N, V = student.shape
        eps_i = epsilon / (V - 1)
        grad_student = torch.empty_like(student)
        for rows, trows, local in _chunk_bounds(N, chunk, teacher_rows if scores is not None else None):
            s, m = upcast(student[rows]), mask[rows]
            if grad_ls is not None or grad_nll is not None:
                # c_ls d LS + c_nll d NLL = p (c_ls (1 - eps - eps_i + eps_i V) + c_nll)
                #   - c_ls eps_i - (c_ls (1 - eps - eps_i) + c_nll) onehot(y)
                c_ls = grad_ls[rows] * m if grad_ls is not None else torch.zeros_like(m)
                c_nll = grad_nll[rows] * m if grad_nll is not None else torch.zeros_like(m)
                p = F.softmax(s, dim=-1)
                g = p * (c_ls * ((1.0 - epsilon - eps_i) + eps_i * V) + c_nll).unsqueeze(-1)
                g -= (c_ls * eps_i).unsqueeze(-1)
                g.scatter_add_(-1, target[rows, None],
                               -(c_ls * (1.0 - epsilon - eps_i) + c_nll).unsqueeze(-1))
            else:
                g = torch.zeros_like(s)
            if grad_kd is not None and trows is not None:
                c_kd = grad_kd[rows] * m
                _, g_kd = _chunk_kl_and_grad(
                    s if local is None else s.index_select(0, local), scores[trows],
                    None if index is None else index[trows], temperature, need_grad=True)
                if local is None:
                    g += c_kd.unsqueeze(-1) * g_kd
                else:
                    g.index_add_(0, local, c_kd[local].unsqueeze(-1) * g_kd)
            grad_student[rows] = g.to(student.dtype)
        return grad_student, None, None, None, None, None, None, None, None


def token_losses(student_logits, target, teacher, padding_idx, temperature=1.0, epsilon=0.0,
                 teacher_rows=None, chunk_tokens=DEFAULT_CHUNK_TOKENS):
    """Per-row ``(ls, nll, kd)`` of flattened logits, each (N,), differentiable.

    student_logits: (N, V) raw student logits (any float dtype); target: (N,).
    ``ls`` is fairseq's label-smoothed NLL (``epsilon``), ``nll`` the plain
    NLL, ``kd`` KL(q_T || p_T); all three are 0 on rows whose target is
    ``padding_idx`` (and get no gradient there).  teacher: None (``kd`` is 0)
    or a :class:`TeacherDistribution` whose rows belong to the student rows
    ``teacher_rows`` (a strictly increasing (M,) index; default: all N rows);
    ``kd`` is 0 on rows without a teacher row.  No gradient flows to the
    teacher.  Nothing (N, V) is kept for the backward pass beyond the inputs.
    """
    if student_logits.dim() != 2 or target.shape != student_logits.shape[:1]:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and target "
                         f"{tuple(target.shape)}: need (N, V) and (N,)")
    n_teacher = student_logits.size(0) if teacher_rows is None else teacher_rows.numel()
    if teacher is not None and teacher_rows is not None and teacher_rows.numel():
        teacher_rows = teacher_rows.reshape(-1)
        if not (bool((teacher_rows[1:] > teacher_rows[:-1]).all()) and int(teacher_rows[0]) >= 0
                and int(teacher_rows[-1]) < student_logits.size(0)):
            raise ValueError("teacher_rows must be strictly increasing student rows")
    if teacher is not None and teacher.scores.size(0) != n_teacher:
        raise ValueError(f"student has {n_teacher} target positions, teacher {teacher.scores.size(0)}")
    mask = target.ne(padding_idx).to(upcast(student_logits).dtype)
    return _FusedWordKD.apply(
        student_logits, target, mask,
        None if teacher is None else teacher.scores.detach(),
        None if teacher is None else teacher.index,
        None if teacher is None or teacher_rows is None else teacher_rows.reshape(-1),
        float(temperature), float(epsilon), int(chunk_tokens),
    )


def word_kd_loss(student_logits, target, teacher, padding_idx, alpha, temperature,
                 epsilon=0.0, lprobs=None, nll_weight=None, chunk_tokens=DEFAULT_CHUNK_TOKENS,
                 select=None):
    """Word-level KD: ``(1-alpha) * LS-NLL + alpha * T^2 * KL(q_T || p_T)``.

    The word-KD loss of every criterion (``KDCriterionBase.forward``).
    ``nll_weight``: the weight of the LS-NLL when it is not ``1 - alpha``
    (:func:`mix_word_kd`).

    ``select``: None (every word's KL), or a function ``(ce, real) -> (N,)
    bool`` of the flattened rows' detached student NLL ``ce`` and non-padding
    mask ``real`` that says which words' KL enters the loss (selective KD,
    :mod:`fairseq_kd.losses.selective`); the others keep their LS-NLL only,
    and their KL gets no gradient.  The returned KL is the selected words'.

    student_logits: (B, T, V); target: (B, T); teacher: rows of
    ``target.view(-1)`` (unused, may be None, when alpha = 0).
    Returns ``(loss, nll_loss, kd_loss)``, each summed over non-pad tokens.

    alpha = 0 is computed exactly as fairseq's ``label_smoothed_cross_entropy``
    (from ``lprobs``, the student's float log-probs, when given); alpha > 0 is
    the sum of :func:`token_losses`, which keeps no (N, V) activation.
    """
    flat_target = target.reshape(-1)
    if alpha == 0.0:
        if lprobs is None:
            lprobs = F.log_softmax(upcast(student_logits), dim=-1)
        ls_loss, nll_loss = label_smoothed_nll_loss(
            lprobs.reshape(-1, lprobs.size(-1)), flat_target, epsilon,
            ignore_index=padding_idx, reduce=True,
        )
        loss = ls_loss if nll_weight is None else nll_weight * ls_loss
        return loss, nll_loss, ls_loss.new_zeros(())
    ls, nll, kd = token_losses(student_logits.reshape(-1, student_logits.size(-1)), flat_target,
                               teacher, padding_idx, temperature, epsilon, chunk_tokens=chunk_tokens)
    if select is not None:
        selected = select(nll.detach(), flat_target.ne(padding_idx))
        kd = kd * selected.to(kd.dtype)  # a 0 weight: no gradient to unselected rows' KL
    ls, kd = ls.sum(), kd.sum()
    return mix_word_kd(ls, kd, alpha, temperature, nll_weight), nll.sum(), kd

