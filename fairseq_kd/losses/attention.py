"""Attention-map KD of ``a2d`` (Jin et al. 2024)."""
import torch

from fairseq_kd.losses.common import upcast


def attention_kl(teacher_maps, student_maps, query_mask, key_mask):
    """Attention-map KD (A2D): KL(teacher row || student row), masked and normalised.

    teacher_maps, student_maps: (B, C, Tq, Tk) attention probabilities, C
    heads each (the student's already aligned to the teacher's heads); every
    valid row is a distribution over the valid keys.  query_mask (B, Tq) and
    key_mask (B, Tk) are True at real (non-padding) tokens.

    Returns sum over valid query rows of the mean over the C heads of
    ``sum_k t log(t / s)`` over valid keys: sum-reduced over tokens like
    every other term (the trainer divides by ``sample_size``), so its weight
    does not depend on the batch size, and averaged over heads so ``beta``
    does not depend on the teacher's size.  Padded queries and keys
    contribute nothing, whatever the maps hold there (even NaN).  Maps are
    used as given (no second softmax); student zeros where the teacher has
    mass are clamped to the smallest positive float instead of giving inf.
    No gradient flows to the teacher.
    """
    if teacher_maps.shape != student_maps.shape:
        raise ValueError(f"teacher maps {tuple(teacher_maps.shape)} and student maps "
                         f"{tuple(student_maps.shape)} differ")
    t = upcast(teacher_maps.detach())
    s = upcast(student_maps)
    valid = (query_mask.bool()[:, None, :, None] & key_mask.bool()[:, None, None, :])
    t = torch.where(valid, t, torch.zeros((), dtype=t.dtype, device=t.device))
    s = torch.where(valid, s, torch.ones((), dtype=s.dtype, device=s.device))
    tiny = torch.finfo(s.dtype).tiny
    kl = torch.xlogy(t, t) - t * torch.log(s.clamp_min(tiny))
    return kl.sum() / teacher_maps.size(1)

