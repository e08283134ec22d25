"""hybrid_kd (Wei et al. 2024): per-sentence token- and sentence-level terms,
their gated mix, the gate's own objective and the complexity gate."""
import math

import torch
import torch.nn.functional as F

from fairseq_kd.losses.common import upcast
from fairseq_kd.losses.word import DEFAULT_CHUNK_TOKENS, mix_word_kd, token_losses


def hybrid_sentence_losses(student_logits, target, hyp_target, teacher, padding_idx, alpha,
                           temperature, epsilon=0.0, chunk_tokens=DEFAULT_CHUNK_TOKENS):
    """hybrid_kd's per-sentence terms from one student pass: ``(tok, sent, nll, kd)``, each (B,).

    student_logits: (2B, L, V), the student on gold prefixes (rows :B) and on
    distilled prefixes (rows B:), right-padded to a common length L; target
    (B, T) and hyp_target (B, T') with T, T' <= L.  ``hyp_target`` None: one
    pass on gold only, (B, T, V) logits, and gold stands for y_hat: then
    ``tok`` is :func:`fairseq_kd.losses.word.word_kd_loss` per sentence.

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
    ls, nll, kd = token_losses(
        student_logits.reshape(-1, V), targets.reshape(-1), teacher if alpha else None,
        padding_idx, temperature, epsilon, teacher_rows=teacher_rows, chunk_tokens=chunk_tokens)
    ls, nll, kd = (r.view(R, L).sum(1) for r in (ls, nll, kd))
    gold, hyp = slice(0, B), slice(B, 2 * B) if hyp_target is not None else slice(0, B)
    tok = mix_word_kd(ls[gold], kd[gold], alpha, temperature)
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

    ``rel_tok``/``rel_sent`` are each sentence's per-token loss divided by a
    reference of that term (hybrid_kd's ``scalar`` and ``complexity`` gates:
    the term's per-token value at the first update, frozen; ``relative_loss``:
    its running mean), so multiplying either term by a constant leaves J
    unchanged.  That is all the division removes: a term whose floor is lower
    relative to its reference (a KL that can reach 0 against an NLL that
    cannot) still ends with the lower ratio and draws weight to itself.
    J has a single minimum in the gate's logit, at :func:`optimal_gate`: it is
    quasi-convex, not convex (its second derivative is negative far from the
    minimum, where the sigmoid flattens).  The prior keeps g inside (0, 1),
    the data move it by ``(r_sent - r_tok) / strength`` logits.
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
    rows = torch.empty(scores.size(0), dtype=upcast(scores).dtype, device=scores.device)
    with torch.no_grad():
        for start in range(0, scores.size(0), chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            rows[sl] = torch.special.entr(F.softmax(upcast(scores[sl]), dim=-1)).sum(-1)
    return rows


def sentence_means(rows, mask):
    """Mean of ``rows`` (B, T) over each sentence's ``mask`` (B, T) positions, (B,)."""
    mask = mask.to(rows.dtype)
    return (rows * mask).sum(1) / mask.sum(1).clamp(min=1)


def complexity_moments(sums):
    """(mean, mean of squares) per sentence from running sums ``[n, sum c, sum c^2]`` (last dim).

    Dividing sums, not averaging per-batch means, gives every sentence the
    same weight: fairseq batches by length, so a batch of short sentences
    holds many more of them than a batch of long ones, and a mean of batch
    means would weigh each sentence by 1 / (sentences in its batch).  With
    decayed sums (each multiplied by ``decay`` per update) the weights are
    ``decay^age``, and dividing by the decayed count ``n`` corrects the bias
    toward 0 of a young sum (as Adam's bias correction does).
    """
    count, total, total_sq = sums.unbind(-1)
    count = count.clamp(min=torch.finfo(sums.dtype).tiny)
    return total / count, total_sq / count


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
