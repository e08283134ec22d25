"""Checkpoint averaging: one checkpoint whose weights are the mean of several of one run.

NMT's usual remedy for the noise of a single checkpoint (Vaswani et al. 2017
average the last 5 or 20).  fairseq's ``scripts/average_checkpoints.py`` does
it, but a pip-installed fairseq has no ``scripts/``.  Early in training the
noise is large: on the Bible CPU study, a student's beam output length moved
by 2-9 points within about 20 updates (docs/results.md).

The averaged checkpoint is the newest input with its weights replaced and its
optimizer state dropped (old moments do not belong to the new weights), so
fairseq-generate, ``fairseq-kd export`` and ``--restore-file`` read it as
they read the input.
"""
import os
import re

import torch

from fairseq_kd.checkpoint import checkpoint_model_cfg, load_checkpoint_state, plain_cfg
from fairseq_kd.errors import require
from fairseq_kd.pruning import canonical_names

# fairseq's file names: checkpoint_EPOCH_UPDATES.pt (--save-interval-updates), checkpointEPOCH.pt (epoch end)
UPDATE_CHECKPOINT = re.compile(r"^checkpoint_(\d+)_(\d+)\.pt$")
EPOCH_CHECKPOINT = re.compile(r"^checkpoint(\d+)\.pt$")


def last_checkpoints(folder, n):
    """The ``n`` newest checkpoints of a fairseq save dir, oldest first.

    Interval checkpoints (``--save-interval-updates``) if the folder has any,
    ordered by their update count, else epoch checkpoints by epoch; never
    ``checkpoint_best.pt`` / ``checkpoint_last.pt``, which repeat one of them.
    """
    require(os.path.isdir(folder), f"--dir: folder not found: {folder}")
    require(n >= 1, f"--last must be at least 1, got {n}")
    names = os.listdir(folder)
    found = sorted((int(m.group(2)), name) for name in names if (m := UPDATE_CHECKPOINT.match(name)))
    kind = "interval (checkpoint_EPOCH_UPDATES.pt)"
    if not found:
        found = sorted((int(m.group(1)), name) for name in names if (m := EPOCH_CHECKPOINT.match(name)))
        kind = "epoch (checkpointEPOCH.pt)"
    require(len(found) >= n, f"--last {n}: {folder} has {len(found)} {kind} checkpoints; train with "
            f"--save-interval-updates and --keep-interval-updates {n} (or without --no-epoch-checkpoints)")
    return [os.path.join(folder, name) for _, name in found[-n:]]


def average_weights(models, names, model_cfg=None):
    """The mean of the state dicts ``models`` (read from the files ``names``).

    Floating-point tensors are averaged in float64 and stored in their own
    type; any other tensor (a step count, a version) must be equal in every
    input and is kept.  Tied tensors (``model_cfg``'s ``share_*`` flags, or
    storage shared in the first input: :func:`fairseq_kd.pruning.canonical_names`)
    are averaged once and the one result is stored under each of their keys,
    so the output keeps the tie even when the inputs hold separate copies
    (checkpoints of GPU or fp16 runs) and parameter counts stay right.
    """
    first = models[0]
    for model, name in zip(models[1:], names[1:]):
        require(model.keys() == first.keys(),
                f"{name} and {names[0]} are not checkpoints of one model: their parameters differ "
                f"({sorted(set(model) ^ set(first))[:3]} ...)")
    canonical = canonical_names(first, model_cfg)
    averaged = {}
    for key, value in first.items():
        if canonical[key] != key:
            # a copy of a parameter met earlier under its first name (state-dict order)
            averaged[key] = averaged[canonical[key]]
            continue
        tensors = [model[key] for model in models]
        for tensor, name in zip(tensors[1:], names[1:]):
            require(tensor.shape == value.shape,
                    f"{key}: shape {tuple(tensor.shape)} in {name} but {tuple(value.shape)} in {names[0]}")
        if value.is_floating_point():
            total = sum(t.double() for t in tensors)
            averaged[key] = (total / len(tensors)).to(value.dtype)
        else:
            require(all(torch.equal(t, value) for t in tensors), f"{key} differs between the checkpoints")
            averaged[key] = value
    return averaged


def average_checkpoints(paths):
    """(state, updates): the newest of ``paths`` with the mean weights of all, and each input's update count."""
    require(paths, "no checkpoints to average")
    states = [load_checkpoint_state(path) for path in paths]
    updates = [s["optimizer_history"][-1].get("num_updates") for s in states]
    state = states[-1]
    state["model"] = average_weights([s["model"] for s in states], list(paths), checkpoint_model_cfg(state))
    state.pop("last_optimizer_state", None)
    state["extra_state"]["averaged_from"] = [os.path.basename(p) for p in paths]
    return state, updates


def save_checkpoint(state, out):
    """Write ``state`` to ``out`` (its folder created) as fairseq saves: plain containers, no omegaconf."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    state["cfg"] = plain_cfg(state.get("cfg"))
    # whole or not at all: the recipes reuse an average that exists (a killed write left none)
    torch.save(state, out + ".tmp")
    os.replace(out + ".tmp", out)
