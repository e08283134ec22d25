"""What each loss term is divided by (issue: sums over their own tokens, one divisor).

Every fairseq_kd term is a sum over its own tokens and the trainer divides the
total by sample_size (gold target tokens); terms over other tokens (hybrid's
L_sent over distilled tokens, ckd's encoder term and a2d's enc term over source
tokens) therefore weigh with length ratios. That is the documented choice: the
sums are checked here, and so is the documentation of the divisor.
"""
import dataclasses

import torch

from fairseq_kd.criterions.a2d import A2DConfig
from fairseq_kd.criterions.ckd import CKDConfig
from fairseq_kd.criterions.hybrid_kd import HybridKDConfig
from fairseq_kd.losses import attention_kl, hybrid_sentence_losses, layer_kd_loss

PAD = 1


def test_source_side_terms_are_sums_over_source_tokens():
    """Twice the (identical) source tokens: twice the term, not the same mean."""
    torch.manual_seed(0)
    t = torch.softmax(torch.randn(1, 2, 3, 3), -1)
    s = torch.softmax(torch.randn(1, 2, 3, 3), -1)
    ones = torch.ones(1, 3, dtype=torch.bool)
    once = attention_kl(t, s, ones, ones)
    # the same three query rows twice (keys unchanged)
    twice = attention_kl(torch.cat([t, t], 2), torch.cat([s, s], 2), torch.ones(1, 6, dtype=torch.bool), ones)
    assert torch.allclose(twice, 2 * once)
    h_s, h_t = torch.randn(3, 1, 4), torch.randn(3, 1, 5)
    proj = torch.nn.Linear(4, 5)
    one = layer_kd_loss([h_s], [h_t], [[0]], [proj], torch.ones(3, 1, dtype=torch.bool))
    two = layer_kd_loss([torch.cat([h_s, h_s])], [torch.cat([h_t, h_t])], [[0]], [proj],
                        torch.ones(6, 1, dtype=torch.bool))
    assert torch.allclose(two, 2 * one)


def test_hybrid_sentence_term_is_a_sum_over_distilled_tokens():
    """L_sent of a distilled target with its tokens repeated is the sum, token by token."""
    torch.manual_seed(0)
    V, B = 7, 1
    target = torch.tensor([[4, 5, 2]])
    hyp = torch.tensor([[4, 5, 6, 4, 5, 2]])
    logits = torch.randn(2 * B, 6, V, dtype=torch.float64)
    _, sent, _, _ = hybrid_sentence_losses(logits, target, hyp, None, PAD, 0.0, 1.0)
    lp = torch.log_softmax(logits[1], -1)
    assert torch.allclose(sent, -lp.gather(-1, hyp[0, :, None]).sum())


def test_divisor_is_documented_in_each_criterions_help():
    def help_of(config, name):
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(config)}[name]
    assert "distilled tokens" in help_of(HybridKDConfig, "gate")
    for config, name in ((HybridKDConfig, "gate"), (CKDConfig, "ckd_beta"), (A2DConfig, "a2d_beta")):
        text = help_of(config, name)
        assert "gold target tokens (sample_size)" in text or "gold token count (sample_size)" in text, name
    assert "source tokens" in help_of(CKDConfig, "ckd_beta")
    assert "source tokens for enc" in help_of(A2DConfig, "a2d_beta")
