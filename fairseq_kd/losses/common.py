"""Numerics shared by the loss families."""
import torch


def upcast(x):
    """fp16/bf16 -> fp32 for softmax maths; fp32/fp64 kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
