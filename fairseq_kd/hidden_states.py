"""Per-layer hidden states of fairseq transformer encoders and decoders.

Which states (fairseq 0.12, ``models/transformer/transformer_{encoder,decoder}.py``):

* ``encoder_out["encoder_states"]`` (only with ``return_all_hiddens=True``)
  and the decoder's ``extra["inner_states"]`` (always) hold ``L + 1``
  tensors, T x B x C: the embedding output (after scaling, positions,
  dropout; padded source positions zeroed) and then the output of each of
  the ``L`` layers.  The final LayerNorm that pre-norm models apply after
  the last layer is *not* applied to them.
* fairseq_kd matches *layer outputs* only: layer ``j`` (0-based) is entry
  ``j + 1`` of those lists; the embedding output is never matched.

The teacher runs inside the task (``task.teacher_forward``), which returns
those lists.  The student runs through ``model(**net_input)`` (under DDP the
model is a wrapper whose forward does the gradient-sync bookkeeping, so the
criterion must not call ``model.encoder`` itself); its states are captured by
:class:`LayerOutputRecorder`, forward hooks on the unwrapped model's layers
that record the same tensors (layer outputs, T x B x C, in the autograd
graph).  Only a criterion that needs them registers hooks, so a model trained
with any other criterion runs exactly as in fairseq.
"""
from contextlib import contextmanager
from typing import List

import torch
from torch import nn

from fairseq_kd.errors import require

SIDES = ("encoder", "decoder")


def unwrap_model(model):
    """The fairseq model inside DDP / ModuleProxyWrapper / timeout wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def model_cfg_value(cfg, flat, nested, default=None):
    """A model option from a legacy (flat ``encoder_layers``) or dataclass
    (nested ``encoder.layers``) transformer config."""
    value = getattr(cfg, flat, None)
    if value is None:
        part, _, name = nested.partition(".")
        value = getattr(getattr(cfg, part, None), name, None)
    return default if value is None else value


def require_every_layer_runs(cfg, side, criterion, what):
    """Refuse LayerDrop on ``side`` of the student (``cfg``: its model config).

    A criterion that reads every layer (hidden states, attention maps) would
    find a skipped layer's entry empty at some step, and fail there with a
    message about the capture rather than the option.
    """
    layerdrop = model_cfg_value(cfg, f"{side}_layerdrop", f"{side}.layerdrop", 0.0)
    require(not layerdrop, f"{criterion} needs the {what} of every student {side} layer: "
            f"--{side}-layerdrop must be 0, got {layerdrop}")


def transformer_layers(model, side) -> List[nn.Module]:
    """The layers of ``side`` ('encoder' or 'decoder') of a fairseq transformer."""
    part = getattr(model, side, None)
    layers = getattr(part, "layers", None)
    require(isinstance(layers, nn.ModuleList),
            f"intermediate-layer KD needs a fairseq transformer-like model whose {side} has "
            f"a .layers list; got {type(model).__name__}")
    return list(layers)


def teacher_layer_states(output, side) -> List[torch.Tensor]:
    """Layer outputs (T x B x C each, embedding output dropped) of one teacher pass.

    ``output``: a ``TeacherOutput`` of ``task.teacher_forward(...,
    return_all_hiddens=True)``.
    """
    if side == "encoder":
        states = output.encoder_out.get("encoder_states") or []
        require(states, "the teacher's encoder returned no encoder_states: run "
                "task.teacher_forward with return_all_hiddens=True")
    else:
        states = output.extra.get("inner_states") or []
        require(states, "the teacher's decoder returned no inner_states")
    return list(states[1:])


class LayerOutputRecorder:
    """Records the outputs of some layers while :meth:`recording` is active.

    Hooks stay registered (so they are added once, not per batch) but only
    store outputs inside ``with recorder.recording() as states``; outside it
    (e.g. beam search during validation) a hook is a single flag test.  A
    plain object, not an ``nn.Module``, so the layers it references never
    become submodules (or state-dict entries) of whoever holds it.
    """

    def __init__(self, layers):
        self.layers = list(layers)
        self._states = None
        self._handles = [
            layer.register_forward_hook(self._make_hook(i)) for i, layer in enumerate(self.layers)
        ]

    def _make_hook(self, index):
        def hook(module, inputs, output):
            if self._states is not None:
                # encoder layers return x (or (x, fc_result)), decoder layers (x, attn, state)
                self._states[index] = output[0] if isinstance(output, tuple) else output
        return hook

    def owns(self, layers):
        return len(layers) == len(self.layers) and all(a is b for a, b in zip(layers, self.layers))

    @contextmanager
    def recording(self):
        """Yield a list filled, during the block, with one output per layer."""
        states = [None] * len(self.layers)
        self._states = states
        try:
            yield states
        finally:
            self._states = None

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
