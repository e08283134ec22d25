"""``translation_kd``: fairseq's ``translation`` task plus a teacher.

The teacher (one checkpoint, or several joined by ``:`` for an ensemble whose
probabilities are averaged) belongs to the task, not to the model or the
criterion, so that it is

* never part of the student's state dict, hence never saved in a student
  checkpoint and never handed to the optimizer (the trainer optimises
  ``model.parameters()`` and ``criterion.parameters()`` only);
* loaded and checked when the criterion is built, if it needs a teacher
  (before training, so a bad teacher stops ``fairseq-train`` before it has
  written anything), or else on first use; ``fairseq-generate --task
  translation_kd`` builds no criterion and never reads it;
* moved to the student's device and dtype at its first use (the trainer
  casts the student to fp16 under ``--fp16`` after the task is set up), and
  kept in eval mode under ``torch.no_grad``;
* loaded by every process: under fairseq's DDP each rank builds its own task,
  so each rank has its own teacher on its own GPU.

``--distilled-data DIR`` adds the teacher's translations of the training
sources (a second binarized corpus, line-aligned with the training data) to
every batch, for criterions that train on gold and distilled targets at once
(``hybrid_kd``); see :mod:`fairseq_kd.tasks.distilled_data`.

Instead of a teacher, ``--teacher-cache DIR`` serves precomputed top-k
distributions (``fairseq-kd cache-teacher``, :mod:`fairseq_kd.teacher_cache`)
through :meth:`TranslationKDTask.teacher_distribution`; no teacher is loaded
then, and criterions that need the teacher model itself (hidden states,
attention maps) get a clear error.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

import torch
from fairseq import utils
from fairseq.data import indexed_dataset
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask, load_langpair_dataset

from fairseq_kd.checkpoint import checkpoint_cfg, load_checkpoint_state
from fairseq_kd.errors import require
from fairseq_kd.losses import TeacherDistribution, ensemble_scores
from fairseq_kd.pruning import MaskKeeper
from fairseq_kd.tasks.distilled_data import DistilledPairDataset, check_aligned
from fairseq_kd.teacher_cache import TeacherCache

logger = logging.getLogger(__name__)


@dataclass
class TranslationKDConfig(TranslationConfig):
    teacher_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "teacher checkpoint; several joined by ':' form an ensemble "
            "whose probabilities are averaged. Loaded for training only."
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
            "help": "directory written by 'fairseq-kd cache-teacher': read the teacher's "
            "cached top-k distributions instead of running a teacher (no teacher is "
            "loaded; use --kd-topk <= the cache's k)"
        },
    )


class TeacherOutput(NamedTuple):
    """One teacher member's forward pass on a batch (tensors are B x T x ...)."""

    logits: torch.Tensor
    extra: dict  # decoder extras: "attn", "inner_states" (decoder layer outputs)
    encoder_out: dict  # fairseq encoder output; "encoder_states" holds every layer


def teacher_paths(spec):
    return [p for p in (spec or "").split(":") if p]


