"""CKD layer term against an independent, loop-based computation."""
import math

import pytest
import torch

from fairseq_kd.losses import layer_kd_loss, normalized_mse

T_LEN, B, C_S, C_T, L_T = 5, 3, 4, 6, 4
GROUPS = [[0, 1], [1, 2, 3], [3]]  # 3 student layers, overlapping groups


def random_states(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(T_LEN, B, C_S, generator=g, dtype=torch.float64) for _ in GROUPS]
    teacher = [torch.randn(T_LEN, B, C_T, generator=g, dtype=torch.float64) * 5 for _ in range(L_T)]
    projections = [torch.nn.Linear(C_S, len(grp) * C_T).double() for grp in GROUPS]
    mask = torch.ones(T_LEN, B, dtype=torch.bool)  # T x B, like fairseq states
    mask[3:, 0] = False  # right padding
    mask[:2, 2] = False  # left padding (fairseq's default for the source)
    return student, teacher, projections, mask


def brute_force_layer_loss(student, teacher, projections, mask):
    """Token by token and layer by layer, with explicit norms and python sums."""
    total = 0.0
    for i, group in enumerate(GROUPS):
        W = projections[i].weight.tolist()
        bias = projections[i].bias.tolist()
        for t in range(T_LEN):
            for b in range(B):
                if not mask[t, b]:
                    continue
                h = student[i][t, b].tolist()
                s = [sum(W[r][c] * h[c] for c in range(C_S)) + bias[r] for r in range(len(W))]
                c = [v for j in group for v in teacher[j][t, b].tolist()]  # concatenation
                ns = math.sqrt(sum(v * v for v in s))
                nc = math.sqrt(sum(v * v for v in c))
                total += sum((a / ns - z / nc) ** 2 for a, z in zip(s, c))
    return total


def test_layer_loss_matches_brute_force():
    student, teacher, projections, mask = random_states()
    loss = layer_kd_loss(student, teacher, GROUPS, projections, mask)
    assert loss.item() == pytest.approx(brute_force_layer_loss(student, teacher, projections, mask),
                                        rel=1e-10)


def test_padding_contributes_nothing_and_gets_no_gradient():
    student, teacher, projections, mask = random_states()
    for s in student:
        s.requires_grad_(True)
    loss = layer_kd_loss(student, teacher, GROUPS, projections, mask)
    loss.backward()
    for s in student:
        assert torch.all(s.grad[~mask] == 0)
        assert torch.all(s.grad[mask].abs().sum(-1) > 0)
    # arbitrary values at padded positions, on either side, change nothing
    noisy_s = [s.detach().clone() for s in student]
    noisy_t = [t.clone() for t in teacher]
    for x in noisy_s + noisy_t:
        x[~mask] = torch.randn_like(x[~mask]) * 100
    again = layer_kd_loss(noisy_s, noisy_t, GROUPS, projections, mask)
    assert again.item() == pytest.approx(loss.item(), rel=1e-12)


def test_gradients_match_finite_differences():
    student, teacher, projections, mask = random_states(1)
    weights = [p.weight for p in projections]

    def f(*xs):
        s, w = xs[:len(GROUPS)], xs[len(GROUPS):]
        projs = [lambda h, W=W, p=p: torch.nn.functional.linear(h, W, p.bias)
                 for W, p in zip(w, projections)]
        return layer_kd_loss(list(s), teacher, GROUPS, projs, mask)

    inputs = [s.requires_grad_(True) for s in student] + weights
    assert torch.autograd.gradcheck(f, inputs)


def test_normalized_mse_is_scale_free_and_bounded():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    value = normalized_mse(s, t)
    assert normalized_mse(3 * s, 0.01 * t).item() == pytest.approx(value.item(), rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1)
    assert value.item() == pytest.approx((2 - 2 * cos).sum().item(), rel=1e-5)
    assert normalized_mse(s, s).item() == pytest.approx(0.0, abs=1e-5)
    assert normalized_mse(s, -s).item() == pytest.approx(4.0 * 7, rel=1e-5)
    # half precision is computed in float32
    assert normalized_mse(s.half(), t.half()).dtype == torch.float32


def test_mismatched_lengths_are_refused():
    student, teacher, projections, mask = random_states()
    with pytest.raises(ValueError, match="one of each per student layer"):
        layer_kd_loss(student[:2], teacher, GROUPS, projections, mask)
