"""hybrid_kd's gate statistics and validation (issue #20).

* the complexity statistics weigh every sentence equally, whatever the size
  of its length-bucketed batch;
* the complexity offsets wait for --gate-complexity-warmup sentences, so the
  first updates' gates are not saturated by a one-bucket spread;
* validation scores the student with a fixed mixture, whatever the gate's state;
* the scalar gate's reference is the first update's value: what that does on
  terms with different floors, and how far the recipe's schedule lets it move.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig
from fairseq.optim.lr_scheduler.inverse_square_root_schedule import (
    InverseSquareRootLRScheduleConfig,
    InverseSquareRootSchedule,
)

import fairseq_kd.criterions.hybrid_kd as hybrid_module
from fairseq_kd.losses import gate_objective
from helpers import first_batch
from test_hybrid_kd_criterion import distilled_dir, frozen_setup, hybrid_setup, train_gate_only  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WARMUP = 2000  # --gate-complexity-warmup's documented default, in sentences


def bible_like_lengths(n, seed=0):
    """Source lengths shaped like the Bible study's (mean about 32, sd about 13 tokens)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.gamma(6.0, 32.0 / 6.0, n)), 3, 200)


def length_bucketed(lengths, max_tokens, seed=1):
    """Batches as fairseq forms them: sorted by length, filled up to max_tokens (padded), shuffled."""
    batches, current = [], []
    for length in np.sort(lengths):
        if current and (len(current) + 1) * length > max_tokens:
            batches.append(torch.tensor(current, dtype=torch.float64))
            current = []
        current.append(length)
    batches.append(torch.tensor(current, dtype=torch.float64))
    order = np.random.default_rng(seed).permutation(len(batches))
    return [batches[i] for i in order]


def update_log(complexity):
    """The logging output of an update whose sentences have these complexities."""
    n = complexity.numel()
    return {"ntokens": 10 * n, "hyp_ntokens": 10 * n, "tok_loss": 20.0 * n, "sent_loss": 30.0 * n,
            "gate_n": n, "complexity_sum": complexity.sum(), "complexity_sqsum": (complexity ** 2).sum()}


def length_gate(tiny_data, teacher, distilled, *args):
    _, _, hybrid = hybrid_setup(tiny_data, teacher, distilled, "--gate", "complexity",
                                "--gate-complexity", "source_length", *args)
    return hybrid


# -- 1. per-sentence statistics ------------------------------------------------------------

@pytest.mark.parametrize("decay", [1 - 1e-9, 0.9])
def test_complexity_statistics_weigh_every_sentence_equally(tiny_data, tiny_teacher, distilled_dir,
                                                            decay):
    """Length-bucketed updates of unequal sentence counts: the running mean and std are those of
    the sentences, each weighted decay^(updates since), not of the per-update means.  Decay ~1
    within a short run: exactly the pooled per-sentence mean and std."""
    hybrid = length_gate(tiny_data, tiny_teacher, distilled_dir, "--gate-scale-decay", repr(decay))
    batches = length_bucketed(bible_like_lengths(3000), max_tokens=4096)[:12]
    assert len({b.numel() for b in batches}) > 5  # short sentences come many to a batch
    for batch in batches:
        hybrid.on_update([update_log(batch)])

    ages = range(len(batches) - 1, -1, -1)
    weights = torch.cat([torch.full_like(b, decay ** age) for b, age in zip(batches, ages)])
    c = torch.cat(batches)
    mean = (weights * c).sum() / weights.sum()
    std = ((weights * (c - mean) ** 2).sum() / weights.sum()).sqrt()
    stats = hybrid.gate_stats()
    assert stats["complexity_mean"] == pytest.approx(mean.item(), rel=1e-5)
    assert stats["complexity_std"] == pytest.approx(std.item(), rel=1e-4)
    if decay > 0.99:  # the pooled statistics, which per-update means would miss by tokens
        assert mean.item() == pytest.approx(c.mean().item(), rel=1e-6)
        per_update = torch.stack([b.mean() for b in batches])
        assert abs(per_update.mean() - c.mean()) > 1.0


# -- 2. an honest start -------------------------------------------------------------------

