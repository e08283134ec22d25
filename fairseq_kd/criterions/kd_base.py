"""What every KD criterion shares: the options, the forward skeleton, the logging.

A criterion subclasses :class:`KDCriterionBase`, which is fairseq's
``label_smoothed_cross_entropy`` (same NLL, accuracy and ``loss``/``nll_loss``
/``ppl`` metrics) plus the KD side of :mod:`fairseq_kd.contract` (what a
criterion may ask of the ``translation_kd`` task, checked here).  Every step
of a training step is here, once (:meth:`KDCriterionBase.forward`):

1. the student's forward pass, capturing what ``student_spec`` asks;
2. the teacher: one pass capturing ``teacher_spec`` when the method needs
   the teacher's internals (the word-KD distribution then comes from that
   same pass), else ``task.teacher.distribution`` (ensembles, cache), and
   nothing at alpha = 0;
3. the word-KD part, :func:`fairseq_kd.losses.word_kd_loss` (the fused
   label-smoothed NLL + KL): ``nll_weight() * LS-NLL + alpha * T^2 * KL``;
4. the method's own terms, :meth:`KDCriterionBase.extra_terms`:
   ``{name: (weight, summed value)}``;
5. ``loss = word part + sum of weight * value``, the one place a total is
   assembled;
6. ``sample_size``, the logging output (every term under its name, the KL
   under ``WORD_KD_LOG``, per-step statistics) and the accuracy.

A method declares its terms by overriding :meth:`extra_terms` (and
:meth:`nll_weight` when its terms take part of the NLL's weight); it lists
every logged component in ``LOSS_TERMS`` and every per-step statistic in
``MEAN_STATS``, which :meth:`reduce_metrics` logs.

Validation: fairseq's trainer computes the validation loss with the
criterion in eval mode, and ``checkpoint_best.pt`` and ``--patience``
compare it across epochs.  A weight that follows a schedule (epoch, update
number) must therefore be fixed when ``not self.training`` (``a2d``: beta
without its decay), so that the validation loss moves only with the student.

``hybrid_kd`` mixes two
per-sentence losses with a gate and keeps its own ``forward``, built from
the same parts (:meth:`logging_output`, the fused word-KD function).
"""
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics

from fairseq_kd.capture import NOTHING, Captured, CaptureSpec, capture
from fairseq_kd.contract import KDCriterion, require_kd_task
from fairseq_kd.errors import require
from fairseq_kd.losses import TeacherDistribution, WordSelection, word_kd_loss
from fairseq_kd.losses.selective import SELECT_MODES
from fairseq_kd.teacher import distribution_of

logger = logging.getLogger(__name__)


KD_SELECT_CHOICES = ChoiceEnum(list(SELECT_MODES))


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


@dataclass
class KDSelectOptions(FairseqDataclass):
    """Selective word-level KD (Wang et al. 2021): the KD term on the hardest words only.

    Mixed into the configs of the criterions whose word-KD term is the base
    class's (word_kd, seq_kd, ckd, a2d); see :mod:`fairseq_kd.losses.selective`.
    """

    kd_select: KD_SELECT_CHOICES = field(
        default="none",
        metadata={"help": "which target words get the word-KD term: none (all, plain word KD), "
                  "batch (the top --kd-select-ratio of each micro-batch's words by the "
                  "student's CE on the gold word), global (CE at or above the same quantile "
                  "of a FIFO queue of the last --kd-select-queue words' CEs); the others "
                  "keep their NLL term (Wang et al. 2021)"},
    )
    kd_select_ratio: float = field(
        default=0.5,
        metadata={"help": "share r of words selected, in (0, 1]: the threshold is the "
                  "ceil(r * n)-th largest CE of the pool (ties at it are all selected)"},
    )
    kd_select_queue: int = field(
        default=30000,
        metadata={"help": "--kd-select global: the queue's size N in words (per rank; saved "
                  "in checkpoints)"},
    )


def check_unit_interval(name, value):
    require(0.0 <= value <= 1.0, f"{name} must be in [0, 1], got {value}")


def check_word_kd_options(alpha, temperature, topk, alpha_flag="--kd-alpha"):
    check_unit_interval(alpha_flag, alpha)
    require(temperature > 0, f"--kd-temperature must be > 0, got {temperature}")
    require(topk >= 0, f"--kd-topk must be >= 0 (0 = full vocabulary), got {topk}")


def check_selection_options(select, ratio, queue, alpha, alpha_flag="--kd-alpha"):
    select = str(select)
    require(select in SELECT_MODES, f"--kd-select must be one of {', '.join(SELECT_MODES)}, got {select}")
    if select == "none":
        return
    require(0.0 < ratio <= 1.0, f"--kd-select-ratio must be in (0, 1], got {ratio}")
    require(queue >= 1, f"--kd-select-queue must be >= 1, got {queue}")
    require(alpha > 0, f"--kd-select {select} selects words for the word-KD term: give it a "
            f"weight ({alpha_flag} > 0)")


