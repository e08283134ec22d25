"""Loading fairseq checkpoints under torch >= 2.6.

torch 2.6 changed ``torch.load`` to ``weights_only=True``.  fairseq checkpoints
of legacy-registered models (``transformer`` among them) store their model
config as an ``argparse.Namespace``, which the weights-only unpickler refuses,
so stock ``fairseq-generate`` and ``--restore-file`` fail.  Two remedies:

* :func:`register_safe_globals` (run when the plugin is imported) allow-lists
  the few plain classes fairseq puts into checkpoints (``argparse.Namespace``;
  numpy arrays and scalars, which ``--eval-bleu`` runs store).  Loading stays
  weights-only, so untrusted files still cannot run code; fairseq's own
  ``load_checkpoint_to_cpu`` (generate, resume) then works unchanged.
* :func:`load_checkpoint_state` with ``trusted=True`` loads a file the user
  named as a teacher with ``weights_only=False``, for teachers saved by other
  fairseq versions that hold further objects.
"""
import argparse
import logging
import os
import re

import torch
from omegaconf import OmegaConf

from fairseq_kd.errors import KDError, require

logger = logging.getLogger(__name__)

SAFE_GLOBALS = [argparse.Namespace]
UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def numpy_globals():
    """What a checkpoint of a run with ``--eval-bleu`` holds besides tensors: the
    BLEU meters' numpy arrays and scalars in ``extra_state["metrics"]`` (plain
    data: an array of objects would still need its objects allow-listed)."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    # numpy >= 1.25 pickles a dtype by its class (numpy.dtypes.Float64DType, ...)
    numeric = {type(np.dtype(code)) for code in np.typecodes["AllFloat"] + np.typecodes["AllInteger"] + "?"}
    return [multiarray.multiarray._reconstruct, multiarray.multiarray.scalar, np.ndarray, np.dtype,
            *sorted(numeric, key=str)]


def register_safe_globals():
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:  # torch < 2.4 has no allow-list and no weights-only default
        add(SAFE_GLOBALS + numpy_globals())


def load_checkpoint_state(path, trusted=False):
    """Read a fairseq checkpoint into CPU memory, upgraded like fairseq's loader.

    ``trusted`` disables weights-only unpickling; use it only for files the
    user explicitly named (teachers), never for files found by a search.
    """
    from fairseq import checkpoint_utils

    require(os.path.isfile(path), f"checkpoint not found: {path}")
    state = read_torch_file(path, trusted)
    require(isinstance(state, dict) and isinstance(state.get("model"), dict),
            f"{path} is not a fairseq checkpoint (no 'model' entry)")
    if state.get("cfg") is not None:
        state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
    # Model-only files (exported or hand-made) carry no training history, which
    # fairseq's upgrade step assumes; give them an empty one.
    state.setdefault("optimizer_history", [{"criterion_name": None, "optimizer_name": None,
                                            "lr_scheduler_state": {}, "num_updates": 0}])
    state.setdefault("extra_state", {})
    return checkpoint_utils._upgrade_state_dict(state)


def read_torch_file(path, trusted=False, what="fairseq checkpoint"):
    """``torch.load`` of a file the user named (on CPU), any failure as one line.

    torch's own messages for a file that is not a torch file are pages long
    (or a bare ``KeyError: 101``), and for a weights-only refusal they advise
    ``weights_only=False``, which is not the user's fix here.
    """
    require(os.path.isfile(path), f"file not found: {path}")
    require(os.path.getsize(path) > 0, f"{path} is empty: not a {what}")
    try:
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=not trusted)
    except Exception as e:
        raise KDError(unreadable_message(path, e, what)) from e


def unreadable_message(path, error, what):
    refused = UNSUPPORTED_GLOBAL.search(str(error))
    if refused:
        return (f"{path} is not a {what} this plugin can read: safe (weights-only) loading "
                f"refuses the object {refused.group(1)} it holds")
    return f"{path} is not a {what} (torch cannot read it: {type(error).__name__})"


def checkpoint_cfg(state):
    """The model/task config of a loaded checkpoint state, as an omegaconf object."""
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    if state.get("args") is not None:
        return convert_namespace_to_omegaconf(state["args"])
    require(state.get("cfg") is not None, "checkpoint holds neither 'args' nor 'cfg'")
    return state["cfg"]


def checkpoint_model_cfg(state):
    """The model config (``cfg.model``) of a state read by :func:`load_checkpoint_state`, or None.

    For a legacy-registered architecture (``transformer``) it is the
    ``argparse.Namespace`` fairseq saved; its ``share_*`` flags tell which
    tensors of the state dict are one parameter
    (:func:`fairseq_kd.pruning.canonical_names`).
    """
    cfg = state.get("cfg")
    return cfg.get("model") if cfg is not None else None


def plain_cfg(cfg):
    """A loaded omegaconf config back to the containers fairseq saved (its Namespaces kept)."""
    return OmegaConf.to_container(cfg) if OmegaConf.is_config(cfg) else cfg
