"""Where the teacher runs: loading, checks, placement, forward pass, distribution.

A :class:`Teacher` is one frozen checkpoint, or several (``--teacher-path
a.pt:b.pt``) forming an ensemble whose probabilities are averaged.  It is

* loaded on first use (``translation_kd`` asks for it when it builds a
  criterion that needs it, so a bad teacher stops ``fairseq-train`` before
  anything is written), on CPU, in eval mode, with ``requires_grad`` off;
* checked against the student's dictionaries (embedding sizes always, and
  the dictionary files word by word when the teacher's data folder is still
  on disk);
* moved to the device and float dtype of whatever it is run ``like`` (the
  student: the trainer casts the student under ``--fp16`` after the task is
  set up, and moves it to its GPU), or :meth:`Teacher.place`\\ d explicitly;
* run under ``torch.no_grad`` by :meth:`Teacher.forward`, which returns one
  :class:`fairseq_kd.capture.Captured` per member (logits, decoder extras,
  encoder output, and whatever else a :class:`~fairseq_kd.capture.CaptureSpec`
  asks: layer states, attention maps, masks);
* turned into a :class:`fairseq_kd.losses.TeacherDistribution` by
  :meth:`Teacher.distribution` (the ensemble's averaged probabilities, top-k
  on request).

It is never part of the student (not in its state dict or checkpoint, never
handed to the optimizer); under DDP each rank builds its own task, hence its
own teacher on its own device.

:class:`TeacherSource` is the interface criterions use (``task.teacher``);
the offline cache (:class:`fairseq_kd.teacher_cache.TeacherCache`) offers the
same ``distribution`` and refuses what needs the model itself.
"""
import logging
import os
from typing import List, Optional

import torch

from fairseq_kd.capture import NOTHING, Captured, CaptureSpec, capture
from fairseq_kd.checkpoint import checkpoint_cfg, load_checkpoint_state
from fairseq_kd.errors import require
from fairseq_kd.losses import TeacherDistribution, ensemble_scores

logger = logging.getLogger(__name__)


def teacher_paths(spec) -> List[str]:
    """``"a.pt:b.pt"`` -> ``["a.pt", "b.pt"]`` (empty for None or "")."""
    return [p for p in (spec or "").split(":") if p]


def distribution_of(outputs: List[Captured], topk=0) -> TeacherDistribution:
    """The distribution of outputs :meth:`Teacher.forward` already gave (a criterion
    that also needs the teacher's internals runs it once): rows follow the
    flattened B x T positions; ``topk > 0`` keeps the k best tokens per row."""
    scores = ensemble_scores([o.logits for o in outputs])
    return TeacherDistribution(scores.reshape(-1, scores.size(-1))).topk(topk)


def _device_and_dtype(like):
    """Device and float dtype of a module (its first parameter) or a tensor."""
    if isinstance(like, torch.nn.Module):
        like = next(like.parameters())
    return like.device, like.dtype


class TeacherSource:
    """What a criterion may ask of ``task.teacher`` (an online teacher or a cache)."""

    def distribution(self, sample, topk=0, net_input=None, like=None) -> TeacherDistribution:
        """The teacher's distribution over every target position of ``sample``.

        Rows follow ``sample["target"].view(-1)``; ``net_input`` defaults to
        the sample's (gold prefixes); ``topk > 0`` keeps the k best tokens;
        ``like`` (the student) fixes device and dtype where the teacher runs.
        """
        raise NotImplementedError

    def forward(self, net_input, like=None, capture: CaptureSpec = NOTHING) -> List[Captured]:
        """Each member's forward pass on ``net_input``, with what ``capture`` asks."""
        raise NotImplementedError

    def model(self, criterion, what) -> torch.nn.Module:
        """The single teacher model, for criterions that distil its ``what``."""
        raise NotImplementedError

    def max_positions(self):
        """The longest (source, target) the teacher accepts, or None for no limit."""
        return None

    def load(self):
        """Load and check now what is otherwise loaded on first use."""
        return self


