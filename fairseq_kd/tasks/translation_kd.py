"""``translation_kd``: fairseq's ``translation`` task plus what KD criterions need.

The task owns, and delegates to:

* the teacher (``--teacher-path``): a :class:`fairseq_kd.teacher.Teacher`,
  where loading, checks, placement and the forward pass live; or, instead,
  ``--teacher-cache DIR``: a :class:`fairseq_kd.teacher_cache.TeacherCache`
  serving precomputed top-k distributions through the same ``distribution``
  (no teacher is loaded then).  Either is ``task.teacher``.  The teacher
  belongs to the task, not to the model or the criterion, so it is never in
  the student's state dict or checkpoint, never handed to the optimizer,
  and never read by ``fairseq-generate --task translation_kd`` (which builds
  no criterion).  Under DDP every rank builds its own task and teacher;
* ``--distilled-data DIR``: the teacher's translations of the training
  sources batched with the gold targets (:mod:`fairseq_kd.tasks.distilled_data`);
* ``--prune-mask``: pruned student weights kept at zero
  (:class:`fairseq_kd.pruning.MaskKeeper`).

What a criterion may ask of it, and what it does for a criterion in return
(build-time checks, a per-update hook), is :mod:`fairseq_kd.contract`.
Batches are filtered by the smaller of the student's and the loaded
teacher's maximum positions, so a long sentence never reaches a teacher
that cannot embed it.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq import utils
from fairseq.data import indexed_dataset
from fairseq.logging import metrics
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask, load_langpair_dataset

from fairseq_kd.contract import (
    KDTask,
    after_update,
    check_criterion,
    criterion_checkpoint_dict,
    restore_criterion_state,
)
from fairseq_kd.errors import require
from fairseq_kd.pruning import MaskKeeper
from fairseq_kd.tasks.distilled_data import DistilledPairDataset, check_aligned
from fairseq_kd.tasks.early_stopping import patience_state, restore_patience_state
from fairseq_kd.teacher import Teacher, TeacherSource, teacher_paths
from fairseq_kd.teacher_cache import TeacherCache

logger = logging.getLogger(__name__)


def bleu_has_hypotheses(logging_outputs):
    """Whether fairseq's --eval-bleu statistics of a validation count any
    hypothesis unigram (only then does fairseq's translation task log BLEU).
    Training updates carry no such statistics and count as having them."""
    key = "_bleu_totals_0"
    if not any(key in log for log in logging_outputs):
        return True
    return sum(log.get(key, 0) for log in logging_outputs) > 0


def check_cache_not_over_distilled(cache, distilled_data):
    """With --distilled-data the cache serves the gold targets' prefixes (``sample["target"]``),
    so it must be built over DATA; a cache of the distilled folder is the usual mix-up."""
    require(os.path.realpath(cache.built_from) != os.path.realpath(distilled_data),
            f"--teacher-cache {cache.directory} was built over the --distilled-data folder "
            f"{distilled_data}, but it is read on the gold targets of DATA (the teacher's "
            f"distribution on gold prefixes): build it with fairseq-kd cache-teacher DATA")


@dataclass
class TranslationKDConfig(TranslationConfig):
    teacher_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "teacher checkpoint; several joined by ':' form an ensemble "
            "whose probabilities are averaged. Loaded for training only."
        },
    )
    teacher_dict: Optional[str] = field(
        default=None,
        metadata={
            "help": "the teacher's dictionary, compared symbol by symbol with the student's: "
            "a fairseq dict.txt serving both sides (joined), or a folder with dict.SRC.txt and "
            "dict.TGT.txt. Needed only for a teacher that carries none (fairseq-kd export embeds "
            "them; dict files beside the checkpoint or in its data folder also serve); "
            "without any, only vocabulary sizes are compared."
        },
    )
    distilled_data: Optional[str] = field(
        default=None,
        metadata={
            "help": "fairseq-binarized folder of the teacher's translations of the training "
            "sources (fairseq-kd corpus; same dictionaries, same sources in the same order). "
            "Its target is batched with the gold one as sample['distilled']; splits it lacks "
            "(e.g. valid) are loaded without it."
        },
    )
    prune_mask: Optional[str] = field(
        default=None,
        metadata={
            "help": "mask file written by 'fairseq-kd prune': the pruned weights of the "
            "student stay exactly zero through training"
        },
    )
    teacher_cache: Optional[str] = field(
        default=None,
        metadata={
            "help": "directory written by 'fairseq-kd cache-teacher' over DATA (for "
            "--distilled-data too: the cache serves the gold targets): read the teacher's "
            "cached top-k distributions instead of running a teacher (no teacher is "
            "loaded; use --kd-topk <= the cache's k)"
        },
    )


@register_task("translation_kd", dataclass=TranslationKDConfig)
class TranslationKDTask(TranslationTask, KDTask):
    """Translation with a frozen teacher available to KD criterions."""

    cfg: TranslationKDConfig

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        paths = teacher_paths(cfg.teacher_path)
        # the teacher or the cache (set by setup_task); see fairseq_kd.contract
        teacher_dict = getattr(cfg, "teacher_dict", None)  # absent from older saved configs
        require(not teacher_dict or paths, "--teacher-dict is the dictionary of a --teacher-path "
                                           "teacher: give --teacher-path too")
        self.teacher: Optional[TeacherSource] = Teacher(paths, self, teacher_dict) if paths else None
        self.student_cfg = None  # set by build_model
        self.student_logits = True  # the student's decoder returns vocabulary logits
        self.epoch = 1
        self.distilled_data = getattr(cfg, "distilled_data", None)
        self._mask_keeper = None
        self._criterion = None  # the training criterion, whose state checkpoints keep

    @property
    def teachers(self):
        """The teacher's member models (``fairseq-kd corpus`` translates with them)."""
        require(isinstance(self.teacher, Teacher), "this needs a teacher model: pass --teacher-path")
        return self.teacher.models

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        cache = None
        if cfg.teacher_cache:
            require(not teacher_paths(cfg.teacher_path),
                    "give --teacher-path or --teacher-cache, not both (the cache replaces the teacher)")
            require(len(cfg.data.split(":")) == 1,
                    "--teacher-cache needs a single data directory (a cache is built per "
                    "binarized split; sharded data 'a:b:...' changes the split every epoch)")
            cache = TeacherCache(cfg.teacher_cache)
        task = super().setup_task(cfg, **kwargs)
        if cache is not None:
            cache.check_dictionaries(task.src_dict, task.tgt_dict)
            task.teacher = cache
        if cfg.distilled_data:
            task._check_distilled_data_dir()
            if cache is not None:
                check_cache_not_over_distilled(cache, cfg.distilled_data)
        return task

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        self.student_cfg = cfg
        self.student_logits = getattr(model.decoder, "adaptive_softmax", None) is None
        if getattr(self.cfg, "prune_mask", None):
            self._mask_keeper = MaskKeeper.load(self.cfg.prune_mask)
            self._mask_keeper.attach(model)
        return model

    def build_criterion(self, cfg, from_checkpoint=False):
        criterion = super().build_criterion(cfg, from_checkpoint)
        check_criterion(self, criterion, cfg._name, self.student_logits)
        self._criterion = criterion
        topk = getattr(criterion, "topk", None)
        if isinstance(self.teacher, TeacherCache) and getattr(criterion, "needs_teacher", False) \
                and topk is not None:
            # now, not at the first batch after the data has loaded
            self.teacher.check_topk(topk)
        return criterion

    def max_positions(self):
        """The student's limits, and the teacher's once it is loaded (for training):
        fairseq filters batches by these, so no sentence is too long for the teacher."""
        limits = super().max_positions()
        if isinstance(self.teacher, Teacher) and self.teacher.loaded:
            limits = utils.resolve_max_positions(limits, self.teacher.max_positions())
        return limits

    def get_checkpoint_dict(self):
        """fairseq saves this with every checkpoint (``extra_state``): the criterion's
        state that is not in its state dict (``fairseq_kd.contract``) and the count of
        ``--patience`` (``early_stopping``)."""
        saved = criterion_checkpoint_dict(self, self._criterion)
        patience = patience_state()
        if patience:
            saved.setdefault(type(self).__name__, {})["patience"] = patience
        return saved

    def set_checkpoint_dict(self, state):
        """fairseq calls this on resume with what :meth:`get_checkpoint_dict` saved."""
        restore_criterion_state(self._criterion, state)
        restore_patience_state(state.get("patience"))

    def begin_epoch(self, epoch, model):
        """fairseq's trainer calls this at the start of every training epoch,
        including the first epoch after a resume (with the restored epoch)."""
        super().begin_epoch(epoch, model)
        self.epoch = epoch

    # ------------------------------------------------------- distilled targets
    def _check_distilled_data_dir(self):
        ddir = self.cfg.distilled_data
        require(os.path.isdir(ddir), f"--distilled-data: folder not found: {ddir}")
        require(len(utils.split_paths(self.cfg.data)) == 1,
                "--distilled-data needs a single DATA folder (not ':'-separated shards)")
        require(not self.cfg.left_pad_target, "--distilled-data needs --left-pad-target False")
        require(self.cfg.num_batch_buckets == 0, "--distilled-data does not support --num-batch-buckets")
        for lang, own in ((self.cfg.source_lang, self.src_dict), (self.cfg.target_lang, self.tgt_dict)):
            dict_file = os.path.join(ddir, f"dict.{lang}.txt")
            require(os.path.isfile(dict_file), f"--distilled-data {ddir} has no dict.{lang}.txt: "
                    f"binarize it with fairseq-preprocess --srcdict/--tgtdict of the training data")
            require(self.load_dictionary(dict_file).symbols == own.symbols,
                    f"--distilled-data: {dict_file} differs from the training data's dict.{lang}.txt; "
                    f"binarize with fairseq-preprocess --srcdict/--tgtdict of the training data")

    def _has_split(self, data_path, split):
        src, tgt = self.cfg.source_lang, self.cfg.target_lang
        return any(
            indexed_dataset.dataset_exists(
                os.path.join(data_path, f"{split}.{a}-{b}.{src}"), impl=self.cfg.dataset_impl)
            for a, b in ((src, tgt), (tgt, src))
        )

    def _load_pair(self, data_path, split, combine):
        """A LanguagePairDataset read exactly as fairseq's translation task reads DATA."""
        return load_langpair_dataset(
            data_path, split, self.cfg.source_lang, self.src_dict, self.cfg.target_lang,
            self.tgt_dict, combine=combine, dataset_impl=self.cfg.dataset_impl,
            upsample_primary=self.cfg.upsample_primary, left_pad_source=self.cfg.left_pad_source,
            left_pad_target=self.cfg.left_pad_target,
            max_source_positions=self.cfg.max_source_positions,
            max_target_positions=self.cfg.max_target_positions,
            truncate_source=self.cfg.truncate_source, num_buckets=0,
            shuffle=(split != "test"), pad_to_multiple=self.cfg.required_seq_len_multiple,
        )

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        if isinstance(self.teacher, TeacherCache):  # the cache indexes the gold split
            self.teacher.check_dataset(split, self.datasets[split])
        ddir = self.cfg.distilled_data
        if not ddir:
            return
        if not self._has_split(ddir, split):
            require(split != self.cfg.train_subset,
                    f"--distilled-data {ddir} has no '{split}' split for {self.cfg.source_lang}-"
                    f"{self.cfg.target_lang} (expected {split}.{self.cfg.source_lang}-"
                    f"{self.cfg.target_lang}.{{{self.cfg.source_lang},{self.cfg.target_lang}}}.bin/.idx)")
            logger.info(f"--distilled-data has no {split} split: {split} batches carry gold targets only")
            return
        gold = self.datasets[split]
        distilled = self._load_pair(ddir, split, combine)
        require(distilled.tgt is not None,
                f"--distilled-data {ddir} has no {self.cfg.target_lang} side for its '{split}' split")
        check_aligned(gold, distilled, split, self.cfg.data, ddir)
        self.datasets[split] = DistilledPairDataset(gold, distilled.tgt)

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if self.cfg.eval_bleu and not bleu_has_hypotheses(logging_outputs):
            # fairseq logs no BLEU when the hypotheses hold no n-gram (an untrained
            # student that only writes EOS), and --best-checkpoint-metric bleu then
            # stops training with a KeyError: such a validation scores 0
            metrics.log_scalar("bleu", 0.0)
        # fairseq calls this once per update with the logging outputs it has
        # summed over --update-freq micro-batches and DDP ranks: every rank
        # then updates the same running statistics, equal to a single process
        # training on the union of the batches.
        after_update(criterion, logging_outputs)

    def optimizer_step(self, optimizer, model, update_num):
        super().optimizer_step(optimizer, model, update_num)
        if self._mask_keeper is not None:  # --prune-mask: zero after every update
            self._mask_keeper.apply(model)
