"""``seq_kd``: sequence-level KD (Kim & Rush 2016), optionally with word-level KD.

Train on a distilled corpus (``fairseq-kd corpus``: the targets y_hat are the
teacher's beam-search outputs):

    L = (1 - a) * LS-NLL(y_hat) + a * T^2 * sum_j KL(q_T(.|x, y_hat<j) || p_T(.|x, y_hat<j))

``a = --word-kd-alpha``.  With a = 0 (the default) this is Seq-KD, plain
label-smoothed cross-entropy on the teacher's outputs, and no teacher is
needed (``--task translation`` works).  With a > 0 it is Seq-KD + Word-KD:
the teacher is run on the targets of the distilled corpus, i.e. on its own
output prefixes.  The maths are ``word_kd``'s (:func:`fairseq_kd.losses.word_kd_loss`,
through the base class's skeleton); only the flag of alpha differs.

Instead of running the teacher, ``--teacher-cache DIR --kd-topk k`` reads its
top-k from a cache built over the *distilled* folder (``fairseq-kd
cache-teacher DISTILLED``): that folder's training targets are y_hat, so the
cache holds q(.|x, y_hat<j), the same as the online teacher with --kd-topk k.
``--kd-select batch|global`` restricts the word-level term to the hardest
distilled words (Wang et al. 2021), as in ``word_kd``.
"""
from dataclasses import dataclass, field

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterionConfig

from fairseq_kd.criterions.kd_base import KDSelectOptions
from fairseq_kd.criterions.word_kd import WordKDCriterion


@dataclass
class SeqKDConfig(LabelSmoothedCrossEntropyCriterionConfig, KDSelectOptions):
    word_kd_alpha: float = field(
        default=0.0,
        metadata={"help": "weight of word-level KD on the distilled targets (teacher "
                  "prefixes), in [0, 1]; 0 = pure Seq-KD, no teacher needed"},
    )
    kd_temperature: float = field(
        default=1.0,
        metadata={"help": "temperature T of the word-level KD term (scaled by T^2)"},
    )
    kd_topk: int = field(
        default=0,
        metadata={"help": "0: the teacher's full distribution in the word-level term; "
                  "k > 0: its k most probable tokens, renormalised"},
    )


@register_criterion("seq_kd", dataclass=SeqKDConfig)
class SeqKDCriterion(WordKDCriterion):
    """word_kd's loss on distilled targets; the teacher is optional (alpha = 0)."""

    def __init__(self, task, sentence_avg, label_smoothing, word_kd_alpha, kd_temperature,
                 kd_topk, ignore_prefix_size=0, report_accuracy=False, kd_select="none",
                 kd_select_ratio=0.5, kd_select_queue=30000):
        super().__init__(task, sentence_avg, label_smoothing, word_kd_alpha, kd_temperature,
                         kd_topk, ignore_prefix_size, report_accuracy, alpha_flag="--word-kd-alpha",
                         kd_select=kd_select, kd_select_ratio=kd_select_ratio,
                         kd_select_queue=kd_select_queue)
