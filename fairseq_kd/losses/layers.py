"""Intermediate-layer KD of ``ckd`` (Wu et al. 2020; PKD: Sun et al. 2019)."""
import torch
import torch.nn.functional as F

from fairseq_kd.losses.common import upcast

# Floor of the L2 norm in the normalisation: a zero vector stays zero instead
# of becoming NaN (fairseq zeroes padded embeddings; padding is masked anyway).
NORM_EPS = 1e-6


def normalized_mse(student, teacher, eps=NORM_EPS):
    """sum over rows of ``|| s/|s| - t/|t| ||^2`` (PKD's normalised MSE).

    student, teacher: (N, C) rows already restricted to real tokens.  Each
    row contributes ``2 - 2 cos(s, t)``, in [0, 4], so the term does not
    depend on the (very different) scales of teacher and student states.
    """
    s = F.normalize(upcast(student), dim=-1, eps=eps)
    t = F.normalize(upcast(teacher).to(s.dtype), dim=-1, eps=eps)
    return (s - t).pow(2).sum()


def combine_teacher_layers(teacher_states, group):
    """Concatenate the teacher layers of a group on the hidden dimension."""
    return torch.cat([teacher_states[j] for j in group], dim=-1)


def layer_kd_loss(student_states, teacher_states, groups, projections, mask):
    """CKD layer term: ``sum_i normalized_mse(W_i h_S^i, concat_{j in G_i} h_T^j)``.

    student_states: one (..., C_S) tensor per student layer; teacher_states:
    one (..., C_T) tensor per teacher layer (same leading shape, e.g. the
    T x B of fairseq); groups: teacher layer indices per student layer;
    projections: callables mapping C_S to ``len(G_i) * C_T``; mask: bool,
    the leading shape, True on real tokens.  Padding positions are dropped
    before the projection, so they contribute nothing and get no gradient.
    The teacher is detached.
    """
    if len(student_states) != len(groups) or len(projections) != len(groups):
        raise ValueError(f"{len(student_states)} student states, {len(groups)} groups, "
                         f"{len(projections)} projections: need one of each per student layer")
    total = None
    for h_s, group, project in zip(student_states, groups, projections):
        target = combine_teacher_layers(teacher_states, group).detach()
        term = normalized_mse(project(h_s[mask]), target[mask])
        total = term if total is None else total + term
    return total

