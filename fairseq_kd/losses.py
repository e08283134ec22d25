"""Loss maths shared by every fairseq_kd criterion.

Pure functions on tensors, no fairseq state: each criterion calls these and a
test can check them against a brute-force formula.

Conventions (Kim & Rush 2016; Hinton et al. 2015):

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
        dtype = _upcast(student).dtype
        ls, nll, kd = (torch.zeros(N, dtype=dtype, device=student.device) for _ in range(3))
        eps_i = epsilon / (V - 1)
        has_teacher = scores is not None
        for rows, trows, local in _chunk_bounds(N, chunk, teacher_rows if has_teacher else None):
            s, m = _upcast(student[rows]), mask[rows]
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
            s, m = _upcast(student[rows]), mask[rows]
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


def word_kd_rows(student_logits, target, teacher, padding_idx, temperature=1.0, epsilon=0.0,
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
    mask = target.ne(padding_idx).to(_upcast(student_logits).dtype)
    return _FusedWordKD.apply(
        student_logits, target, mask,
        None if teacher is None else teacher.scores.detach(),
        None if teacher is None else teacher.index,
        None if teacher is None or teacher_rows is None else teacher_rows.reshape(-1),
        float(temperature), float(epsilon), int(chunk_tokens),
    )


def word_kd_loss(student_logits, target, teacher, padding_idx, alpha, temperature,
                 epsilon=0.0, lprobs=None, chunk_tokens=DEFAULT_CHUNK_TOKENS):
    """Word-level KD: ``(1-alpha) * LS-NLL + alpha * T^2 * KL(q_T || p_T)``.

    student_logits: (B, T, V); target: (B, T); teacher: rows of
    ``target.view(-1)`` (unused, may be None, when alpha = 0).
    Returns ``(loss, nll_loss, kd_loss)``, each summed over non-pad tokens.

    alpha = 0 is computed exactly as fairseq's ``label_smoothed_cross_entropy``
    (from ``lprobs``, the student's float log-probs, when given); alpha > 0 is
    the sum of :func:`word_kd_rows`, which keeps no (N, V) activation.
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
    ls, nll, kd = word_kd_rows(student_logits.reshape(-1, student_logits.size(-1)), flat_target,
                               teacher, padding_idx, temperature, epsilon, chunk_tokens=chunk_tokens)
    ls, kd = ls.sum(), kd.sum()
    return _mix_word_kd(ls, kd, alpha, temperature), nll.sum(), kd


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


# -- intermediate-layer KD (Wu et al. 2020) -----------------------------------
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
# Per-sentence terms and the gate of hybrid_kd (Wei et al. 2024)

def word_kd_sentence_losses(student_logits, target, teacher, padding_idx, alpha, temperature,
                            epsilon=0.0, chunk_tokens=DEFAULT_CHUNK_TOKENS):
    """:func:`word_kd_loss` per sentence: ``(loss, nll_loss, kd_loss)``, each (B,).

    student_logits: (B, T, V); target: (B, T).  Their sums equal
    :func:`word_kd_loss`'s values (up to summation order); the same fused
    per-row function (:func:`word_kd_rows`), so no (B, T, V) log-probs are
    kept.  ``teacher`` may be None when ``alpha`` is 0.
    """
    B, T = target.shape
    ls, nll, kd = word_kd_rows(
        student_logits.reshape(B * T, -1), target.reshape(-1), teacher if alpha else None,
        padding_idx, temperature, epsilon, chunk_tokens=chunk_tokens)
    ls, nll, kd = (r.view(B, T).sum(1) for r in (ls, nll, kd))
    return _mix_word_kd(ls, kd, alpha, temperature), nll, kd


def hybrid_sentence_losses(student_logits, target, hyp_target, teacher, padding_idx, alpha,
                           temperature, epsilon=0.0, chunk_tokens=DEFAULT_CHUNK_TOKENS):
    """hybrid_kd's per-sentence terms from one student pass: ``(tok, sent, nll, kd)``, each (B,).

    student_logits: (2B, L, V), the student on gold prefixes (rows :B) and on
    distilled prefixes (rows B:), right-padded to a common length L; target
    (B, T) and hyp_target (B, T') with T, T' <= L.  ``hyp_target`` None: one
    pass on gold only, (B, T, V) logits, and gold stands for y_hat.

        tok_i  = (1 - alpha) * LS-NLL(target_i) + alpha * T^2 * KL   (word_kd on sentence i)
        sent_i = LS-NLL(hyp_target_i)
        nll_i, kd_i: the plain NLL and the KL inside tok_i

    One call of the fused per-row function on all 2B x L rows (the teacher's
    rows are mapped to the gold positions): no (2B, L, V) log-probs are kept,
    and the backward pass writes one gradient for the whole logits tensor.
    """
    B, T = target.shape
    R, L, V = student_logits.shape
    if hyp_target is None:
        targets = target
    else:
        targets = torch.cat([F.pad(t, (0, L - t.size(1)), value=padding_idx)
                             for t in (target, hyp_target)])
    if targets.shape != (R, L):
        raise ValueError(f"student logits {tuple(student_logits.shape)} do not fit target "
                         f"{tuple(target.shape)} and hyp_target "
                         f"{None if hyp_target is None else tuple(hyp_target.shape)}")
    teacher_rows = None
    if teacher is not None and alpha and hyp_target is not None:  # gold position (i, j) is row i*L + j
        teacher_rows = (torch.arange(B, device=target.device)[:, None] * L
                        + torch.arange(T, device=target.device)).reshape(-1)
    ls, nll, kd = word_kd_rows(
        student_logits.reshape(-1, V), targets.reshape(-1), teacher if alpha else None,
        padding_idx, temperature, epsilon, teacher_rows=teacher_rows, chunk_tokens=chunk_tokens)
    ls, nll, kd = (r.view(R, L).sum(1) for r in (ls, nll, kd))
    gold, hyp = slice(0, B), slice(B, 2 * B) if hyp_target is not None else slice(0, B)
    tok = _mix_word_kd(ls[gold], kd[gold], alpha, temperature)
    return tok, ls[hyp], nll[gold], kd[gold]


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


# -- hybrid_kd's complexity gate ----------------------------------------------

def teacher_entropy_rows(teacher, chunk_tokens=DEFAULT_CHUNK_TOKENS):
    """Entropy in nats of the teacher's T = 1 distribution at every row, (N,), no gradient.

    A top-k teacher's entropy is that of its renormalised k best tokens.
    Computed chunk by chunk, so the temporaries stay CHUNK x V.
    """
    scores = teacher.scores.detach()
    rows = torch.empty(scores.size(0), dtype=_upcast(scores).dtype, device=scores.device)
    with torch.no_grad():
        for start in range(0, scores.size(0), chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            rows[sl] = torch.special.entr(F.softmax(_upcast(scores[sl]), dim=-1)).sum(-1)
    return rows


def sentence_means(rows, mask):
    """Mean of ``rows`` (B, T) over each sentence's ``mask`` (B, T) positions, (B,)."""
    mask = mask.to(rows.dtype)
    return (rows * mask).sum(1) / mask.sum(1).clamp(min=1)


def standardized(values, mean, mean_sq, eps=1e-6):
    """(values - mean) / std with std from a mean and a mean of squares (running statistics).

    The variance gets a floor of ``eps * (1 + mean^2)``: a spread below about
    1e-3 of the mean (float32 rounding of ``E[c^2] - E[c]^2``) counts as none,
    so nearly equal complexities give nearly equal gates instead of noise.
    """
    var = (mean_sq - mean * mean).clamp(min=0)
    return (values - mean) / torch.sqrt(var + eps * (1 + mean * mean))


def complexity_offsets(z, spread):
    """Logit offsets of the complexity gate: ``-spread * tanh(z)`` (z: standardized complexity).

    Negative for sentences more complex than average (less token-level KD,
    more sentence-level KD, Wei et al.'s hypothesis), positive for simpler
    ones; tanh bounds the offset to +-spread logits whatever the outlier.
    """
    return -spread * torch.tanh(z)
