"""User-facing errors: bad input is reported as one clear line, not a traceback.

fairseq's command-line tools let exceptions propagate to the interpreter, so a
configuration mistake (a missing teacher file, ``--kd-alpha 1.5``) would end in
a long traceback from deep inside fairseq.  Every check in this package raises
:class:`KDError`, printed as one line with one of two prefixes:

- inside fairseq's tools (``fairseq-train``, ``fairseq-generate`` with
  ``--user-dir fairseq_kd``), importing the plugin installs an excepthook that
  prints ``fairseq_kd: error: <message>`` (exit status 1, as for any uncaught
  exception);
- the ``fairseq-kd`` commands catch it themselves and print
  ``fairseq-kd COMMAND: error: <message>`` (exit status 2, as argparse does
  for a bad option; :func:`fairseq_kd.cli.main`).

Any other exception keeps its normal traceback.
"""
import sys


class KDError(ValueError):
    """A problem with the user's input or configuration, explained in one line."""


def _kd_excepthook(exc_type, exc, tb, _previous=sys.excepthook):
    if issubclass(exc_type, KDError):
        print(f"fairseq_kd: error: {exc}", file=sys.stderr)
        return
    _previous(exc_type, exc, tb)


def install_excepthook():
    """Print :class:`KDError` as one line (idempotent)."""
    if getattr(sys.excepthook, "__name__", "") != "_kd_excepthook":
        sys.excepthook = _kd_excepthook


def require(condition, message):
    """Raise :class:`KDError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise KDError(message)
