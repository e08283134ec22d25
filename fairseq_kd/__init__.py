"""fairseq_kd: knowledge distillation for NMT as a fairseq plugin.

Load it with ``--user-dir fairseq_kd`` (or ``import fairseq_kd``): this
registers the ``translation_kd`` task, the KD criterions and the student
architectures, makes fairseq checkpoints loadable under torch >= 2.6, and
prints configuration errors as one line.
"""
from fairseq_kd.checkpoint import register_safe_globals
from fairseq_kd.errors import KDError, install_excepthook

register_safe_globals()
install_excepthook()

from fairseq_kd import criterions, models, tasks  # noqa: E402,F401

__version__ = "0.1.0"
__all__ = ["KDError"]
