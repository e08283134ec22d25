"""``a2d``: attention-alignment KD, Align-to-Distill (Jin et al. 2024).

    L = (1 - alpha) * LS-NLL + alpha * T^2 * L_word + beta * decay^(epoch-1) * L_attn
    L_attn = sum over types in --attn-types of
             sum over real query tokens of mean over teacher heads h of
             KL(teacher_h row || AAM_h(student head maps) row)

The word part is the base class's (``word_kd``); the attention term is
this method's one term (:meth:`A2DCriterion.extra_terms`).  See docs/a2d.md.  The student's and the teacher's per-head
attention maps (encoder self, decoder self, decoder cross) are captured
during their normal forward passes (``fairseq_kd.capture``); a learned
Attention Alignment Module per attention type maps the student's L_S*H_S
maps to the teacher's L_T*H_T maps.  The modules are parameters of this
criterion: fairseq trains them with the student, saves them in the
checkpoint's "criterion" entry and restores them on resume; the student
stays a plain ``transformer``.  Padded queries and keys are masked, the
maps are not re-softmaxed, and the term is sum-reduced per query token like
the NLL, so its weight is independent of the batch size.  Query tokens are
source tokens for ``enc`` and target tokens for ``dec`` and ``cross``; the
trainer divides every term by ``sample_size``, the gold target tokens, so per
source token ``enc`` weighs ``beta * target/source`` tokens of the batch:
relative to ``dec``/``cross`` it grows with the source/target length ratio.
Kept as a sum on purpose (one divisor for every term keeps --update-freq and
multi-GPU accumulation exact).  The epoch comes
from the task (``task.epoch``, ``fairseq_kd.contract``); validation (the
criterion in eval mode) weighs the term with beta, undecayed
(:func:`attention_weight`).  With beta = 0 no
attention is captured and the teacher's distribution comes from
``task.teacher.distribution`` as in ``word_kd``, so ensembles and
``--teacher-cache`` work.
"""
import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from fairseq.criterions import register_criterion

from fairseq_kd.attention import (
    ATTENTION_TYPES,
    AttentionAlignment,
    attention_layout,
    attention_layout_from_cfg,
    describe_alignment,
    parse_attention_types,
)
from fairseq_kd.capture import CaptureSpec
from fairseq_kd.criterions.kd_base import (
    KDCriterionBase,
    KDSelectOptions,
    WordKDOptions,
    check_unit_interval,
)
from fairseq_kd.errors import require
from fairseq_kd.hidden_states import require_every_layer_runs
from fairseq_kd.losses import attention_kl

logger = logging.getLogger(__name__)


@dataclass
class A2DConfig(WordKDOptions, KDSelectOptions):
    attn_types: str = field(
        default="enc,dec,cross",
        metadata={"help": "attention maps to align, comma-separated subset of enc "
                  "(encoder self), dec (decoder self), cross (decoder cross)"},
    )
    a2d_beta: float = field(
        default=1.0,
        metadata={"help": "weight beta of the attention term (>= 0; 0 = word_kd, "
                  "no attention captured). The term is summed over query tokens (source "
                  "tokens for enc, target tokens for dec and cross) and divided, like every "
                  "term, by the gold target tokens (sample_size)"},
    )
    a2d_decay: float = field(
        default=0.9,
        metadata={"help": "per-epoch decay of the attention weight, in [0, 1]: "
                  "training in epoch e uses beta * decay^(e-1); validation always uses beta"},
    )
    a2d_log_alignment: bool = field(
        default=False,
        metadata={"help": "log, at every epoch start, which student heads feed each "
                  "teacher head (the two largest alignment weights)"},
    )


def attention_weight(beta, decay, epoch, training=True):
    """``beta * decay^(epoch-1)`` in training; ``beta`` (epoch 1's weight) in validation.

    checkpoint_best.pt and --patience compare validation losses across
    epochs: with the decayed weight the attention term would fall by
    ``1 - decay`` of itself every epoch with no change in the student, and
    later checkpoints would win by construction.  Validation measures one
    fixed mixture instead, the full objective as the method states it
    before any decay.
    """
    return beta * decay ** (epoch - 1) if training else beta


