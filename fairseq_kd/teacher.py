"""Where the teacher runs: loading, checks, placement, forward pass, distribution.

A :class:`Teacher` is one frozen checkpoint, or several (``--teacher-path
a.pt:b.pt``) forming an ensemble whose probabilities are averaged.  It is

* loaded on first use (``translation_kd`` asks for it when it builds a
  criterion that needs it, so a bad teacher stops ``fairseq-train`` before
  anything is written), on CPU, in eval mode, with ``requires_grad`` off;
* checked against the student's dictionaries: embedding sizes always, and
  symbol by symbol against the teacher's dictionaries wherever they are found
  (embedded by ``fairseq-kd export``, ``--teacher-dict``, beside the
  checkpoint, the teacher's data folder); a logged warning says when only
  the sizes could be compared;
* moved to the device and float dtype of whatever it is run ``like`` (the
  student: the trainer casts the student under ``--fp16`` after the task is
  set up, and moves it to its GPU), or :meth:`Teacher.place`\\ d explicitly;
* run under ``torch.no_grad`` by :meth:`Teacher.forward` (its weights then
  require grad, see :func:`foldable_products`), which returns one
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
import contextlib
import logging
import os
from typing import List, Optional

import torch

from fairseq_kd.capture import NOTHING, Captured, CaptureSpec, capture
from fairseq_kd.checkpoint import checkpoint_cfg, load_checkpoint_state
from fairseq_kd.deploy.export import (EMBEDDINGS, SIDE_NAMES, SIDES, describe_files, dictionary_files_in,
                                      embedded_dictionaries, symbols_of_files)
from fairseq_kd.errors import KDError, require
from fairseq_kd.losses import TeacherDistribution, ensemble_scores

logger = logging.getLogger(__name__)

# Why a CTranslate2 folder (an external teacher, fairseq-kd corpus --teacher-ct2) is no --teacher-path
EXTERNAL_TEACHER = ("--teacher-path {path} is a CTranslate2 model folder: an external teacher gives only its "
                    "translations, not the distributions over the student's vocabulary that word-level KD "
                    "(word_kd, hybrid_kd, ckd, a2d, onpolicy_kd, --word-kd-alpha) needs; distil it with "
                    "fairseq-kd corpus --teacher-ct2 and train the student with seq_kd")


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
    dictionaries check the teacher's and build its models.  ``teacher_dict``:
    the teacher's dictionary (``--teacher-dict``: a file for both sides, or a
    folder), for teachers that do not carry theirs.
    """

    def __init__(self, paths: List[str], task, teacher_dict: Optional[str] = None):
        require(paths, "a teacher needs at least one checkpoint (--teacher-path)")
        for path in paths:
            require(not os.path.isfile(os.path.join(path, "model.bin")), EXTERNAL_TEACHER.format(path=path))
            require(os.path.isfile(path), f"--teacher-path: teacher checkpoint not found: {path}")
        require(not teacher_dict or os.path.exists(teacher_dict),
                f"--teacher-dict: not found: {teacher_dict}")
        self.paths = list(paths)
        self.teacher_dict = teacher_dict
        self._task = task
        self._models: Optional[List[torch.nn.Module]] = None

    @property
    def loaded(self):
        return self._models is not None

    @property
    def models(self) -> List[torch.nn.Module]:
        """The member models (loaded on first access, on CPU, in eval mode)."""
        if self._models is None:
            self._models = [load_teacher_model(p, self._task, self.teacher_dict) for p in self.paths]
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
        with foldable_products(self.models):
            for m in self.models:
                m.eval()
                outputs.append(_run_member(m, net_input, capture))
        return outputs

    def distribution(self, sample, topk=0, net_input=None, like=None):
        return distribution_of(self.forward(net_input or sample["net_input"], like=like), topk)


