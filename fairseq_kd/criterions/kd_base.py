"""What every KD criterion shares: option checks, the word-KD term, metrics.

Criterions subclass :class:`KDCriterionBase`, which is fairseq's
``label_smoothed_cross_entropy`` (same NLL, accuracy and ``loss``/``nll_loss``
/``ppl`` metrics) plus the KD side of :mod:`fairseq_kd.contract` (what a
criterion may ask of the ``translation_kd`` task, checked here).  A subclass
lists its extra loss components in ``LOSS_TERMS``; each is summed over
workers and logged per ``sample_size`` in bits, like ``loss``.
"""
import math
from dataclasses import dataclass, field

from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.logging import metrics

from fairseq_kd.contract import KDCriterion, require_kd_task
from fairseq_kd.errors import require
from fairseq_kd.losses import kd_kl_divergence, label_smoothed_nll_loss, word_kd_loss


@dataclass
class WordKDOptions(LabelSmoothedCrossEntropyCriterionConfig):
    """Options of the word-level KD term (Kim & Rush 2016; Hinton et al. 2015 for T)."""

    kd_alpha: float = field(
        default=0.5,
        metadata={"help": "weight alpha of the word-level KD term, in [0, 1]; "
                  "the label-smoothed NLL gets 1 - alpha"},
    )
    kd_temperature: float = field(
        default=1.0,
        metadata={"help": "softmax temperature T of teacher and student in the KD "
                  "term; the term is scaled by T^2 (Hinton et al. 2015)"},
    )
    kd_topk: int = field(
        default=0,
        metadata={"help": "0: match the teacher's full distribution; k > 0: only its "
                  "k most probable tokens, renormalised (Tan et al. 2019)"},
    )


def check_unit_interval(name, value):
    require(0.0 <= value <= 1.0, f"{name} must be in [0, 1], got {value}")


def check_word_kd_options(alpha, temperature, topk, alpha_flag="--kd-alpha"):
    check_unit_interval(alpha_flag, alpha)
    require(temperature > 0, f"--kd-temperature must be > 0, got {temperature}")
    require(topk >= 0, f"--kd-topk must be >= 0 (0 = full vocabulary), got {topk}")


class KDCriterionBase(LabelSmoothedCrossEntropyCriterion, KDCriterion):
    """Label-smoothed cross-entropy plus access to the task's teacher."""

    LOSS_TERMS = ()  # extra logged components, e.g. ("kd_loss",)
    MEAN_STATS = ()  # per-step statistics (gate values, loss weights), logged as means

    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0,
                 report_accuracy=False, needs_teacher=True):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        require(ignore_prefix_size == 0, "--ignore-prefix-size is not supported by KD criterions")
        self.needs_teacher = needs_teacher  # translation_kd loads the teacher at build time then
        if needs_teacher:
            require_kd_task(task, type(self).__name__)

    @property
    def topk(self):
        """--kd-topk: 0 = the teacher's full distribution, k = its k best tokens."""
        return self._topk

    @topk.setter
    def topk(self, k):
        # Every KD criterion stores its --kd-topk here, so this one check covers
        # them all, at build time (torch's own error comes at the first step:
        # "selected index k out of range").
        vocab = len(self.task.target_dictionary)
        require(k <= vocab, f"--kd-topk {k} is larger than the target vocabulary ({vocab} entries); "
                f"use at most {vocab}, or 0 for the full distribution")
        self._topk = k

    # -- shared terms --------------------------------------------------------
    def nll_terms(self, model, net_output, sample):
        """(label-smoothed loss, nll loss, float log-probs) of the student, summed."""
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        target = model.get_targets(sample, net_output)
        ls_loss, nll_loss = label_smoothed_nll_loss(
            lprobs.view(-1, lprobs.size(-1)), target.view(-1), self.eps,
            ignore_index=self.padding_idx, reduce=True,
        )
        return ls_loss, nll_loss, lprobs

    def word_kd_term(self, model, net_output, sample, temperature, topk, net_input=None,
                     teacher=None):
        """sum over target tokens of KL(q_T || p_T), teacher run on ``net_input``.

        ``teacher``: a :class:`TeacherDistribution` already computed (then the
        teacher is not run again and ``topk`` is not reapplied).
        """
        if teacher is None:
            teacher = self.task.teacher.distribution(sample, topk, net_input=net_input, like=model)
        logits = net_output[0]
        target = model.get_targets(sample, net_output)
        return kd_kl_divergence(
            logits.reshape(-1, logits.size(-1)), teacher, target.reshape(-1).ne(self.padding_idx),
            temperature,
        )

    def word_kd_losses(self, model, net_output, sample, teacher, alpha, temperature):
        """:func:`fairseq_kd.losses.word_kd_loss` on the student's output.

        alpha = 0 uses fairseq's own log-probs, so the loss is exactly
        label_smoothed_cross_entropy; alpha > 0 works from the logits and
        must not be handed log-probs it would not use (a B x T x V tensor).
        """
        lprobs = model.get_normalized_probs(net_output, log_probs=True) if alpha == 0 else None
        return word_kd_loss(net_output[0], model.get_targets(sample, net_output), teacher,
                            self.padding_idx, alpha, temperature, self.eps, lprobs=lprobs)

    def sample_size(self, sample):
        return sample["target"].size(0) if self.sentence_avg else sample["ntokens"]

    def make_logging_output(self, sample, loss, nll_loss, sample_size, **terms):
        out = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        for name, value in terms.items():
            out[name] = value.data if hasattr(value, "data") else value
        return out

    @staticmethod
    def add_stats(logging_output, **stats):
        """Add per-step statistics (names listed in ``MEAN_STATS``) to a logging output."""
        logging_output["nstats"] = 1  # summed over workers and steps: the mean's divisor
        for name, value in stats.items():
            logging_output[name] = float(value)

    def add_accuracy(self, logging_output, model, net_output, sample):
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = n_correct.item()
            logging_output["total"] = total.item()

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        for key in cls.LOSS_TERMS:
            if not any(key in log for log in logging_outputs):
                continue  # a term this configuration does not compute (e.g. an unused type)
            value = sum(log.get(key, 0) for log in logging_outputs)
            metrics.log_scalar(key, value / max(sample_size, 1) / math.log(2), sample_size, round=3)
        nstats = sum(log.get("nstats", 0) for log in logging_outputs)
        for key in cls.MEAN_STATS if nstats else ():
            if not any(key in log for log in logging_outputs):
                continue
            value = sum(log.get(key, 0) for log in logging_outputs)
            metrics.log_scalar(key, value / nstats, nstats, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
