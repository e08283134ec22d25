"""KD under torch DDP (what fairseq's pytorch_ddp backend uses), two gloo ranks on CPU.

fairseq's own launcher needs CUDA for several ranks, so the test wraps the
student (and a criterion with parameters) in DistributedDataParallel itself:
every rank loads its own teacher through the task, and the synchronised
gradients must equal single-process gradients over both ranks' batches.
"""
import torch

import helpers
from helpers import STUDENT_ARCH


def check_ddp_matches_single_process(build_args, tmp_path):
    helpers.spawn_gloo(helpers.ddp_gradients, 2, build_args, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    reference = helpers.local_gradients(build_args, 2)
    assert set(ranks[0]) == set(reference)
    largest = max(float(g.abs().max()) for g in reference.values())
    for name, grad in reference.items():
        assert torch.allclose(ranks[0][name], ranks[1][name], atol=1e-7), name
        # float32 sums in another order (the all-reduce's (g0 + g1) / 2 against g0 / 2 + g1 / 2, and
        # kernels chosen by each process's threads): an element left near 0 by cancellation differs
        # at the rounding of the tensor's largest terms, so the absolute tolerance follows its scale,
        # with a floor at float32 rounding of the model's largest gradient for gradients that are 0
        # but for rounding (attention key biases: 2e-7 apart here on 2026-12-07, where the floor was
        # 1e-7, with a largest gradient of 62)
        atol = 1e-7 * largest + 1e-6 * float(grad.abs().max())
        assert torch.allclose(ranks[0][name], grad, rtol=1e-4, atol=atol), name
    return reference


def test_word_kd_under_ddp(tiny_data, tiny_teacher, tmp_path):
    build_args = (tiny_data / "bin", "--task", "translation_kd", "--teacher-path", tiny_teacher,
                  *STUDENT_ARCH, "--dropout", "0", "--criterion", "word_kd", "--kd-alpha", "0.5",
                  "--kd-temperature", "2")
    grads = check_ddp_matches_single_process(build_args, tmp_path)
    assert any(g.abs().sum() > 0 for g in grads.values())


def prune_step(rank, world_size, data_bin, mask_path, out_dir):
    """One gloo rank of a --prune-mask update: forward/backward through fairseq's DDP
    wrappers, then the task's optimizer_step with the wrapped model, as the trainer calls it."""
    torch.manual_seed(0)
    _, task, model, criterion = helpers.build_training(
        data_bin, "--task", "translation_kd", "--prune-mask", mask_path, *STUDENT_ARCH,
        "--dropout", "0", "--criterion", "label_smoothed_cross_entropy")
    wrapped = helpers.fairseq_ddp_wrap(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss, _, _ = criterion(wrapped, helpers.batches(task, world_size)[rank])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    task.optimizer_step(optimizer, wrapped, 1)
    torch.save({"grads": grads, "weights": model.state_dict()}, f"{out_dir}/rank{rank}.pt")


def test_prune_mask_under_ddp(tiny_data, tmp_path):
    """--prune-mask with the model as fairseq's trainer holds it under DDP
    (ModuleProxyWrapper(DistributedDataParallel(model))): masked gradients are zero
    after the all-reduce and masked weights are exactly zero after the update."""
    from fairseq_kd.pruning import prunable_weights

    torch.manual_seed(0)
    _, _, model, _ = helpers.build_training(tiny_data / "bin", "--task", "translation_kd",
                                            *STUDENT_ARCH, "--dropout", "0")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # a random half of each selected tensor, on weights that are *not* zero yet:
    # only the task's masking after the step can make them exactly zero
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(w.shape, generator=gen) < 0.5 for n, w in prunable_weights(before).items()}
    assert all(before[n][~m].abs().min() > 0 for n, m in masks.items())
    torch.save(masks, tmp_path / "mask.pt")

    helpers.spawn_gloo(prune_step, 2, str(tiny_data / "bin"), str(tmp_path / "mask.pt"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, mask in masks.items():
        for r in ranks:
            assert torch.all(r["grads"][name][~mask] == 0), name
            assert torch.all(r["weights"][name][~mask] == 0), name
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
        assert not torch.equal(ranks[0]["weights"][name][mask], before[name][mask]), name
