"""Selective word-level KD (Wang et al., ACL 2021, "Selective Knowledge Distillation for
Neural Machine Translation"): the KD term on the words the student finds hardest.

A word's difficulty is the student's cross-entropy on its gold token,
``CE_i = -log p(y_i | x, y_<i)`` (temperature 1, no label smoothing): the
``nll`` row of :func:`fairseq_kd.losses.token_losses`, read without gradient
(it ranks words, it is not a loss).

The rule, one for both levels: given a pool ``P`` of CEs and the ratio
``r`` in (0, 1], let ``k = ceil(r * |P|)`` and ``t`` the k-th largest value
of ``P`` (:func:`selection_threshold`); a real (non-padding) word i of the
micro-batch is selected iff ``CE_i >= t`` (:func:`select_words`).  Every word
tied with ``t`` is selected, so exact ties can select more than ``k`` words;
the set depends on the values only, never on the order of the words.

* batch level (:func:`batch_selection`): ``P`` = the micro-batch's real words,
  so the top r of them (ties at the threshold included);
* global level (:func:`global_selection`): ``P`` = a FIFO queue
  (:class:`CEQueue`) of the CEs of the last N real words trained on, *after*
  the micro-batch's own words have been pushed (push, then threshold, as in
  Wang et al.'s code), so the threshold is the (1 - r) quantile of recent
  history and does not depend on what one batch holds.  Until N words have
  been seen the queue holds fewer (at the first step: the batch itself, i.e.
  batch level).

Only the KD term is restricted: every word keeps its (label-smoothed) NLL,
and the selected words' KL is summed; the criterion still divides by its
usual ``sample_size`` (all target tokens), so unselected words add 0 to the
KD sum rather than being left out of the divisor.
"""
import math

import torch

# Slack on r * n against float rounding (0.3 * 10 is 3.0000000000000004, whose ceil is 4).
_RATIO_SLACK = 1e-6

SELECT_MODES = ("none", "batch", "global")


def selected_count(ratio, n):
    """``k = ceil(ratio * n)``, at least 1 when n > 0: how many of the pool's n CEs
    lie at or above the threshold (more when they tie)."""
    if n == 0:
        return 0
    return min(n, max(1, math.ceil(ratio * n - _RATIO_SLACK)))


def selection_threshold(pool, ratio):
    """The k-th largest value of the 1-D ``pool``, ``k = selected_count(ratio, len)``
    (0-dim tensor); +inf for an empty pool (nothing is selected)."""
    n = pool.numel()
    if n == 0:
        return pool.new_full((), math.inf)
    k = selected_count(ratio, n)
    return pool.kthvalue(n - k + 1).values  # the (n-k+1)-th smallest is the k-th largest


def select_words(ce, real, threshold):
    """(N,) bool: the real words whose CE is at or above ``threshold``."""
    return real & (ce >= threshold)


def batch_selection(ce, real, ratio):
    """Batch level: ``(selected (N,) bool, threshold)`` over the real words of ``ce``.

    ce: (N,) the student's CE on each gold word (any rows, padding included);
    real: (N,) bool, the non-padding rows.
    """
    threshold = selection_threshold(ce[real], ratio)
    return select_words(ce, real, threshold), threshold


class CEQueue:
    """FIFO of the CEs of the last ``size`` real words, oldest first.

    A micro-batch's words enter in row order (``target.view(-1)``); a batch
    with more than ``size`` words leaves only its last ``size``.  Values keep
    the dtype the CEs were computed in (float32 under --fp16/--bf16: the fused
    loss upcasts) and follow the CEs' device.
    """

    def __init__(self, size):
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.size = int(size)
        self.values = torch.zeros(0)

    def __len__(self):
        return self.values.numel()

    def pushed(self, ce):
        """The queue's values after pushing ``ce`` (1-D), without changing the queue."""
        return torch.cat((self.values.to(ce), ce.detach()))[-self.size:]

    def push(self, ce):
        self.values = self.pushed(ce)
        return self.values

    def state_dict(self):
        """For checkpoints: plain CPU tensors and ints."""
        return {"size": self.size, "values": self.values.detach().cpu()}

    def load_state_dict(self, state):
        """Restore the values (the newest ``size`` of them if the queue is now smaller)."""
        self.values = state["values"].detach().reshape(-1)[-self.size:].clone()


def global_selection(ce, real, ratio, queue, update=True):
    """Global level: push the real words' CEs into ``queue``, then threshold on the queue.

    Returns ``(selected (N,) bool, threshold)``.  ``update=False`` computes
    the same threshold (as if pushed) but leaves the queue as it was:
    validation must not change training's history.
    """
    pool = queue.push(ce[real]) if update else queue.pushed(ce[real])
    threshold = selection_threshold(pool, ratio)
    return select_words(ce, real, threshold), threshold


class WordSelection:
    """``--kd-select batch|global``: which words get the KD term (see the module docstring).

    Called with ``(ce, real)`` it returns ``(selected, threshold)``; the global
    level keeps its :class:`CEQueue` here (``update``: whether this call
    pushes into it).
    """

    def __init__(self, mode, ratio, queue_size):
        if mode not in ("batch", "global"):
            raise ValueError(f"selection mode must be batch or global, got {mode!r}")
        self.mode, self.ratio = mode, float(ratio)
        self.queue = CEQueue(queue_size) if mode == "global" else None

    def __call__(self, ce, real, update=True):
        ce = ce.detach()
        if self.queue is None:
            return batch_selection(ce, real, self.ratio)
        return global_selection(ce, real, self.ratio, self.queue, update)
