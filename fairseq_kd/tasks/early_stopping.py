"""fairseq-train's ``--patience`` across a stopped and resumed training.

fairseq counts the validations without a better score in two attributes of
``fairseq_cli.train.should_stop_early`` (``best``, ``num_runs``) that no checkpoint
keeps, so a resumed run counts afresh: its first validation becomes the best, and every
resume grants up to ``--patience`` more epochs.  Runs that are stopped and resumed
(the recipes' studies) would then stop later the more often they were interrupted.
The task saves the two with every checkpoint and puts them back on resume.
"""
import sys

STOP_EARLY_MODULE = "fairseq_cli.train"


def _should_stop_early():
    """fairseq's function that keeps the count, if fairseq-train is what runs (nothing
    is imported here: outside fairseq-train there is no count to keep)."""
    module = sys.modules.get(STOP_EARLY_MODULE)
    return getattr(module, "should_stop_early", None)


def patience_state():
    """The count so far ({} before the run's first validation, or outside fairseq-train)."""
    counter = _should_stop_early()
    if counter is None or getattr(counter, "best", None) is None:
        return {}
    return {"best": counter.best, "num_runs": counter.num_runs}


def restore_patience_state(state):
    """Put back what :func:`patience_state` saved (a resumed run continues the count)."""
    counter = _should_stop_early()
    if counter is not None and state:
        counter.best, counter.num_runs = state["best"], state["num_runs"]
