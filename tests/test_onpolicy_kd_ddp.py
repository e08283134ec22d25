"""onpolicy_kd under torch DDP (2 CPU processes over gloo).

Every rank takes the same on-policy decision for a micro-batch, samples its
own sentences with its own stream, and DDP's averaged gradient is the mean of
the ranks' gradients computed one after the other in a single process with
the same streams (the rank read by the criterion set by hand there).  Marked
slow: two processes each build a student and load the teacher (~30 s on 2 cores).
"""
import pytest
import torch

from fairseq_kd.criterions import onpolicy_kd
from helpers import STUDENT_ARCH, build_training, named_grads, spawn_gloo, split_batch, trainer_ddp_wrap

UPDATES = (6, 7, 8)  # updates done; the trainer seeds torch with --seed (1) + that
WORLD = 2


def build(data, teacher):
    torch.manual_seed(0)
    cfg, task, model, crit = build_training(
        data / "bin", "--task", "translation_kd", "--teacher-path", teacher, *STUDENT_ARCH,
        "--criterion", "onpolicy_kd", "--onpolicy-ratio", "0.5", "--jsd-beta", "0.5")
    _, parts = split_batch(task, WORLD)
    return cfg, task, model.train(), crit.train(), parts


def one_update(model, crit, sample, k):
    torch.manual_seed(1 + k)  # what fairseq's trainer does at the start of the update
    loss, _, log = crit(model, sample)
    loss.backward()
    return log["onpolicy_share"], log["gen_tokens"]


def rank_step(rank, world_size, data, teacher, out):
    _, _, model, crit, parts = build(data, teacher)
    ddp_model, ddp_crit = trainer_ddp_wrap(model, crit)
    results = []
    for k in UPDATES:
        model.zero_grad(set_to_none=True)
        logged = one_update(ddp_model, ddp_crit, parts[rank], k)
        results.append((*logged, named_grads(model, crit)))  # DDP-averaged
    torch.save(results, out / f"rank{rank}.pt")


@pytest.mark.slow
def test_ranks_share_decisions_sample_their_own_and_average_exactly(tiny_data, tiny_teacher, tmp_path,
                                                                    monkeypatch):
    spawn_gloo(rank_step, WORLD, tiny_data, tiny_teacher, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    cfg, task, model, crit, parts = build(tiny_data, tiny_teacher)
    # one criterion per simulated rank: each counts its own passes per update
    crits = [crit] + [task.build_criterion(cfg.criterion).train() for _ in range(WORLD - 1)]
    decisions = [torch.rand((), generator=onpolicy_kd.step_generators(1 + k, 0, 0, "cpu")[0]).item() < 0.5
                 for k in UPDATES]
    assert True in decisions and False in decisions
    for i, k in enumerate(UPDATES):
        model.zero_grad(set_to_none=True)
        for r in range(WORLD):
            monkeypatch.setattr(onpolicy_kd, "data_parallel_rank", lambda r=r: r)
            share, gen_tokens = one_update(model, crits[r], parts[r], k)
            assert ranks[r][i][:2] == (share, gen_tokens) and share == float(decisions[i])
        mean = {n: g / WORLD for n, g in named_grads(model, crit).items()}
        for r in range(WORLD):
            assert ranks[r][i][2].keys() == mean.keys()
            assert all(torch.allclose(ranks[r][i][2][n], g, rtol=1e-5, atol=1e-7) for n, g in mean.items())
