"""Magnitude pruning of a student (Kim & Rush 2016, section 6; See et al. 2016).

A weight tensor is pruned by zeroing its entries of smallest magnitude.
*Class-blind* pruning ranks all selected weights together (one global
threshold); *per-layer* pruning prunes each tensor to the ratio.  Exactly
``round(ratio * n)`` entries are pruned (ties broken by position), so the
measured sparsity is the requested one up to 1/n.

Selected tensors: the weights of linear layers (2-D ``*.weight`` tensors that
are not embeddings), optionally the embeddings too.  Tied tensors (shared
embeddings / output projection) are pruned once.

Retraining keeps the pruned weights at zero with :class:`MaskKeeper` (the
``--prune-mask`` option of ``translation_kd``): gradient hooks zero their
gradients, so they receive no update and no optimizer state (fresh Adam
moments stay 0, also for fp16 master weights, which get the masked
gradients), and the task multiplies the weights by the masks after every
optimizer step, which also covers optimizers that move weights without a
gradient (weight decay on a nonzero state, resumed momenta).
"""
import torch

from fairseq_kd.checkpoint import read_torch_file
from fairseq_kd.errors import KDError, require
from fairseq_kd.hidden_states import unwrap_model

EMBEDDING_KEYS = ("embed_tokens", "embed_positions", "output_projection")


def is_embedding(name):
    return any(k in name for k in EMBEDDING_KEYS)


def prunable_weights(state_dict, include_embeddings=False):
    """{name: tensor} of the weights to prune, one name per tied tensor."""
    selected, seen = {}, set()
    for name, w in state_dict.items():
        if not (name.endswith(".weight") and w.dim() == 2 and w.is_floating_point()):
            continue
        if is_embedding(name) and not include_embeddings:
            continue
        key = (w.data_ptr(), tuple(w.shape))
        if key in seen:  # tied to a tensor already selected
            continue
        seen.add(key)
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


def apply_masks(weights, masks):
    with torch.no_grad():
        for name, mask in masks.items():
            weights[name].mul_(mask.to(device=weights[name].device, dtype=weights[name].dtype))


def sparsity_report(weights):
    """[(name, numel, zeros)] per tensor, measured on the weights themselves."""
    rows = []
    for name, w in weights.items():
        rows.append((name, w.numel(), int((w == 0).sum())))
    return rows


class MaskKeeper:
    """Keeps the masked weights of a model at exactly zero through training."""

    def __init__(self, masks):
        self.masks = masks
        self._hooked = set()

    @classmethod
    def load(cls, path):
        import os

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
