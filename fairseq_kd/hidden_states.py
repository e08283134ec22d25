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

Student and teacher states are recorded the same way, by forward hooks on
the layers (:mod:`fairseq_kd.capture`, ``CaptureSpec(layers=...)``): the
student runs through ``model(**net_input)`` (under DDP the model is a wrapper
whose forward does the gradient-sync bookkeeping, so the criterion must not
call ``model.encoder`` itself), the teacher through
:meth:`fairseq_kd.teacher.Teacher.forward`.
"""
from typing import List

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
