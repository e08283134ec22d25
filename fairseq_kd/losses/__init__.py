"""Loss maths of every fairseq_kd criterion, one module per family.

Pure functions on tensors, no fairseq state: each criterion calls these and a
test can check them against a brute-force formula.

* :mod:`~fairseq_kd.losses.word`: teacher distributions, the KL and the
  fused label-smoothed NLL + KL (``word_kd``, ``seq_kd`` and the word part of
  every other criterion);
* :mod:`~fairseq_kd.losses.attention`: attention-map KL (``a2d``);
* :mod:`~fairseq_kd.losses.layers`: normalised layer MSE (``ckd``);
* :mod:`~fairseq_kd.losses.hybrid`: per-sentence terms, gated mix, gate
  objective and complexity (``hybrid_kd``);
* :mod:`~fairseq_kd.losses.jsd`: the generalized JSD(beta) (``onpolicy_kd``);
* :mod:`~fairseq_kd.losses.selective`: which words get the word-KD term
  (``--kd-select``, Wang et al. 2021).

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
from fairseq_kd.losses.attention import attention_kl
from fairseq_kd.losses.hybrid import (
    bernoulli_kl_from_logits,
    complexity_moments,
    complexity_offsets,
    gate_objective,
    hybrid_mix,
    hybrid_sentence_losses,
    optimal_gate,
    sentence_means,
    standardized,
    teacher_entropy_rows,
)
from fairseq_kd.losses.layers import NORM_EPS, combine_teacher_layers, layer_kd_loss, normalized_mse
from fairseq_kd.losses.word import (
    DEFAULT_CHUNK_TOKENS,
    TeacherDistribution,
    ensemble_scores,
    kd_kl_divergence,
    kd_kl_rows,
    mix_word_kd,
    token_losses,
    word_kd_loss,
)
from fairseq_kd.losses.jsd import jsd_kd_loss, jsd_rows, log_mixture_ratios
from fairseq_kd.losses.selective import (
    CEQueue,
    WordSelection,
    batch_selection,
    global_selection,
    selection_threshold,
)

__all__ = [
    "DEFAULT_CHUNK_TOKENS", "NORM_EPS", "TeacherDistribution", "attention_kl",
    "bernoulli_kl_from_logits", "combine_teacher_layers", "complexity_moments",
    "complexity_offsets", "ensemble_scores", "gate_objective", "hybrid_mix", "hybrid_sentence_losses",
    "kd_kl_divergence", "kd_kl_rows", "layer_kd_loss", "mix_word_kd", "normalized_mse",
    "optimal_gate", "sentence_means", "standardized", "teacher_entropy_rows",
    "token_losses", "word_kd_loss",
    "jsd_kd_loss", "jsd_rows", "log_mixture_ratios",
    "CEQueue", "WordSelection", "batch_selection", "global_selection", "selection_threshold",
]
