"""Magnitude pruning of a student (Kim & Rush 2016, section 6; See et al. 2016).

A weight tensor is pruned by zeroing its entries of smallest magnitude.
*Class-blind* pruning ranks all selected weights together (one global
threshold); *per-layer* pruning prunes each tensor to the ratio.  Exactly
``round(ratio * n)`` entries are pruned (ties broken by position), so the
measured sparsity is the requested one up to 1/n.

Selected tensors: the weights of linear layers (2-D ``*.weight`` tensors that
are not embeddings), optionally the embeddings too.  Tied tensors (shared
embeddings / output projection) are pruned once, under the name
``named_parameters()`` gives them (the first in the state dict), and every
copy in the checkpoint gets the same pruning.  Ties are read from the model's
own structure, the config's ``share_*`` flags (:func:`canonical_names`), not
from shared storage alone: a checkpoint saved from a GPU or fp16 run holds one
separate tensor per key, since fairseq moves the state to CPU tensor by
tensor.

Retraining keeps the pruned weights at zero with :class:`MaskKeeper` (the
``--prune-mask`` option of ``translation_kd``): gradient hooks zero their
gradients, so they receive no update and no optimizer state (fresh Adam
moments stay 0, also for fp16 master weights, which get the masked
gradients), and the task multiplies the weights by the masks after every
optimizer step, which also covers optimizers that move weights without a
gradient (weight decay on a nonzero state, resumed momenta).
"""
import os

import torch

from fairseq_kd.checkpoint import load_checkpoint_state, plain_cfg, read_torch_file
from fairseq_kd.errors import KDError, require
from fairseq_kd.hidden_states import unwrap_model

EMBEDDING_KEYS = ("embed_tokens", "embed_positions", "output_projection")


def is_embedding(name):
    return any(k in name for k in EMBEDDING_KEYS)


def _cfg_flag(model_cfg, name):
    if model_cfg is None:
        return False
    value = model_cfg.get(name) if hasattr(model_cfg, "get") else getattr(model_cfg, name, None)
    return bool(value)


def config_ties(model_cfg):
    """{copy: original} of the parameters a fairseq transformer shares, from its config.

    ``--share-all-embeddings``: the decoder's embeddings are the encoder's;
    ``--share-all-embeddings`` or ``--share-decoder-input-output-embed``: the
    output projection is the decoder's embedding matrix.
    """
    ties = {}
    if _cfg_flag(model_cfg, "share_all_embeddings"):
        ties["decoder.embed_tokens.weight"] = "encoder.embed_tokens.weight"
    if (_cfg_flag(model_cfg, "share_all_embeddings")
            or _cfg_flag(model_cfg, "share_decoder_input_output_embed")):
        ties["decoder.output_projection.weight"] = "decoder.embed_tokens.weight"
    return ties


def canonical_names(state_dict, model_cfg=None):
    """{key: the name of its parameter in ``named_parameters()``} for every key.

    Ties come from the config (:func:`config_ties`) and, for architectures it
    does not cover, from storage shared inside this state dict.  The name kept
    is the first of its group in state-dict order, which is module
    registration order, as ``named_parameters()`` keeps it.
    """
    parent = {}

    def find(name):
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb, key=order.__getitem__)] = min(ra, rb, key=order.__getitem__)

    order = {name: i for i, name in enumerate(state_dict)}
    for copy, original in config_ties(model_cfg).items():
        if (copy in state_dict and original in state_dict
                and state_dict[copy].shape == state_dict[original].shape):
            union(copy, original)
    by_storage = {}
    for name, w in state_dict.items():
        if torch.is_tensor(w) and w.numel():
            union(name, by_storage.setdefault((w.data_ptr(), tuple(w.shape), w.dtype), name))
    return {name: find(name) for name in state_dict}


def prunable_weights(state_dict, include_embeddings=False, model_cfg=None):
    """{name: tensor} of the weights to prune, one name per tied tensor (see module doc)."""
    canonical = canonical_names(state_dict, model_cfg)
    selected = {}
    for name, w in state_dict.items():
        if canonical[name] != name:  # a copy of a tensor selected under its first name
            continue
        if not (name.endswith(".weight") and w.dim() == 2 and w.is_floating_point()):
            continue
        if is_embedding(name) and not include_embeddings:
            continue
        selected[name] = w
    return selected


def _smallest_mask(magnitudes, n_prune):
    """Bool mask (True = kept) pruning exactly the n_prune smallest entries."""
    keep = torch.ones(magnitudes.numel(), dtype=torch.bool)
    if n_prune > 0:
        # stable sort: equal magnitudes are pruned in order of position
        order = torch.sort(magnitudes.reshape(-1).float(), stable=True).indices
        keep[order[:n_prune]] = False
    return keep.view(magnitudes.shape)


def magnitude_masks(weights, ratio, per_layer=False):
    """{name: bool mask, True = kept} pruning ``ratio`` of the weights by magnitude."""
    require(0.0 <= ratio < 1.0, f"--ratio must be in [0, 1), got {ratio}")
    if per_layer:
        return {n: _smallest_mask(w.abs(), round(ratio * w.numel())) for n, w in weights.items()}
    flat = torch.cat([w.abs().reshape(-1).float() for w in weights.values()])
    keep = _smallest_mask(flat, round(ratio * flat.numel()))
    masks, offset = {}, 0
    for name, w in weights.items():
        masks[name] = keep[offset: offset + w.numel()].view(w.shape)
        offset += w.numel()
    return masks


