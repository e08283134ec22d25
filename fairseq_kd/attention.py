"""Per-head attention maps of fairseq transformers, and the learned alignment module.

Capture (:mod:`fairseq_kd.capture`, ``CaptureSpec(attention=...)``).
fairseq's ``MultiheadAttention`` is called with ``need_weights=False`` for encoder and decoder self-attention (a
fused kernel that never materialises the probabilities), and asking it for
per-head weights would switch it to another code path (other rounding, other
dropout random stream).  So the capture leaves every call exactly as it is:
a forward hook, registered only inside the capture's ``with`` block, reads the module's
inputs (query, key, masks) and recomputes the attention probabilities from
the module's own ``q_proj``/``k_proj``:

    softmax(q_proj(query) * scaling @ k_proj(key)^T + attn_mask, keys not padded)

which is the formula of fairseq's slow path, before attention dropout.  The
outputs of the model are therefore bit-for-bit unchanged, the recomputed maps
are differentiable with respect to the student's projections, and when no
capture is active no hook exists (zero cost when ``a2d`` is off).

Alignment (:class:`AttentionAlignment`).  Align-to-Distill's Attention
Alignment Module (Jin et al. 2024) is a pointwise (1x1) map
from the student's L_S*H_S head maps, stacked as channels, to the teacher's
L_T*H_T channels.  Our choice: each output channel is a convex combination of
the student's channels (mixing weights = softmax of learned logits over the
student channels).  A convex combination of probability rows is again a
probability row, so the aligned maps need no renormalisation (the public
implementation applies a second softmax over already-normalised maps), keep
exact zeros at padded and future keys, and the mixing weights read directly
as "which student heads feed this teacher head".
"""
import logging
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.modules.multihead_attention import MultiheadAttention

from fairseq_kd.errors import require
from fairseq_kd.hidden_states import unwrap_model

logger = logging.getLogger(__name__)

# Attention types: name -> (layer stack, attribute of each layer).
ATTENTION_TYPES = {
    "enc": ("encoder", "self_attn"),
    "dec": ("decoder", "self_attn"),
    "cross": ("decoder", "encoder_attn"),
}


def parse_attention_types(spec):
    """``"enc,cross"`` -> ``["enc", "cross"]`` (checked, in canonical order)."""
    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    unknown = sorted(set(names) - set(ATTENTION_TYPES))
    require(names and not unknown,
            f"--attn-types must be a comma-separated subset of {','.join(ATTENTION_TYPES)}, "
            f"got {spec!r}")
    return [t for t in ATTENTION_TYPES if t in names]


def attention_modules(model, attn_type) -> List[MultiheadAttention]:
    """The ``attn_type`` attention module of every layer, bottom layer first."""
    model = unwrap_model(model)
    stack, attr = ATTENTION_TYPES[attn_type]
    layers = getattr(getattr(model, stack, None), "layers", None)
    require(layers is not None and len(layers) > 0,
            f"a2d needs fairseq transformer models with {stack} layers; "
            f"{type(model).__name__} has none")
    modules = [getattr(layer, attr, None) for layer in layers]
    require(all(isinstance(m, MultiheadAttention) for m in modules),
            f"a2d: the {stack} layers of {type(model).__name__} have no fairseq "
            f"MultiheadAttention '{attr}' ({attn_type} attention)")
    for m in modules:
        require(m.bias_k is None and not m.add_zero_attn,
                "a2d does not support attention with --add-bias-kv or --add-zero-attn")
    return modules


def attention_layout(model, types) -> Dict[str, tuple]:
    """{type: (layers, heads)} of a built model."""
    layout = {}
    for t in types:
        modules = attention_modules(model, t)
        heads = {m.num_heads for m in modules}
        require(len(heads) == 1, f"a2d: layers with different head counts in {t} attention")
        layout[t] = (len(modules), heads.pop())
    return layout


def attention_layout_from_cfg(cfg, types) -> Dict[str, tuple]:
    """{type: (layers, heads)} from a transformer model config (the student's).

    The criterion must size its alignment module before the student's
    parameters are handed to the optimizer, from the config only.
    """
    def get(side, name):
        flat = getattr(cfg, f"{side}_{name}", None)
        if flat is None and getattr(cfg, side, None) is not None:
            flat = getattr(getattr(cfg, side), name, None)
        require(flat is not None, f"a2d: the student's model config has no {side} {name}")
        return int(flat)

    sides = {"enc": "encoder", "dec": "decoder", "cross": "decoder"}
    return {t: (get(sides[t], "layers"), get(sides[t], "attention_heads")) for t in types}


def attention_probs(module, query, key, key_padding_mask=None, attn_mask=None):
    """Per-head attention probabilities of ``module``: (B, H, T_query, T_key), float32+.

    ``query``/``key`` are Time x Batch x Channel as fairseq passes them;
    ``key_padding_mask`` (B, T_key) is True at padding; ``attn_mask`` is
    fairseq's additive (float, -inf = blocked) or boolean (True = blocked)
    (T_query, T_key) mask.  A query row with every key blocked (never the
    case for right-padded targets or any source) gets zeros instead of NaN.
    """
    if key is None:
        key = query
    tq, bsz, _ = query.shape
    tk = key.size(0)
    heads, dim = module.num_heads, module.head_dim
    q = (module.q_proj(query) * module.scaling).view(tq, bsz, heads, dim).permute(1, 2, 0, 3)
    k = module.k_proj(key).view(tk, bsz, heads, dim).permute(1, 2, 0, 3)
    scores = torch.matmul(q, k.transpose(-1, -2))
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask.bool()[:, None, None, :], float("-inf"))
    blocked = torch.isneginf(scores).all(-1, keepdim=True)
    probs = F.softmax(scores.masked_fill(blocked, 0.0), dim=-1)
    return probs.masked_fill(blocked, 0.0)


class AttentionAlignment(nn.Module):
    """Pointwise map from ``n_student`` head maps to ``n_teacher`` head maps.

    ``weights()`` is (n_teacher, n_student), each row a convex combination
    (softmax of the learned logits).  Initialised uniform: every teacher
    head starts as the mean of the student's heads.
    """

    def __init__(self, n_student, n_teacher):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_teacher, n_student))

    @property
    def n_student(self):
        return self.logits.size(1)

    def weights(self):
        return F.softmax(self.logits.float(), dim=-1)

    def forward(self, student_maps):
        """(B, n_student, Tq, Tk) -> (B, n_teacher, Tq, Tk)."""
        require(student_maps.size(1) == self.n_student,
                f"a2d: the alignment module expects {self.n_student} student head maps, "
                f"got {student_maps.size(1)} (student architecture changed?)")
        w = self.weights().to(student_maps.dtype)
        return torch.einsum("ts,bsqk->btqk", w, student_maps)


def head_name(channel, heads):
    return f"L{channel // heads}H{channel % heads}"


def describe_alignment(weights, student_heads, teacher_heads, top=2):
    """One line per teacher head: its ``top`` strongest student heads and weights.

    ``weights``: (n_teacher, n_student) mixing weights; heads: heads per layer.
    """
    lines = []
    values, index = weights.detach().float().cpu().topk(min(top, weights.size(1)), dim=-1)
    for t, (vals, idx) in enumerate(zip(values.tolist(), index.tolist())):
        feeds = ", ".join(f"{head_name(s, student_heads)} {v:.2f}" for v, s in zip(vals, idx))
        lines.append(f"teacher {head_name(t, teacher_heads)} <- {feeds}")
    return lines
