"""``word_kd``: word-level knowledge distillation (Kim & Rush 2016).

    L = (1 - alpha) * LS-NLL(y) + alpha * T^2 * sum_j KL(q_T(.|x, y<j) || p_T(.|x, y<j))

on gold prefixes y<j, padding masked, sum-reduced
(:func:`fairseq_kd.losses.word_kd_loss`).  With ``--kd-topk k`` the teacher
keeps its k most probable tokens, renormalised.  With alpha = 0 this is
exactly ``label_smoothed_cross_entropy`` and the teacher is not run.  With
``--kd-select batch|global`` the KL is summed over the words the student
finds hardest only (Wang et al. 2021, :mod:`fairseq_kd.losses.selective`).

The whole method is the base class's skeleton with no extra term: the
smallest complete criterion (see docs/adding_a_method.md).
"""
from dataclasses import dataclass

from fairseq.criterions import register_criterion

from fairseq_kd.criterions.kd_base import KDCriterionBase, KDSelectOptions, WordKDOptions


@dataclass
class WordKDConfig(WordKDOptions, KDSelectOptions):
    pass


@register_criterion("word_kd", dataclass=WordKDConfig)
class WordKDCriterion(KDCriterionBase):
    LOSS_TERMS = ("kd_loss",)
