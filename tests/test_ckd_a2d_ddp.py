"""ckd and a2d under torch DDP (2 CPU processes over gloo) = one process on the whole batch.

Both criterions own trainable parameters (ckd's projections W_i, a2d's
attention alignment modules) and read the student through forward hooks
(layer outputs, attention maps).  Student and criterion are wrapped as
fairseq's Trainer wraps them (``helpers.trainer_ddp_wrap``: the criterion
too, since it has parameters); each rank trains on its own half of one batch
(own padding).  The trainer all-reduces the sample size and scales the
DDP-averaged gradients by world_size / sample_size, so after that scaling
every rank's gradients -- the student's and the criterion's own -- must equal
the single-process gradients on the whole batch divided by its sample size,
and the per-rank logged loss terms (computed from what the hooks captured)
must add up to the single-process ones.
"""
import pytest
import torch

import helpers
from helpers import STUDENT_ARCH

WORLD = 2
COUNTS = ("ntokens", "nsentences", "sample_size")


def check_split_batch_ddp(build_args, tmp_path, terms):
    """Run the step on WORLD ranks and on the whole batch; compare everything.

    ``terms``: the loss components the criterion must log (each > 0).
    Returns the single-process gradients (normalised by the sample size).
    """
    helpers.spawn_gloo(helpers.ddp_split_batch_step, WORLD, build_args, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    grads, log, sample_size = helpers.whole_batch_step(build_args, WORLD)

    # (c) what the hooks captured on each rank adds up to the whole batch
    assert all(0 < r["sample_size"] < sample_size for r in ranks)  # really split
    for key in COUNTS:
        assert sum(r["log"][key] for r in ranks) == log[key], key
    for key in ("loss", "nll_loss", *terms):
        whole = float(log[key])
        assert whole > 0, key
        assert sum(float(r["log"][key]) for r in ranks) == pytest.approx(whole, rel=1e-5), key

    # (a) student and (b) criterion gradients, as the trainer normalises them
    reference = {k: g / sample_size for k, g in grads.items()}
    scale = WORLD / sum(r["sample_size"] for r in ranks)
    synced = [{k: g * scale for k, g in r["grads"].items()} for r in ranks]
    top = torch.stack([g.norm() for g in reference.values()]).max()
    for r in synced:
        assert set(r) == set(reference)
    for name, g in reference.items():
        assert torch.equal(synced[0][name], synced[1][name]), name  # one all-reduce result
        err = (synced[0][name] - g).norm()
        assert err <= 1e-4 * g.norm() + 1e-6 * top, (name, err.item(), g.norm().item())
    return reference


def criterion_grads(grads):
    return {k[len("criterion."):]: g for k, g in grads.items() if k.startswith("criterion.")}


def ckd_args(tiny_data, tiny_teacher, *args):
    return (tiny_data / "bin", "--task", "translation_kd", "--teacher-path", tiny_teacher,
            *STUDENT_ARCH, "--dropout", "0", "--criterion", "ckd", "--kd-alpha", "0.3",
            "--ckd-beta", "0.5", *args)


@pytest.mark.parametrize("side, terms", [
    ("encoder", ("word_loss", "layer_loss")),
    ("both", ("word_loss", "layer_loss", "layer_loss_enc", "layer_loss_dec")),
])
def test_ckd_under_ddp(tiny_data, tiny_teacher, tmp_path, side, terms):
    grads = check_split_batch_ddp(ckd_args(tiny_data, tiny_teacher, "--ckd-side", side), tmp_path, terms)
    sides = ("encoder", "decoder") if side == "both" else (side,)
    own = criterion_grads(grads)  # one projection per student layer (2) and side
    assert set(own) == {f"projections.{s}.{i}.{w}" for s in sides for i in range(2)
                        for w in ("weight", "bias")}
    assert all(g.abs().sum() > 0 for g in own.values())


@pytest.mark.parametrize("types", ["enc,dec,cross", "cross"])
def test_a2d_under_ddp(tiny_data, tiny_teacher, tmp_path, types):
    names = types.split(",")
    build_args = (tiny_data / "bin", "--task", "translation_kd", "--teacher-path", tiny_teacher,
                  *STUDENT_ARCH, "--dropout", "0", "--criterion", "a2d", "--kd-alpha", "0.5",
                  "--attn-types", types, "--a2d-beta", "1")
    grads = check_split_batch_ddp(build_args, tmp_path,
                                  ("kd_loss", "attn_loss", *(f"attn_{t}" for t in names)))
    own = criterion_grads(grads)
    assert set(own) == {f"alignment.{t}.logits" for t in names}
    assert all(g.abs().sum() > 0 for g in own.values())