@dataclass
class Step:
    """One training step as a method's terms see it (:meth:`KDCriterionBase.extra_terms`).

    ``student``/``teacher``: what the passes captured (``teacher`` None when
    the method captured nothing of it); ``log``: sums logged beside the
    terms without entering the loss (components of a term); ``stats``:
    per-step statistics, logged as means (names in ``MEAN_STATS``).
    """

    model: torch.nn.Module
    sample: dict
    net_output: tuple
    student: Captured
    teacher: Optional[Captured]
    nll_loss: torch.Tensor
    log: Dict[str, torch.Tensor] = field(default_factory=dict)
    stats: Dict[str, float] = field(default_factory=dict)


class KDCriterionBase(LabelSmoothedCrossEntropyCriterion, KDCriterion):
    """Label-smoothed cross-entropy + word-level KD + the method's weighted terms."""

    LOSS_TERMS = ("kd_loss",)  # every logged component; each method lists its own
    MEAN_STATS = ()  # per-step statistics (gate values, loss weights), logged as means
    WORD_KD_LOG = "kd_loss"  # the name the word-KD KL is logged under
    # what each forward pass captures; set by a method whose terms need internals
    # (a teacher_spec runs the single teacher once, for its terms and the word KD)
    student_spec: CaptureSpec = NOTHING
    teacher_spec: Optional[CaptureSpec] = None

    def __init__(self, task, sentence_avg, label_smoothing, kd_alpha, kd_temperature, kd_topk,
                 ignore_prefix_size=0, report_accuracy=False, *, needs_teacher=None,
                 alpha_flag="--kd-alpha", kd_select="none", kd_select_ratio=0.5,
                 kd_select_queue=30000):
        """``needs_teacher``: default ``kd_alpha > 0``; a method whose own terms use the
        teacher passes when they do (so a zero weight never loads it).  ``kd_select*``:
        :class:`KDSelectOptions` (a method whose config has them passes them on)."""
        check_word_kd_options(kd_alpha, kd_temperature, kd_topk, alpha_flag)
        check_selection_options(kd_select, kd_select_ratio, kd_select_queue, kd_alpha, alpha_flag)
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        require(ignore_prefix_size == 0, "--ignore-prefix-size is not supported by KD criterions")
        needs_teacher = kd_alpha > 0 if needs_teacher is None else needs_teacher
        self.needs_teacher = needs_teacher  # translation_kd loads the teacher at build time then
        if needs_teacher:
            require_kd_task(task, type(self).__name__)
        self.alpha, self.temperature, self.topk = kd_alpha, kd_temperature, kd_topk
        # selective KD: None = every word's KL (today's word KD, bit for bit)
        self.selection = (None if str(kd_select) == "none"
                          else WordSelection(str(kd_select), kd_select_ratio, kd_select_queue))

    @property
    def topk(self):
        """--kd-topk: 0 = the teacher's full distribution, k = its k best tokens."""
        return self._topk

    @topk.setter
    def topk(self, k):
        # One check for every criterion, at build time (torch's own error comes
        # at the first step: "selected index k out of range").
        vocab = len(self.task.target_dictionary)
        require(k <= vocab, f"--kd-topk {k} is larger than the target vocabulary ({vocab} entries); "
                f"use at most {vocab}, or 0 for the full distribution")
        self._topk = k

    # -- what a method declares ------------------------------------------------
    def nll_weight(self):
        """Weight of the label-smoothed NLL: ``1 - alpha`` unless a term takes part of it."""
        return 1.0 - self.alpha

    def extra_terms(self, step: Step) -> Dict[str, Tuple[float, torch.Tensor]]:
        """The method's own terms, ``{name: (weight, value summed over tokens)}``.

        Added to the loss as ``weight * value`` and logged under ``name``
        (list it in ``LOSS_TERMS``).  A term the configuration switches off
        may still be returned with weight 0 so that it is logged as 0.
        """
        return {}

    # -- the skeleton ----------------------------------------------------------
    def forward(self, model, sample, reduce=True):
        net_input = sample["net_input"]
        # the student runs through its wrapper (DDP must see the call)
        with capture(model, self.student_spec) as student:
            net_output = model(**net_input)
        teacher_seen, teacher = self.run_teacher(model, sample)
        log, stats = {}, {}
        word_loss, nll_loss, kd_loss = self.word_kd_part(model, net_output, sample, teacher, log, stats)
        step = Step(model, sample, net_output, student, teacher_seen, nll_loss, log, stats)
        terms = self.extra_terms(step)
        loss = word_loss
        for weight, value in terms.values():
            loss = loss + weight * value
        sample_size = self.sample_size(sample)
        logged = {self.WORD_KD_LOG: kd_loss, **{n: v for n, (_, v) in terms.items()}, **step.log}
        logging_output = self.logging_output(sample, loss, nll_loss, sample_size, step.stats, **logged)
        self.add_accuracy(logging_output, model, net_output, sample)
        return loss, sample_size, logging_output

    def run_teacher(self, model, sample):
        """(captured teacher pass or None, word-KD distribution or None).

        One pass of the single teacher serves the method's terms and the word
        KD when the method captures internals; else the task's distribution
        (online, ensemble or cache); at alpha = 0 without internals, nothing.
        """
        if self.teacher_spec is not None:
            [seen] = self.task.teacher.forward(sample["net_input"], like=model, capture=self.teacher_spec)
            return seen, distribution_of([seen], self.topk) if self.alpha > 0 else None
        if self.alpha > 0:
            return None, self.task.teacher.distribution(sample, self.topk, like=model)
        return None, None

    def word_kd_part(self, model, net_output, sample, teacher: Optional[TeacherDistribution],
                     log=None, stats=None):
        """``(nll_weight * LS-NLL + alpha * T^2 * KL, NLL, KL)`` by
        :func:`fairseq_kd.losses.word_kd_loss`, each summed over target tokens.

        alpha = 0 uses fairseq's own log-probs, so the loss is exactly
        label_smoothed_cross_entropy; alpha > 0 works from the logits and
        must not be handed log-probs it would not use (a B x T x V tensor).
        With --kd-select the KL is the selected words' only, and the number
        selected (``log["kd_selected"]``) and the threshold
        (``stats["kd_threshold"]``) are recorded.
        """
        lprobs = model.get_normalized_probs(net_output, log_probs=True) if self.alpha == 0 else None
        select = None if self.selection is None else self.selector(
            {} if log is None else log, {} if stats is None else stats)
        return word_kd_loss(net_output[0], model.get_targets(sample, net_output), teacher,
                            self.padding_idx, self.alpha, self.temperature, self.eps,
                            lprobs=lprobs, nll_weight=self.nll_weight(), select=select)

    def selector(self, log, stats):
        """The ``select`` function of :func:`word_kd_loss` for one forward pass.

        Training pushes into the global queue; validation (eval mode) takes
        the threshold training would take, without changing the queue.
        """
        def select(ce, real):
            selected, threshold = self.selection(ce, real, update=self.training)
            log["kd_selected"] = selected.sum()
            if math.isfinite(threshold.item()):  # +inf: an empty pool, no threshold to report
                stats["kd_threshold"] = threshold.item()
            return selected
        return select

    # -- state kept across checkpoints (fairseq_kd.contract) --------------------
    def checkpoint_state(self):
        """The global selection queue of this rank, for the task to save with checkpoints."""
        if self.selection is None or self.selection.queue is None:
            return {}
        return {"kd_select_queue": self.selection.queue.state_dict()}

    def load_checkpoint_state(self, state):
        """Restore :meth:`checkpoint_state` (a checkpoint without a queue leaves it empty)."""
        if self.selection is not None and self.selection.queue is not None \
                and "kd_select_queue" in state:
            self.selection.queue.load_state_dict(state["kd_select_queue"])
            logger.info(f"--kd-select global: restored the queue of the last "
                        f"{len(self.selection.queue)} words' CEs from the checkpoint")

    def sample_size(self, sample):
        return sample["target"].size(0) if self.sentence_avg else sample["ntokens"]

    # -- logging ---------------------------------------------------------------
    def logging_output(self, sample, loss, nll_loss, sample_size, stats=None, **terms):
        """fairseq's logging output plus every term (summed values, ``LOSS_TERMS``) and the
        per-step ``stats`` (``MEAN_STATS``, with ``nstats`` as their divisor)."""
        out = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        for name, value in terms.items():
            out[name] = value.data if hasattr(value, "data") else value
        if stats:
            out["nstats"] = 1  # summed over workers and steps: the means' divisor
            out.update((name, float(value)) for name, value in stats.items())
        return out

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
        reduce_selection_metrics(logging_outputs)
        nstats = sum(log.get("nstats", 0) for log in logging_outputs)
        for key in cls.MEAN_STATS if nstats else ():
            if not any(key in log for log in logging_outputs):
                continue
            value = sum(log.get(key, 0) for log in logging_outputs)
            metrics.log_scalar(key, value / nstats, nstats, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def reduce_selection_metrics(logging_outputs):
    """--kd-select: ``kd_selected``, the share of target tokens whose KL entered the loss
    (selected / ntokens over the logged steps), and ``kd_threshold``, the mean CE
    threshold (nats) per forward pass."""
    if not any("kd_selected" in log for log in logging_outputs):
        return
    ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
    selected = sum(log.get("kd_selected", 0) for log in logging_outputs)
    metrics.log_scalar("kd_selected", float(selected) / max(ntokens, 1), ntokens, round=4)
    nstats = sum(log.get("nstats", 0) for log in logging_outputs)
    if nstats and any("kd_threshold" in log for log in logging_outputs):
        threshold = sum(log.get("kd_threshold", 0) for log in logging_outputs)
        metrics.log_scalar("kd_threshold", threshold / nstats, nstats, round=4)