@register_task("translation_kd", dataclass=TranslationKDConfig)
class TranslationKDTask(TranslationTask):
    """Translation with a frozen teacher available to KD criterions."""

    cfg: TranslationKDConfig

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self._teachers: Optional[List[torch.nn.Module]] = None
        self.teacher_cache: Optional[TeacherCache] = None  # set by setup_task
        self.student_cfg = None  # set by build_model; criterions size projections from it
        self.epoch = 1  # current training epoch, for criterions with per-epoch schedules
        self._mask_keeper = None

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        for path in teacher_paths(cfg.teacher_path):
            require(os.path.isfile(path), f"--teacher-path: teacher checkpoint not found: {path}")
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
            task.teacher_cache = cache
        if cfg.distilled_data:
            task._check_distilled_data_dir()
        return task

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        self.student_cfg = cfg
        self.student_has_adaptive_softmax = getattr(model.decoder, "adaptive_softmax", None) is not None
        if getattr(self.cfg, "prune_mask", None):
            self._mask_keeper = MaskKeeper.load(self.cfg.prune_mask)
            self._mask_keeper.attach(model)
        return model

    def build_criterion(self, cfg, from_checkpoint=False):
        from fairseq_kd.criterions.kd_base import KDCriterionBase

        criterion = super().build_criterion(cfg, from_checkpoint)
        # The KD losses read vocabulary logits from the decoder's output, which
        # an adaptive-softmax decoder does not produce (it returns hidden states).
        require(not (isinstance(criterion, KDCriterionBase)
                     and getattr(self, "student_has_adaptive_softmax", False)),
                f"--criterion {cfg._name} does not support students with an adaptive softmax "
                "(--adaptive-softmax-cutoff): the KD losses need the full vocabulary logits")
        if getattr(criterion, "needs_teacher", False) and self.teacher_cache is None:
            # Load (and check) the teacher now rather than at the first step:
            # a bad teacher must stop fairseq-train before training starts,
            # not after fairseq has written a crash checkpoint of the student.
            self.teachers
        return criterion

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
        if self.teacher_cache is not None:  # the cache indexes the gold split
            self.teacher_cache.check_dataset(split, self.datasets[split])
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
        # Criterions with running statistics (hybrid_kd's loss scales) update
        # them here, once per update, from the logging outputs the trainer
        # has already summed over --update-freq micro-batches and DDP ranks:
        # every rank then holds the same statistics, equal to a single
        # process training on the union of the batches.
        update = getattr(criterion, "update_running_stats", None)
        if update is not None and criterion.training:
            update(logging_outputs)

    def optimizer_step(self, optimizer, model, update_num):
        super().optimizer_step(optimizer, model, update_num)
        if self._mask_keeper is not None:  # --prune-mask: zero after every update
            self._mask_keeper.apply(model)

    # ------------------------------------------------------------------ teacher
    @property
    def has_teacher(self):
        """A teacher's distributions are available (a teacher model or a cache)."""
        return bool(teacher_paths(self.cfg.teacher_path)) or self.teacher_cache is not None

    @property
    def teachers(self) -> List[torch.nn.Module]:
        """The teacher models (loaded on first access, on CPU, in eval mode)."""
        if self._teachers is None:
            require(self.teacher_cache is None,
                    "this criterion needs the teacher model itself (its hidden states or "
                    "attention maps, or its outputs on other prefixes), but --teacher-cache "
                    "holds only its top-k distributions on gold prefixes: pass --teacher-path "
                    "instead")
            require(self.has_teacher, "this criterion needs a teacher: pass --teacher-path")
            self._teachers = [self._load_teacher(p) for p in teacher_paths(self.cfg.teacher_path)]
        return self._teachers

    def single_teacher(self, criterion, what):
        """The one teacher model, for criterions that distil its internals; an
        ensemble has no single set of ``what`` (hidden states, attention maps)."""
        n = len(self.teachers)
        require(n == 1, f"{criterion} needs a single teacher: an ensemble of {n} "
                        f"(--teacher-path with ':') has no single set of {what}")
        return self.teachers[0]

    def _load_teacher(self, path):
        from fairseq import models as fairseq_models

        # The user named this file as a teacher, so full unpickling is allowed.
        state = load_checkpoint_state(path, trusted=True)
        cfg = checkpoint_cfg(state)
        self._check_teacher_dictionaries(path, state, cfg)
        teacher = fairseq_models.build_model(cfg.model, self, from_checkpoint=True)
        teacher.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        n_params = sum(p.numel() for p in teacher.parameters())
        logger.info(f"loaded teacher {path}: {type(teacher).__name__}, {n_params:,} parameters")
        return teacher

    def _check_teacher_dictionaries(self, path, state, cfg):
        """Teacher and student must index the same vocabularies.

        A fairseq checkpoint stores embedding sizes, not dictionaries: the
        sizes are always compared; when the teacher's own data directory is
        still on disk its dictionary files are compared word by word too.
        """
        sizes = {
            "source": ("encoder.embed_tokens.weight", self.src_dict),
            "target": ("decoder.embed_tokens.weight", self.tgt_dict),
        }
        for side, (key, student_dict) in sizes.items():
            weight = state["model"].get(key)
            require(weight is not None, f"teacher {path} has no {key}: not a fairseq encoder-decoder")
            require(
                weight.size(0) == len(student_dict),
                f"teacher/student dictionary mismatch: teacher {path} has a {side} "
                f"vocabulary of {weight.size(0)} entries, the student's data has "
                f"{len(student_dict)}; binarize the student data with the teacher's "
                f"dictionaries (fairseq-preprocess --srcdict/--tgtdict)",
            )
        teacher_data = getattr(cfg.task, "data", None)
        if not teacher_data:
            return
        for lang, student_dict in ((self.cfg.source_lang, self.src_dict), (self.cfg.target_lang, self.tgt_dict)):
            dict_file = os.path.join(teacher_data.split(":")[0], f"dict.{lang}.txt")
            if os.path.isfile(dict_file):
                teacher_dict = self.load_dictionary(dict_file)
                require(
                    teacher_dict.symbols == student_dict.symbols,
                    f"teacher/student dictionary mismatch: {dict_file} (teacher's) differs "
                    f"from the student's dict.{lang}.txt",
                )

    def _place_teachers(self, like):
        """Move teachers to the device and float dtype of tensor ``like``."""
        for t in self.teachers:
            p = next(t.parameters())
            if p.device != like.device or p.dtype != like.dtype:
                t.to(device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def teacher_forward(self, model, net_input, return_all_hiddens=False) -> List[TeacherOutput]:
        """Each teacher member's outputs on ``net_input`` (a batch's net_input).

        ``model`` is the student: its first parameter fixes device and dtype.
        """
        self._place_teachers(next(model.parameters()))
        outputs = []
        for t in self.teachers:
            t.eval()
            encoder_out = t.encoder(
                net_input["src_tokens"], src_lengths=net_input["src_lengths"],
                return_all_hiddens=return_all_hiddens,
            )
            logits, extra = t.decoder(
                net_input["prev_output_tokens"], encoder_out=encoder_out,
                src_lengths=net_input["src_lengths"],
            )
            outputs.append(TeacherOutput(logits, extra, encoder_out))
        return outputs

    def teacher_distribution(self, model, sample, net_input=None, topk=0) -> TeacherDistribution:
        """The teacher's distribution over every target position of ``sample``.

        ``net_input`` defaults to the sample's (gold prefixes); rows follow
        ``target.view(-1)``.  ``topk > 0`` keeps the k best tokens per row.
        With ``--teacher-cache`` the rows are read from the cache (``scores``:
        the teacher's T=1 log-probs of its top ``topk``; ``topk`` must be in
        1..k of the cache); they land on the target's device, in float32
        (``model`` is not used).
        """
        if self.teacher_cache is not None:
            require(net_input is None or net_input is sample["net_input"],
                    "--teacher-cache holds the teacher on the gold prefixes only; this "
                    "criterion runs the teacher on other inputs: pass --teacher-path instead")
            return self.teacher_cache.distribution(
                sample, topk, self.src_dict.pad(), self.tgt_dict.pad())
        outputs = self.teacher_forward(model, net_input or sample["net_input"])
        return self.distribution_from_outputs(outputs, topk)

    @staticmethod
    def distribution_from_outputs(outputs: List[TeacherOutput], topk=0) -> TeacherDistribution:
        """:meth:`teacher_distribution` from outputs :meth:`teacher_forward` already gave
        (a criterion that also needs the teacher's hidden states runs it once)."""
        scores = ensemble_scores([o.logits for o in outputs])
        dist = TeacherDistribution(scores.reshape(-1, scores.size(-1)))
        return dist.topk(topk)