def apply_masks(weights, masks, model_cfg=None):
    """Zero the pruned entries of every tensor in ``weights`` whose parameter has a mask.

    ``weights``: a state dict (tied copies included) or the selection of
    :func:`prunable_weights`.  Every copy of a tied tensor is masked: fairseq
    loads each key of a checkpoint into the shared parameter in turn, so one
    unmasked copy would bring the pruned weights back.
    """
    canonical = canonical_names(weights, model_cfg)
    with torch.no_grad():
        for name, w in weights.items():
            mask = masks.get(canonical[name])
            if mask is not None:
                w.mul_(mask.to(device=w.device, dtype=w.dtype))


def sparsity_report(weights):
    """[(name, numel, zeros)] per tensor, measured on the weights themselves."""
    rows = []
    for name, w in weights.items():
        rows.append((name, w.numel(), int((w == 0).sum())))
    return rows


def format_report(rows):
    """The rows of :func:`sparsity_report` as an aligned table with a total."""
    width = max(len(name) for name, *_ in rows)
    lines = [f"{'tensor':<{width}}  {'weights':>9}  {'zeros':>9}  sparsity"]
    for name, n, zeros in rows:
        lines.append(f"{name:<{width}}  {n:>9}  {zeros:>9}  {zeros / n:8.4f}")
    total, zeros = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines.append(f"{'total':<{width}}  {total:>9}  {zeros:>9}  {zeros / total:8.4f}")
    return "\n".join(lines)


def prune_checkpoint(path, ratio, per_layer=False, include_embeddings=False):
    """The checkpoint at ``path`` pruned to ``ratio`` and made ready to retrain.

    Returns (state, masks, weights): the checkpoint state with the pruned
    weights zeroed, the masks of :func:`magnitude_masks` and the selected
    weights (tensors of ``state``, for :func:`sparsity_report`).
    """
    state = load_checkpoint_state(path)
    model_cfg = state["cfg"].get("model") if state.get("cfg") is not None else None
    weights = prunable_weights(state["model"], include_embeddings, model_cfg)
    require(weights, f"{path}: no linear weights found to prune")
    masks = magnitude_masks(weights, ratio, per_layer)
    apply_masks(state["model"], masks, model_cfg)
    # A pruned model is retrained from a fresh optimizer: old moments would move pruned weights.
    state.pop("last_optimizer_state", None)
    # fairseq restores the training time even with --reset-*: without this, a retraining
    # under --stop-time-hours would count the original training and stop at once.
    if state.get("extra_state"):
        state["extra_state"].pop("previous_training_time", None)
    # An exported student (fairseq-kd export, a shipped student.pt) keeps no data iterator,
    # which fairseq's --restore-file reads: the start of epoch 1, where --reset-dataloader
    # starts a training checkpoint's retraining too.
    if not (state.get("extra_state") or {}).get("train_iterator"):
        state["extra_state"] = {**(state.get("extra_state") or {}),
                                "train_iterator": {"epoch": 1, "iterations_in_epoch": 0}}
    state["cfg"] = state["cfg"] and plain_cfg(state["cfg"])
    return state, masks, weights


def save_pruned(state, masks, out, mask_out):
    """Write the pruned checkpoint to ``out`` (its folder created) and its masks to ``mask_out``."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(state, out)
    torch.save(masks, mask_out)


class MaskKeeper:
    """Keeps the masked weights of a model at exactly zero through training."""

    def __init__(self, masks):
        self.masks = masks
        self._hooked = set()

    @classmethod
    def load(cls, path):
        require(os.path.isfile(path), f"--prune-mask: file not found: {path}")
        try:
            masks = read_torch_file(path, what="mask file written by fairseq-kd prune")
        except KDError as e:  # torch's own errors on a non-torch file are pages long
            raise KDError(f"--prune-mask: {e}") from None
        require(isinstance(masks, dict) and all(torch.is_tensor(m) and m.dtype == torch.bool
                                                for m in masks.values()),
                f"--prune-mask: {path} is not a mask file written by fairseq-kd prune")
        return cls(masks)

    def _params(self, model):
        # the trainer hands over ModuleProxyWrapper(DDP(model)) under DDP: two levels
        params = dict(unwrap_model(model).named_parameters())
        missing = sorted(set(self.masks) - set(params))
        if missing:
            require(False, f"--prune-mask: the model has no parameter {missing[0]} "
                    f"({len(missing)} mask(s) do not match this architecture)")
        for name, mask in self.masks.items():
            require(params[name].shape == mask.shape,
                    f"--prune-mask: {name} has shape {tuple(params[name].shape)}, "
                    f"the mask {tuple(mask.shape)}")
        return params

    def attach(self, model):
        """Zero the masked weights' gradients from now on (idempotent)."""
        params = self._params(model)
        for name, mask in self.masks.items():
            p = params[name]
            if id(p) in self._hooked:
                continue
            self._hooked.add(id(p))
            # a hook on the parameter runs before the gradient is accumulated
            # (and before DDP's all-reduce of it); the model may move to a GPU later
            p.register_hook(lambda g, m=mask: g * m.to(device=g.device, dtype=g.dtype))

    def apply(self, model):
        params = self._params(model)
        with torch.no_grad():
            for name, mask in self.masks.items():
                params[name].mul_(mask.to(device=params[name].device, dtype=params[name].dtype))
