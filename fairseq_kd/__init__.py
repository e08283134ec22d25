"""fairseq_kd: knowledge distillation for NMT as a fairseq plugin.

Load it with ``--user-dir fairseq_kd`` (or ``import fairseq_kd``): this
registers the ``translation_kd`` task, the KD criterions and the student
architectures, makes fairseq checkpoints loadable under torch >= 2.6, and
prints configuration errors as one line.

The ``fairseq-kd`` command is the one exception: importing fairseq takes
seconds, which ``fairseq-kd --help`` or ``fairseq-kd table`` should not pay,
so when this package is imported as that command starts, :func:`register`
is left to the command (``fairseq_kd.cli.main``), which calls it for the
subcommands that use fairseq.
"""
import os
import sys

from fairseq_kd.errors import KDError, install_excepthook

__version__ = "0.1.0"
__all__ = ["KDError", "register"]


def register():
    """Register the task, criterions and architectures with fairseq (idempotent)."""
    from fairseq_kd.checkpoint import register_safe_globals

    register_safe_globals()
    from fairseq_kd import criterions, models, tasks  # noqa: F401


def _starting_fairseq_kd_command():
    """Whether this interpreter was started as ``fairseq-kd`` or ``python -m fairseq_kd.cli``.

    ``sys.orig_argv`` (not ``sys.argv``) because multiprocessing's spawned
    children inherit the parent's ``sys.argv``: they must register eagerly,
    like any other importer.
    """
    argv = getattr(sys, "orig_argv", [])
    if sys.argv[:1] == ["-m"]:  # runpy is importing the package of `python -m PACKAGE`
        return "fairseq_kd.cli" in argv
    return len(argv) > 1 and os.path.basename(argv[1]) in ("fairseq-kd", "fairseq-kd.exe")


install_excepthook()
if not _starting_fairseq_kd_command():
    register()