def test_complexity_offsets_wait_for_warmup_then_are_not_saturated(tiny_data, tiny_teacher,
                                                                   distilled_dir):
    """With the defaults, every offset is 0 (the gate at its level) until 2000 sentences have been
    seen; the first standardized complexities after that are O(1), not the |z| ~ 26 of statistics
    from one length bucket (std ~ 0 after the first update)."""
    hybrid = length_gate(tiny_data, tiny_teacher, distilled_dir)
    hybrid.scale_updates.fill_(1)  # loss references set: only the complexity warm-up holds
    batches = length_bucketed(bible_like_lengths(20000), max_tokens=4096)[:60]
    seen, after = 0, []
    for batch in batches:
        c = batch.float()
        z = hybrid.complexity_z(c)
        offsets = hybrid.gate_logits(None, c, c.numel(), c.device) - hybrid.gate.level()
        if seen < DEFAULT_WARMUP:
            assert torch.equal(offsets, torch.zeros_like(c)), seen
        else:
            after.append(z.abs().mean().item())
        hybrid.on_update([update_log(batch)])
        seen += batch.numel()
    assert len(after) >= 20
    # a true standardization has E|z| ~ 0.8; a length-bucketed batch sits off-centre, up to ~2.5
    assert sum(after[:10]) / 10 < 1.5, after[:10]
    assert max(after) < 3.5, after


def test_a_checkpoint_with_per_update_statistics_restarts_them(tiny_data, tiny_teacher, distilled_dir):
    """The old [mean, mean of squares] cannot be turned into per-sentence sums: everything else
    is restored, the complexity statistics start again with their warm-up."""
    hybrid = length_gate(tiny_data, tiny_teacher, distilled_dir)
    old = {"gate.weight": torch.tensor(0.4), "loss_scales": torch.tensor([1.5, 3.5]),
           "scale_updates": torch.tensor(7), "complexity_stats": torch.tensor([30.0, 1000.0])}
    hybrid.load_state_dict(old)  # strict, as fairseq's trainer loads the criterion
    assert hybrid.gate.weight.item() == pytest.approx(0.4)
    assert hybrid.loss_scales.tolist() == [1.5, 3.5] and int(hybrid.scale_updates) == 7
    assert not hybrid.complexity_stats.any() and int(hybrid.complexity_seen) == 0
    assert not hybrid.complexity_z(torch.tensor([5.0, 50.0])).any()


# -- 3. validation measures the student only ------------------------------------------------

def change_gate_state(hybrid):
    """Move everything a learned gate has learned or measured, as training would."""
    with torch.no_grad():
        for p in hybrid.gate.parameters():
            p.add_(torch.linspace(0.5, 1.5, p.numel()).view_as(p))
    for scale, c in ((1.0, torch.tensor([1.0, 2.0, 9.0])), (3.0, torch.tensor([4.0, 40.0]))):
        log = update_log(c)
        log["sent_loss"] *= scale
        hybrid.on_update([log])


@pytest.mark.parametrize("gate", ["scalar", "complexity", "relative_loss"])
def test_validation_loss_ignores_the_learned_gate_state(tiny_data, tiny_teacher, distilled_dir, gate):
    """An unchanged student scores the same validation loss after the gate level, the loss
    references and the complexity statistics moved: the mixture there is g = --gate-prior."""
    task, model, hybrid = hybrid_setup(tiny_data, tiny_teacher, distilled_dir, "--gate", gate,
                                       "--gate-prior", "0.3")
    _, _, fixed = hybrid_setup(tiny_data, tiny_teacher, distilled_dir, "--gate", "fixed",
                               "--gate-value", "0.3")
    model.eval()
    # the valid split has no distilled targets (gold stands for y_hat); a training batch has them
    valid, train = first_batch(task, "valid"), first_batch(task, "train", max_tokens=500)
    samples = [valid, train]
    hybrid.on_update([update_log(torch.tensor([3.0, 5.0, 11.0]))])  # some state to start from

    def losses(criterion, batches=samples):
        with torch.no_grad():
            return [criterion(model, s)[0] for s in batches]

    hybrid.train()
    trained_before = losses(hybrid, [train])
    hybrid.eval()
    before = losses(hybrid)
    change_gate_state(hybrid)
    after = losses(hybrid)
    for b, a in zip(before, after):
        assert torch.equal(b, a)
    fixed.eval()
    for b, f in zip(before, losses(fixed)):
        assert b.item() == pytest.approx(f.item(), rel=1e-6)
    with torch.no_grad():
        log = hybrid(model, samples[0])[2]
    assert log["gate_sum"].item() == pytest.approx(0.3 * log["gate_n"])
    # in training the gate's state does matter (the change above was a real one)
    hybrid.train()
    assert not torch.equal(trained_before[0], losses(hybrid, [train])[0])


# -- 5. the scalar gate's reference: the first update -----------------------------------------

