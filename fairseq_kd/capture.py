"""One capture surface for student and teacher: what a forward pass produced inside.

A criterion that distils more than the output distribution needs internals
of a forward pass: per-layer hidden states (``ckd``), per-head attention
maps (``a2d``), the encoder's output (``hybrid_kd``'s sentence gate), the
padding masks of the tokens the pass saw.  Student and teacher are captured
the same way::

    spec = CaptureSpec(layers=("encoder",), attention=("cross",), masks=True)
    with capture(model, spec) as seen:          # the student, through DDP wrappers
        net_output = model(**net_input)
    seen.layer_states("encoder"), seen.stacked_attention("cross"), seen.source_mask

    [out] = task.teacher.forward(net_input, like=model, capture=spec)
    out.layer_states("encoder"), out.logits      # the teacher: the same Captured

Hooks are registered on the *unwrapped* model (so a DDP wrapper's forward,
and its gradient bookkeeping, still runs) only for what ``spec`` asks, only
inside the ``with`` block, and read without altering anything: the model's
outputs are bit-for-bit those of a plain forward, and a model run by a
criterion that captures nothing runs exactly as in fairseq.  Captured tensors
stay in the autograd graph (the student's gradients flow through them).

What is recorded (fairseq 0.12 transformers):

* layer states: the output of each encoder/decoder layer, T x B x C, before
  any final LayerNorm, the same tensors as fairseq's ``encoder_states`` /
  ``inner_states`` minus their first entry (the embedding output, which
  fairseq_kd never matches);
* attention maps: per-head probabilities (B, H, T_query, T_key) recomputed
  from each ``MultiheadAttention``'s inputs (:func:`fairseq_kd.attention.
  attention_probs`: fairseq's fused self-attention never materialises them);
* encoder output: the encoder's output dict;
* masks: True at real (non-padding) tokens of the source (B, S) and of the
  decoder input (B, T), from the tokens the encoder and decoder received;
* logits and decoder extras: set by :meth:`fairseq_kd.teacher.Teacher.forward`
  for the teacher (the student's are the criterion's own ``net_output``).
"""
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from fairseq.modules.multihead_attention import MultiheadAttention

from fairseq_kd.attention import ATTENTION_TYPES, attention_modules, attention_probs
from fairseq_kd.errors import require
from fairseq_kd.hidden_states import SIDES, transformer_layers, unwrap_model

_MHA_SIGNATURE = inspect.signature(MultiheadAttention.forward)


@dataclass(frozen=True)
class CaptureSpec:
    """What to record during one forward pass (nothing by default)."""

    layers: Tuple[str, ...] = ()  # sides whose layer outputs are recorded: encoder, decoder
    attention: Tuple[str, ...] = ()  # attention types: enc, dec, cross
    encoder_out: bool = False  # the encoder's output dict
    masks: bool = False  # source and decoder-input real-token masks

    def __post_init__(self):
        unknown = sorted(set(self.layers) - set(SIDES)) + sorted(set(self.attention) - set(ATTENTION_TYPES))
        require(not unknown, f"capture: unknown sides or attention types {unknown}")


NOTHING = CaptureSpec()


class Captured:
    """What one forward pass produced inside; filled during a :func:`capture` block."""

    def __init__(self, spec: CaptureSpec):
        self.spec = spec
        self.layers: Dict[str, List[Optional[torch.Tensor]]] = {}
        self.attention: Dict[str, List[Optional[torch.Tensor]]] = {}
        self.encoder_out: Optional[dict] = None
        self.source_mask: Optional[torch.Tensor] = None
        self.target_mask: Optional[torch.Tensor] = None
        self.logits: Optional[torch.Tensor] = None
        self.extra: Optional[dict] = None

    def layer_states(self, side) -> List[torch.Tensor]:
        """The output of every ``side`` layer, bottom first (T x B x C each)."""
        require(side in self.spec.layers, f"no {side} layer states were captured: ask for "
                f"them with CaptureSpec(layers=(..., '{side}'))")
        states = self.layers[side]
        missing = [i for i, s in enumerate(states) if s is None]
        require(not missing, f"{side} layers {missing} produced no output during the forward "
                "pass (LayerDrop or a custom forward?)")
        return states

    def stacked_attention(self, attn_type) -> torch.Tensor:
        """The maps of one attention type as channels: (B, layers*heads, T_query, T_key)."""
        maps = self.attention.get(attn_type) or []
        require(maps and all(m is not None for m in maps),
                f"a2d: no {attn_type} attention was captured (did the model run?)")
        return torch.cat(maps, dim=1)


def _layer_hook(states, index):
    def hook(module, args, output):
        # encoder layers return x (or (x, fc_result)), decoder layers (x, attn, state)
        states[index] = output[0] if isinstance(output, tuple) else output
    return hook


def _attention_hook(maps, attn_type, index):
    def hook(module, args, kwargs, output):
        call = _MHA_SIGNATURE.bind(module, *args, **kwargs).arguments
        require(call.get("incremental_state") is None,
                "a2d: attention capture needs full forward passes, not incremental decoding")
        require(maps[index] is None,
                f"a2d: {attn_type} attention of layer {index} ran twice in one capture")
        maps[index] = attention_probs(module, call["query"], call.get("key"),
                                      call.get("key_padding_mask"), call.get("attn_mask"))
    return hook


def _mask_hook(captured, attr, name):
    def hook(module, args, kwargs):
        # the tokens are the first argument of fairseq's encoder and decoder forwards
        tokens = args[0] if args else kwargs[name]
        setattr(captured, attr, tokens.ne(module.padding_idx))
    return hook


def _encoder_out_hook(captured):
    def hook(module, args, output):
        captured.encoder_out = output
    return hook


@contextmanager
def capture(model, spec: CaptureSpec = NOTHING):
    """Yield a :class:`Captured` that the forward pass run inside the block fills."""
    inner = unwrap_model(model)
    seen = Captured(spec)
    handles = []
    try:
        for side in spec.layers:
            layers = transformer_layers(inner, side)
            seen.layers[side] = states = [None] * len(layers)
            handles += [layer.register_forward_hook(_layer_hook(states, i)) for i, layer in enumerate(layers)]
        for t in spec.attention:
            modules = attention_modules(inner, t)
            seen.attention[t] = maps = [None] * len(modules)
            handles += [m.register_forward_hook(_attention_hook(maps, t, i), with_kwargs=True)
                        for i, m in enumerate(modules)]
        if spec.encoder_out:
            handles.append(inner.encoder.register_forward_hook(_encoder_out_hook(seen)))
        if spec.masks:
            handles.append(inner.encoder.register_forward_pre_hook(
                _mask_hook(seen, "source_mask", "src_tokens"), with_kwargs=True))
            handles.append(inner.decoder.register_forward_pre_hook(
                _mask_hook(seen, "target_mask", "prev_output_tokens"), with_kwargs=True))
        yield seen
    finally:
        for h in handles:
            h.remove()
