"""``ckd``: combinatorial intermediate-layer KD (Wu et al. 2020), PKD as a baseline.

    L = alpha * T^2 * L_word + beta * L_layer + (1 - alpha - beta) * LS-NLL

``L_word`` is word-level KD (``KL(q_T || p_T)`` on gold prefixes, as in
``word_kd``, the base class's word part with NLL weight ``1 - alpha - beta``:
:meth:`CKDCriterion.nll_weight`); ``beta * L_layer`` is this method's one
term (:meth:`CKDCriterion.extra_terms`).  ``L_layer`` (``fairseq_kd.losses.layer_kd_loss``) matches each
student layer i against the concatenation C_i of a group G_i of teacher
layers (``fairseq_kd.layer_maps``: ``skip`` = PKD, ``regular``, ``overlap``,
``cross`` or explicit):

    L_layer = sum_side sum_i sum_{real tokens} || norm(W_i h_S^i) - norm(C_i) ||^2

with ``norm(v) = v / |v|``, summed over non-padding tokens (source tokens for
the encoder, target tokens for the decoder) like every fairseq_kd term, and
divided by ``sample_size`` (gold target tokens) by the trainer: per source
token the encoder term weighs ``beta * target/source`` tokens of the batch,
so its effective weight moves with the length ratio.  Kept so on purpose:
one divisor for every term keeps --update-freq and multi-GPU accumulation
exact.  Matched states are layer outputs
before any final LayerNorm (``fairseq_kd.hidden_states``).

Projection side: ``W_i`` maps the *student* state (C_S) to the size of the
teacher's concatenation (|G_i| * C_T).  The teacher side stays a fixed
function of the frozen teacher, so the loss can only fall by moving the
student toward the teacher.  A learned projection of the teacher, trained on
the same loss, could instead map every teacher state to one direction the
student already produces and drive the term to zero with nothing learned.

The projections are submodules of this criterion: fairseq's trainer optimises
them with the student, saves them under the checkpoint's "criterion" entry
(never "model") and restores them on resume; the student checkpoint stays a
plain ``transformer``.  They are sized from ``task.student_cfg`` and the
teacher's modules, so the teacher is loaded when the criterion is built.
Student and teacher states are captured alike (``fairseq_kd.capture``).
An ensemble teacher has no single set of hidden states and is refused when
beta > 0; with beta = 0 (no layer term) the teacher's distribution comes from
``task.teacher.distribution`` as in ``word_kd``, so ensembles and
``--teacher-cache`` work.
"""
from dataclasses import dataclass, field
from typing import Optional

from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum
from torch import nn

from fairseq_kd.capture import CaptureSpec
from fairseq_kd.criterions.kd_base import (
    KDCriterionBase,
    KDSelectOptions,
    WordKDOptions,
    check_unit_interval,
)
from fairseq_kd.errors import KDError, require
from fairseq_kd.hidden_states import (
    model_cfg_value,
    require_every_layer_runs,
    transformer_layers,
    unwrap_model,
)
from fairseq_kd.layer_maps import NAMED_MAPS, build_layer_map
from fairseq_kd.losses import layer_kd_loss

CKD_SIDES = ChoiceEnum(["encoder", "decoder", "both"])


@dataclass
class CKDConfig(WordKDOptions, KDSelectOptions):
    ckd_beta: float = field(
        default=0.2,
        metadata={"help": "weight beta of the intermediate-layer term; the label-smoothed "
                  "NLL gets 1 - alpha - beta (alpha = --kd-alpha, the word-KD weight). The "
                  "term is summed over source tokens (encoder) and target tokens (decoder) "
                  "and divided, like every term, by the gold target tokens (sample_size)"},
    )
    layer_map: str = field(
        default="regular",
        metadata={"help": "teacher layers matched by each student layer: " + ", ".join(NAMED_MAPS)
                  + " (skip = PKD), or explicit 0-based groups such as '0,1,2|3,4,5'"},
    )
    decoder_layer_map: Optional[str] = field(
        default=None,
        metadata={"help": "layer map of the decoder side (default: --layer-map)"},
    )
    ckd_side: CKD_SIDES = field(
        default="encoder",
        metadata={"help": "where layers are matched; Wu et al. 2020 distil the encoder"},
    )


def student_layout(cfg, side):
    """(number of layers, hidden size) of the student's ``side`` from its model config."""
    layers = model_cfg_value(cfg, f"{side}_layers", f"{side}.layers")
    dim = model_cfg_value(cfg, f"{side}_embed_dim", f"{side}.embed_dim")
    require(layers is not None and dim is not None,
            f"ckd: cannot read the student's {side} layers/embed_dim from its model config "
            f"(arch {getattr(cfg, 'arch', getattr(cfg, '_name', '?'))}); ckd needs a transformer")
    keep = model_cfg_value(cfg, f"{side}_layers_to_keep", f"{side}.layers_to_keep")
    if keep:
        layers = len(str(keep).split(","))
    require_every_layer_runs(cfg, side, "ckd", "output")
    return int(layers), int(dim)