def test_scalar_gate_favours_the_term_with_the_lower_floor(tiny_data, tiny_teacher, distilled_dir,
                                                           monkeypatch):
    """Both terms start at the same per-token value and shed their reducible part equally fast;
    the token-level KL can reach 0, the sentence-level NLL only 60% of its start.  Dividing by
    the first-update values does not remove that: r_tok -> 0, r_sent -> 0.6, and the gate moves
    toward token-level KD (the term with the lower floor) up to its bound."""
    task, model, hybrid = frozen_setup(tiny_data, tiny_teacher, distilled_dir, "--gate", "scalar")
    sample = first_batch(task, "train", max_tokens=500)
    real = hybrid_module.hybrid_sentence_losses
    calls = []

    def floors(*a, **k):  # the student is frozen: the losses are made to fall
        tok, sent, nll, kd = real(*a, **k)
        left = math.exp(-len(calls) / 4)  # the reducible part still left
        calls.append(1)
        per_tok = (tok.sum() / sample["ntokens"]) / (sent.sum() / sample["distilled"]["ntokens"])
        sent_start = sent * per_tok  # the same per-token value as tok at the start
        return tok * left, sent_start * (0.6 + 0.4 * left), nll, kd
    monkeypatch.setattr(hybrid_module, "hybrid_sentence_losses", floors)
    trajectory, _ = train_gate_only(task, model, hybrid, sample, steps=40)
    tok_ref, sent_ref = hybrid.loss_scales.tolist()
    assert tok_ref == pytest.approx(sent_ref, rel=1e-5)  # one per-token value at the first update
    bound = 1 / (1 + math.exp(-1.0))  # --gate-level-range 1 around logit(0.5)
    assert abs(trajectory[0].item() - 0.5) < 1e-6
    assert 0.7 < trajectory[-1].item() < bound  # J's optimum, logit (0.6 - 0) / 0.5 = 1.2, is past it
    assert (trajectory[1:] >= trajectory[:-1] - 1e-6).all()


def recipe_level_move(updates, lr, warmup, betas, weight_decay):
    """(w, sum of the learning rates) after ``updates`` updates of fairseq's Adam and inverse_sqrt
    schedule on the level's weight w, the gate objective always pulling it the same way.

    Adam's step is at most about lr when 1 - beta1 <= sqrt(1 - beta2) (Kingma & Ba 2015, 2.1),
    so w can move at most the sum of the learning rates; a constant-sign pull comes close.
    """
    hybrid_gate = hybrid_module.LevelGate(0.0, 1.0)
    optimizer = FairseqAdam(FairseqAdamConfig(lr=[lr], adam_betas=str(betas), weight_decay=weight_decay),
                            list(hybrid_gate.parameters()))
    schedule = InverseSquareRootSchedule(
        InverseSquareRootLRScheduleConfig(warmup_updates=warmup, lr=[lr]), optimizer)
    lr_sum = 0.0
    for update in range(1, updates + 1):
        lr_sum += optimizer.get_lr()
        optimizer.zero_grad()
        # r_sent - r_tok = 2, lambda 0.5: the optimum (4 logits) lies past the range all along
        j = gate_objective(hybrid_gate(torch.zeros(1)), torch.zeros(1), torch.full((1,), 2.0), 0.5, 0.5)
        j.sum().backward()
        optimizer.step()
        schedule.step_update(update)
    return hybrid_gate.weight.item(), lr_sum


def test_the_page_states_how_far_the_recipe_lets_the_level_move():
    """The Bible recipe (recipes/common/settings.sh: Adam (0.9, 0.98), lr 1e-3, inverse_sqrt with
    1,000 warm-up updates, weight decay 1e-4, 1,600 updates): w moves at most the sum of the
    learning rates, 1.03, the level range * tanh(w) at most 0.77 logits (range 1), so a scalar gate
    stays within [0.32, 0.68] around the prior 0.5; docs/hybrid_kd.md says so."""
    settings = (ROOT / "recipes" / "common" / "settings.sh").read_text(encoding="utf-8")
    for option in ("--adam-betas (0.9,0.98)", "--lr 1e-3", "--lr-scheduler inverse_sqrt",
                   "--warmup-updates 1000", "--weight-decay 0.0001", "--max-update 1600"):
        assert option in settings, f"the recipe changed ({option}): recompute the page's bound"
    w, lr_sum = recipe_level_move(1600, 1e-3, 1000, (0.9, 0.98), 1e-4)
    # lr_step * n in warm-up, then 1e-3 * sqrt(1000 / n)
    assert lr_sum == pytest.approx(1e-3 * (sum(n / 1000 for n in range(1000))
                                           + sum(math.sqrt(1000 / n) for n in range(1000, 1600))))
    assert 0.9 * lr_sum < w <= lr_sum  # a constant pull moves w by about the bound
    level = math.tanh(lr_sum)
    gate = 1 / (1 + math.exp(-level))
    page = (ROOT / "docs" / "hybrid_kd.md").read_text(encoding="utf-8")
    for stated in (f"{lr_sum:.2f}", f"{level:.2f}", f"{gate:.2f}", f"{1 - gate:.2f}"):
        assert stated in page, stated