class Teacher(TeacherSource):
    """A teacher checkpoint or ensemble, loaded on first use.

    ``task``: a fairseq translation task on the student's data; its
    dictionaries check the teacher's and build its models.
    """

    def __init__(self, paths: List[str], task):
        require(paths, "a teacher needs at least one checkpoint (--teacher-path)")
        for path in paths:
            require(os.path.isfile(path), f"--teacher-path: teacher checkpoint not found: {path}")
        self.paths = list(paths)
        self._task = task
        self._models: Optional[List[torch.nn.Module]] = None

    @property
    def loaded(self):
        return self._models is not None

    @property
    def models(self) -> List[torch.nn.Module]:
        """The member models (loaded on first access, on CPU, in eval mode)."""
        if self._models is None:
            self._models = [load_teacher_model(p, self._task) for p in self.paths]
        return self._models

    def load(self):
        self.models
        return self

    def model(self, criterion, what):
        n = len(self.models)
        require(n == 1, f"{criterion} needs a single teacher: an ensemble of {n} "
                        f"(--teacher-path with ':') has no single set of {what}")
        return self.models[0]

    def max_positions(self):
        from fairseq.utils import resolve_max_positions

        return resolve_max_positions(*[m.max_positions() for m in self.models])

    def place(self, device, dtype):
        """Move every member to ``device`` and float ``dtype`` (a no-op when there)."""
        for m in self.models:
            p = next(m.parameters())
            if p.device != device or p.dtype != dtype:
                m.to(device=device, dtype=dtype)

    @torch.no_grad()
    def forward(self, net_input, like=None, capture: CaptureSpec = NOTHING) -> List[Captured]:
        if like is not None:
            self.place(*_device_and_dtype(like))
        outputs = []
        for m in self.models:
            m.eval()
            outputs.append(_run_member(m, net_input, capture))
        return outputs

    def distribution(self, sample, topk=0, net_input=None, like=None):
        return distribution_of(self.forward(net_input or sample["net_input"], like=like), topk)


def _run_member(model, net_input, spec):
    """One member's encoder and decoder on ``net_input``, captured as ``spec`` asks."""
    with capture(model, spec) as seen:
        encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        seen.logits, seen.extra = model.decoder(
            net_input["prev_output_tokens"], encoder_out=encoder_out,
            src_lengths=net_input["src_lengths"])
    seen.encoder_out = encoder_out
    return seen


def load_teacher_model(path, task):
    """A frozen teacher model from checkpoint ``path``, checked against ``task``'s dictionaries."""
    from fairseq import models as fairseq_models

    # The user named this file as a teacher, so full unpickling is allowed.
    state = load_checkpoint_state(path, trusted=True)
    cfg = checkpoint_cfg(state)
    check_teacher_dictionaries(path, state, cfg, task)
    teacher = fairseq_models.build_model(cfg.model, task, from_checkpoint=True)
    teacher.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in teacher.parameters())
    logger.info(f"loaded teacher {path}: {type(teacher).__name__}, {n_params:,} parameters")
    return teacher


def check_teacher_dictionaries(path, state, cfg, task):
    """Teacher and student must index the same vocabularies.

    A fairseq checkpoint stores embedding sizes, not dictionaries: the
    sizes are always compared; when the teacher's own data directory is
    still on disk its dictionary files are compared word by word too.
    """
    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    sizes = {
        "source": ("encoder.embed_tokens.weight", src_dict),
        "target": ("decoder.embed_tokens.weight", tgt_dict),
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
    for lang, student_dict in ((task.cfg.source_lang, src_dict), (task.cfg.target_lang, tgt_dict)):
        dict_file = os.path.join(teacher_data.split(":")[0], f"dict.{lang}.txt")
        if os.path.isfile(dict_file):
            teacher_dict = task.load_dictionary(dict_file)
            require(
                teacher_dict.symbols == student_dict.symbols,
                f"teacher/student dictionary mismatch: {dict_file} (teacher's) differs "
                f"from the student's dict.{lang}.txt",
            )
