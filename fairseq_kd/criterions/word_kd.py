"""``word_kd``: word-level knowledge distillation (Kim & Rush 2016).

    L = (1 - alpha) * LS-NLL(y) + alpha * T^2 * sum_j KL(q_T(.|x, y<j) || p_T(.|x, y<j))

on gold prefixes y<j, padding masked, sum-reduced (``fairseq_kd.losses``).
With ``--kd-topk k`` the teacher keeps its k most probable tokens,
renormalised.  With alpha = 0 this is exactly ``label_smoothed_cross_entropy``
and the teacher is not run.
"""
from dataclasses import dataclass

from fairseq.criterions import register_criterion

from fairseq_kd.criterions.kd_base import KDCriterionBase, WordKDOptions, check_word_kd_options


@dataclass
class WordKDConfig(WordKDOptions):
    pass


@register_criterion("word_kd", dataclass=WordKDConfig)
class WordKDCriterion(KDCriterionBase):
    LOSS_TERMS = ("kd_loss",)

    def __init__(self, task, sentence_avg, label_smoothing, kd_alpha, kd_temperature,
                 kd_topk, ignore_prefix_size=0, report_accuracy=False):
        check_word_kd_options(kd_alpha, kd_temperature, kd_topk)
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size,
                         report_accuracy, needs_teacher=kd_alpha > 0)
        self.alpha, self.temperature, self.topk = kd_alpha, kd_temperature, kd_topk

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        teacher = (self.task.teacher.distribution(sample, self.topk, like=model)
                   if self.alpha > 0 else None)
        loss, nll_loss, kd_loss = self.word_kd_losses(
            model, net_output, sample, teacher, self.alpha, self.temperature)
        sample_size = self.sample_size(sample)
        logging_output = self.make_logging_output(sample, loss, nll_loss, sample_size, kd_loss=kd_loss)
        self.add_accuracy(logging_output, model, net_output, sample)
        return loss, sample_size, logging_output