@contextlib.contextmanager
def foldable_products(models):
    """Let the frozen teacher's parameters require grad while it runs under ``torch.no_grad``.

    Why: PyTorch's matmul folds a 3-D input into one 2-D matrix product only
    when the weight requires grad or the input's leading dimensions are
    contiguous (aten's ``should_fold``).  fairseq's decoder projects onto the
    vocabulary the B x T x C transpose of its T x B x C features, so with
    frozen weights that projection ran as B batched products (``aten::bmm``):
    1.5-1.8x the time of the one product on CPU for a 256 x 8,008 projection
    (timed alternately in one process).  Nothing can be trained (no graph is
    recorded under no_grad) and the teacher is frozen again on exit.
    """
    require(not torch.is_grad_enabled(), "the teacher runs under torch.no_grad only")
    params = [p for m in models for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)


def _run_member(model, net_input, spec):
    """One member's encoder and decoder on ``net_input``, captured as ``spec`` asks."""
    with capture(model, spec) as seen:
        encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        seen.logits, seen.extra = model.decoder(
            net_input["prev_output_tokens"], encoder_out=encoder_out,
            src_lengths=net_input["src_lengths"])
    seen.encoder_out = encoder_out
    return seen


def load_teacher_model(path, task, teacher_dict=None):
    """A frozen teacher model from checkpoint ``path``, checked against ``task``'s dictionaries
    (``teacher_dict``: the teacher's dictionary file or folder, ``--teacher-dict``)."""
    from fairseq import models as fairseq_models

    # The user named this file as a teacher, so full unpickling is allowed.
    state = load_checkpoint_state(path, trusted=True)
    cfg = checkpoint_cfg(state)
    check_teacher_dictionaries(path, state, cfg, task, teacher_dict)
    teacher = fairseq_models.build_model(cfg.model, task, from_checkpoint=True)
    teacher.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in teacher.parameters())
    logger.info(f"loaded teacher {path}: {type(teacher).__name__}, {n_params:,} parameters")
    return teacher


def check_teacher_dictionaries(path, state, cfg, task, teacher_dict=None):
    """Teacher and student must index the same vocabularies, symbol by symbol.

    The vocabulary sizes (the teacher's embedding rows) are always compared.
    The symbols are compared wherever the teacher's dictionaries can be found
    (:func:`teacher_dictionaries`).  Sizes alone are weak evidence:
    fairseq-preprocess pads a dictionary to a multiple of 8, so another 8k
    SentencePiece model gives the same size; when only they can be compared,
    the log says so as a warning.
    """
    student = {"src": task.source_dictionary, "tgt": task.target_dictionary}
    langs = {"src": task.cfg.source_lang, "tgt": task.cfg.target_lang}
    check_vocabulary_sizes(path, state, student)
    found = teacher_dictionaries(path, cfg, state, langs, teacher_dict)
    if not found:
        logger.warning(sizes_only_message(path, cfg, student, langs))
        return
    for origin, symbols in found:
        for side in SIDES:
            check_same_symbols(symbols[side], student[side].symbols, side, origin, langs[side])
    logger.info(f"teacher {path}: dictionaries equal the student's symbol by symbol "
                f"({'; '.join(origin for origin, _ in found)})")


def check_vocabulary_sizes(path, state, student):
    """The teacher's embedding rows against the student's dictionary sizes."""
    for side, key in EMBEDDINGS.items():
        weight = state["model"].get(key)
        require(weight is not None, f"teacher {path} has no {key}: not a fairseq encoder-decoder")
        require(
            weight.size(0) == len(student[side]),
            f"teacher/student dictionary mismatch: teacher {path} has a {SIDE_NAMES[side]} "
            f"vocabulary of {weight.size(0)} entries, the student's data has "
            f"{len(student[side])}; binarize the student data with the teacher's "
            f"dictionaries (fairseq-preprocess --srcdict/--tgtdict)",
        )