@register_criterion("a2d", dataclass=A2DConfig)
class A2DCriterion(KDCriterionBase):
    LOSS_TERMS = ("kd_loss", "attn_loss", "attn_enc", "attn_dec", "attn_cross")
    MEAN_STATS = ("attn_weight", "align_max_enc", "align_max_dec", "align_max_cross")

    def __init__(self, task, sentence_avg, label_smoothing, kd_alpha, kd_temperature, kd_topk,
                 attn_types, a2d_beta, a2d_decay, a2d_log_alignment=False,
                 ignore_prefix_size=0, report_accuracy=False, kd_select="none",
                 kd_select_ratio=0.5, kd_select_queue=30000):
        require(a2d_beta >= 0, f"--a2d-beta must be >= 0, got {a2d_beta}")
        check_unit_interval("--a2d-decay", a2d_decay)
        super().__init__(task, sentence_avg, label_smoothing, kd_alpha, kd_temperature, kd_topk,
                         ignore_prefix_size, report_accuracy,
                         needs_teacher=kd_alpha > 0 or a2d_beta > 0, kd_select=kd_select,
                         kd_select_ratio=kd_select_ratio, kd_select_queue=kd_select_queue)
        self.beta, self.decay, self.log_alignment = a2d_beta, a2d_decay, a2d_log_alignment
        self.types = parse_attention_types(attn_types) if a2d_beta > 0 else []
        if self.types:
            # the same maps of student and teacher, and which tokens were real
            self.student_spec = CaptureSpec(attention=tuple(self.types), masks=True)
            self.teacher_spec = CaptureSpec(attention=tuple(self.types))
        self.alignment = nn.ModuleDict(self._build_alignment() if self.types else {})
        self._logged_epoch = None

    def _build_alignment(self):
        """One AAM per attention type, sized from the student config and the teacher."""
        student_cfg = self.task.student_cfg
        require(student_cfg is not None, "a2d: the task built no student model before the criterion")
        require(not getattr(student_cfg, "checkpoint_activations", False),
                "a2d does not support --checkpoint-activations (the recomputed forward "
                "pass would not capture the student's attention with gradients)")
        for side in sorted({ATTENTION_TYPES[t][0] for t in self.types}):
            require_every_layer_runs(student_cfg, side, "a2d", "attention maps")
        self.student_layout = attention_layout_from_cfg(student_cfg, self.types)
        self.teacher_layout = attention_layout(
            self.task.teacher.model("a2d", "attention maps to distil"), self.types)
        modules = {}
        for t in self.types:
            (ls, hs), (lt, ht) = self.student_layout[t], self.teacher_layout[t]
            modules[t] = AttentionAlignment(ls * hs, lt * ht)
            logger.info(f"a2d {t} attention: student {ls}x{hs} heads -> teacher {lt}x{ht} heads")
        return modules

    def attn_weight(self):
        """The attention term's weight now (:func:`attention_weight`), epoch as recorded by
        the task; fairseq's trainer switches the criterion to eval mode to validate."""
        return attention_weight(self.beta, self.decay, self.task.epoch, self.training)

    def extra_terms(self, step):
        """``attn_loss`` with weight :meth:`attn_weight`, each type's part logged too
        (nothing when beta = 0: then this is word_kd)."""
        if not self.types:
            return {}
        attn_terms = self.attention_terms(step.student, step.teacher)
        weight = self.attn_weight()
        step.log.update(attn_terms)
        step.stats["attn_weight"] = weight
        for t, aam in self.alignment.items():
            step.stats[f"align_max_{t}"] = aam.weights().max(-1).values.mean().item()
        self._maybe_log_alignment()
        return {"attn_loss": (weight, sum(attn_terms.values()))}

    def attention_terms(self, student, teacher):
        """{"attn_<type>": L_attn of that type} on a batch (sums over query tokens),
        from the captures of one student and one teacher pass."""
        src_real, tgt_real = student.source_mask, student.target_mask
        query_key = {"enc": (src_real, src_real), "dec": (tgt_real, tgt_real),
                     "cross": (tgt_real, src_real)}
        terms = {}
        for t in self.types:
            aligned = self.alignment[t](student.stacked_attention(t))
            terms[f"attn_{t}"] = attention_kl(teacher.stacked_attention(t), aligned, *query_key[t])
        return terms

    def alignment_report(self):
        """Readable learned mapping: which student heads feed each teacher head."""
        lines = []
        for t, aam in self.alignment.items():
            lines += [f"a2d {t}: {line}" for line in describe_alignment(
                aam.weights(), self.student_layout[t][1], self.teacher_layout[t][1])]
        return lines

    def _maybe_log_alignment(self):
        epoch = self.task.epoch
        if not self.log_alignment or not self.training or epoch == self._logged_epoch:
            return
        self._logged_epoch = epoch
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_rank() != 0:
            return  # every rank holds the same weights
        logger.info(f"a2d alignment at the start of epoch {epoch}:")
        for line in self.alignment_report():
            logger.info(line)