def teacher_layout(teacher, side):
    """(number of layers, hidden size) of a loaded teacher's ``side``."""
    layers = transformer_layers(teacher, side)
    dim = getattr(layers[0], "embed_dim", None) if layers else None
    require(dim is not None, f"ckd: cannot read the teacher's {side} layer size")
    return len(layers), int(dim)


@register_criterion("ckd", dataclass=CKDConfig)
class CKDCriterion(KDCriterionBase):
    LOSS_TERMS = ("word_loss", "layer_loss", "layer_loss_enc", "layer_loss_dec")

    WORD_KD_LOG = "word_loss"

    def __init__(self, task, sentence_avg, label_smoothing, kd_alpha, kd_temperature, kd_topk,
                 ckd_beta, layer_map, ckd_side, decoder_layer_map=None, ignore_prefix_size=0,
                 report_accuracy=False, kd_select="none", kd_select_ratio=0.5,
                 kd_select_queue=30000):
        check_unit_interval("--ckd-beta", ckd_beta)
        require(kd_alpha + ckd_beta <= 1.0 + 1e-9,
                f"--kd-alpha + --ckd-beta must be <= 1 (the NLL gets the rest), "
                f"got {kd_alpha} + {ckd_beta}")
        super().__init__(task, sentence_avg, label_smoothing, kd_alpha, kd_temperature, kd_topk,
                         ignore_prefix_size, report_accuracy,
                         needs_teacher=kd_alpha > 0 or ckd_beta > 0, kd_select=kd_select,
                         kd_select_ratio=kd_select_ratio, kd_select_queue=kd_select_queue)
        self.beta = ckd_beta
        side = str(ckd_side)
        self.sides = ("encoder", "decoder") if side == "both" else (side,)
        if ckd_beta == 0:
            self.sides = ()  # plain word-KD: no hooks, no projections, no hidden states
        self.groups = {}
        self.projections = nn.ModuleDict()
        if self.sides:
            # the layer states of both models, and which tokens were real
            self.student_spec = CaptureSpec(layers=self.sides, masks=True)
            self.teacher_spec = CaptureSpec(layers=self.sides)
            self._build_projections(task, {"encoder": layer_map,
                                           "decoder": decoder_layer_map or layer_map})

    def _build_projections(self, task, maps):
        teacher = task.teacher.model("ckd", "hidden states to match")
        require(task.student_cfg is not None,
                "ckd sizes its projections from the student's config: the task must build "
                "the model before the criterion (as fairseq-train does)")
        for side in self.sides:
            t_layers, t_dim = teacher_layout(teacher, side)
            s_layers, s_dim = student_layout(task.student_cfg, side)
            try:
                groups = build_layer_map(maps[side], t_layers, s_layers)
            except KDError as e:
                raise KDError(f"ckd {side} ({t_layers}-layer teacher, {s_layers}-layer "
                              f"student): {e}") from None
            self.groups[side] = groups
            # student -> teacher concatenation; see the module docstring for why
            self.projections[side] = nn.ModuleList(
                nn.Linear(s_dim, len(group) * t_dim) for group in groups)

    def check_student(self, model):
        """The model the criterion runs must be the one its projections were sized for."""
        for side in self.sides:
            layers = transformer_layers(model, side)
            require(len(layers) == len(self.groups[side]),
                    f"ckd was built for a {len(self.groups[side])}-layer student {side} (from "
                    f"the model config) but the model has {len(layers)} layers")

    # -- loss ----------------------------------------------------------------
    def nll_weight(self):
        return 1.0 - self.alpha - self.beta

    def extra_terms(self, step):
        """``layer_loss`` with weight beta (0 and not computed when beta = 0); with
        --ckd-side both, each side's part is logged too."""
        if not self.sides:
            return {"layer_loss": (self.beta, step.nll_loss.new_zeros(()))}
        per_side = self.layer_term(step.student, step.teacher)
        if len(per_side) > 1:  # --ckd-side both: which side the total comes from
            step.log.update({f"layer_loss_{side[:3]}": v for side, v in per_side.items()})
        return {"layer_loss": (self.beta, sum(per_side.values()))}

    def layer_term(self, student, teacher):
        """{side: L_layer of that side (a 0-dim tensor)} for the matched sides, from the
        captures of one student and one teacher pass."""
        terms = {}
        for side in self.sides:
            mask = student.source_mask if side == "encoder" else student.target_mask
            terms[side] = layer_kd_loss(
                student.layer_states(side), teacher.layer_states(side), self.groups[side],
                self.projections[side], mask.t(),  # states are T x B x C
            )
        return terms

    def forward(self, model, sample, reduce=True):
        if self.sides:
            self.check_student(unwrap_model(model))
        return super().forward(model, sample, reduce)