def teacher_dictionaries(path, cfg, state, langs, teacher_dict=None):
    """``[(where from, {"src": symbols, "tgt": symbols})]``: the teacher's dictionaries.

    Every one known to be the teacher's is returned: those embedded in the
    checkpoint (``fairseq-kd export`` puts them there) and those the user
    named (``--teacher-dict``).  Without either, the first found of: the
    dictionary files beside the checkpoint (examples/teacher ships dict.txt
    beside teacher.pt), then those of the data folder the teacher was trained
    on (usually a folder of the machine that trained it, so often gone).
    Empty when none is found.
    """
    src, tgt = teacher_languages(cfg, langs)
    found = []
    embedded = embedded_dictionaries(state)
    if embedded is not None:
        found.append((f"embedded in {path}", embedded))
    if teacher_dict:
        files = named_dictionary_files(teacher_dict, src, tgt)
        found.append((f"--teacher-dict {describe_files(files)}", symbols_of_files(files)))
    if found:
        return found
    teacher_data = str(getattr(cfg.task, "data", None) or "").split(os.pathsep)[0]
    for folder in (os.path.dirname(os.path.abspath(path)), teacher_data):
        files = dictionary_files_in(folder, src, tgt)
        if files is not None:
            return [(describe_files(files), symbols_of_files(files))]
    return []


def teacher_languages(cfg, langs):
    """(source, target) language codes of the teacher's dictionary files: its own,
    else the student's (a teacher translates the student's language pair)."""
    return (getattr(cfg.task, "source_lang", None) or langs["src"],
            getattr(cfg.task, "target_lang", None) or langs["tgt"])


def named_dictionary_files(teacher_dict, src, tgt):
    """``{"src": file, "tgt": file}`` of ``--teacher-dict``: one file serves both sides
    (a joined dictionary); a folder holds dict.SRC.txt and dict.TGT.txt, or dict.txt."""
    if os.path.isfile(teacher_dict):
        return dict.fromkeys(SIDES, teacher_dict)
    require(os.path.isdir(teacher_dict), f"--teacher-dict: not found: {teacher_dict}")
    files = dictionary_files_in(teacher_dict, src, tgt)
    require(files is not None, f"--teacher-dict: folder {teacher_dict} holds neither "
                               f"dict.{src}.txt and dict.{tgt}.txt nor dict.txt")
    return files


def first_difference(a, b):
    """The first index where symbol lists ``a`` and ``b`` differ (or one ends), or None."""
    index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return None if index == len(a) == len(b) else index


def symbol_at(symbols, index):
    """Symbol ``index`` quoted for a message, or where the list ends."""
    return repr(symbols[index]) if index < len(symbols) else f"past its end ({len(symbols)} entries)"


def check_same_symbols(teacher_symbols, student_symbols, side, origin, lang):
    """One line naming the first differing index and both symbols when the lists differ."""
    index = first_difference(teacher_symbols, student_symbols)
    if index is not None:
        raise KDError(
            f"teacher/student dictionary mismatch: {SIDE_NAMES[side]} symbol {index} is "
            f"{symbol_at(teacher_symbols, index)} in the teacher's dictionary ({origin}) but "
            f"{symbol_at(student_symbols, index)} in the student's dict.{lang}.txt; binarize the "
            f"student data with the teacher's dictionaries (fairseq-preprocess --srcdict/--tgtdict)")


def sizes_only_message(path, cfg, student, langs):
    """The warning logged when no dictionary of the teacher's can be found."""
    src, tgt = teacher_languages(cfg, langs)
    data = str(getattr(cfg.task, "data", None) or "") or "(none recorded)"
    return (f"teacher {path}: only the vocabulary sizes ({len(student['src'])} source, "
            f"{len(student['tgt'])} target entries) could be compared with the student's, not the "
            f"symbols, so a different dictionary of the same size would pass (fairseq-preprocess pads "
            f"sizes to a multiple of 8): the checkpoint embeds no dictionaries (fairseq-kd export "
            f"embeds them), none lies beside it (dict.{src}.txt and dict.{tgt}.txt, or dict.txt), and "
            f"its data folder {data} has none; give the teacher's dictionary with --teacher-dict FILE")
