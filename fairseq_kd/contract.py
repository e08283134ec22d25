"""The contract between the ``translation_kd`` task and the KD criterions.

A KD criterion (a :class:`KDCriterion`, e.g. any subclass of
``fairseq_kd.criterions.kd_base.KDCriterionBase``) may ask of its task
(a :class:`KDTask`, i.e. ``translation_kd``) these, and nothing else:

``task.teacher``
    ``None`` without ``--teacher-path``/``--teacher-cache``, else a
    :class:`fairseq_kd.teacher.TeacherSource`:
    ``distribution(sample, topk=0, net_input=None, like=model)`` (online
    teacher or ensemble, or ``--teacher-cache``); ``forward(net_input,
    like=model, capture=CaptureSpec(...))`` and ``model(criterion, what)``
    (the single teacher model, to size modules from it) for criterions that
    need the teacher's internals: a cache refuses them, an ensemble refuses
    ``model``, each with a one-line error.  The teacher runs in
    :mod:`fairseq_kd.teacher`, nowhere else.
``task.student_cfg``
    the student's model config (set when the task built the model, before
    the criterion), to size criterion modules (projections, gates).
``task.epoch``
    the current training epoch (1-based, also right after a resume), for
    per-epoch schedules.
``task.distilled_data``
    the ``--distilled-data`` folder or None; its batches carry
    ``sample["distilled"]``.
``task.source_dictionary``, ``task.target_dictionary``
    fairseq's own.

In return the task

* checks, where the criterion is built (:func:`check_criterion`, called by
  the task's ``build_criterion``), that the student's decoder returns
  vocabulary logits, and loads (and checks) the teacher of a criterion that
  ``needs_teacher``, so that a bad setup stops before training starts;
* calls :meth:`KDCriterion.on_update` once per training update with the
  logging outputs fairseq has summed over ``--update-freq`` micro-batches
  and DDP ranks (identical on every rank), for running statistics;
* saves :meth:`KDCriterion.checkpoint_state` with every checkpoint and hands
  it back to :meth:`KDCriterion.load_checkpoint_state` on resume, through
  fairseq's task hooks ``get_checkpoint_dict``/``set_checkpoint_dict`` (the
  checkpoint's ``extra_state``).  This is for state that is not a parameter
  or buffer: fairseq saves a criterion's ``state_dict`` only when the
  criterion has parameters (hybrid_kd's gate statistics, a2d/ckd modules),
  and loads it strictly.  fairseq writes checkpoints on rank 0 only and
  every rank is restored from that file; it restores the state unless
  ``--reset-dataloader`` (the state then starts afresh, like the data order).

A criterion states what it needs with ``needs_teacher`` and calls
:func:`require_kd_task` when it is built (the one-line error for
``--task translation`` or a missing teacher); a criterion that needs
nothing of the task (``seq_kd`` without a word-KD term) also runs under
fairseq's ``translation`` task.
"""
from fairseq_kd.errors import require


class KDTask:
    """What a task offers KD criterions (see the module docstring)."""

    teacher = None  # Optional[fairseq_kd.teacher.TeacherSource]
    student_cfg = None
    epoch = 1
    distilled_data = None


class KDCriterion:
    """What a KD criterion declares to its task (see the module docstring)."""

    needs_teacher = False

    def on_update(self, logging_outputs):
        """Called once per training update with the update's summed logging outputs."""

    def checkpoint_state(self):
        """State to save with checkpoints (a dict of CPU tensors and plain values; {}: none)."""
        return {}

    def load_checkpoint_state(self, state):
        """Restore what :meth:`checkpoint_state` returned (on resume)."""


def require_kd_task(task, criterion, needs_teacher=True):
    """``task`` as a :class:`KDTask`, or a one-line error saying what to pass."""
    what = "a teacher" if needs_teacher else "the translation_kd task"
    require(isinstance(task, KDTask),
            f"{criterion} needs {what}: use --task translation_kd "
            f"(got --task {getattr(task.cfg, '_name', type(task).__name__)})")
    if needs_teacher:
        require(task.teacher is not None, f"{criterion} needs a teacher: pass --teacher-path")
    return task


def check_criterion(task, criterion, name, student_logits):
    """The task's side of the contract at build time (``student_logits``: whether the
    student's decoder returns vocabulary logits)."""
    if not isinstance(criterion, KDCriterion):
        return
    # The KD losses read vocabulary logits from the decoder's output, which
    # an adaptive-softmax decoder does not produce (it returns hidden states).
    require(student_logits, f"--criterion {name} does not support students with an adaptive "
            "softmax (--adaptive-softmax-cutoff): the KD losses need the full vocabulary logits")
    if criterion.needs_teacher and task.teacher is not None:
        task.teacher.load()


def criterion_checkpoint_dict(task, criterion):
    """The task's ``get_checkpoint_dict``: fairseq merges it into the checkpoint's
    ``extra_state`` and hands back ``extra_state[<task class name>]`` on resume."""
    state = criterion.checkpoint_state() if isinstance(criterion, KDCriterion) else {}
    return {type(task).__name__: {"criterion": state}} if state else {}


def restore_criterion_state(criterion, task_state):
    """The task's ``set_checkpoint_dict``: what :func:`criterion_checkpoint_dict` saved."""
    if isinstance(criterion, KDCriterion) and task_state.get("criterion"):
        criterion.load_checkpoint_state(task_state["criterion"])


def after_update(criterion, logging_outputs):
    """The task's per-update hook (from its ``reduce_metrics``, in training only)."""
    if isinstance(criterion, KDCriterion) and criterion.training:
        criterion.on_update(logging_outputs)
