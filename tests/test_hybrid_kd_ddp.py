"""hybrid_kd under torch DDP (2 CPU processes over gloo) = one process on the union batch.

Student and criterion are wrapped as fairseq's ``pytorch_ddp`` backend wraps
them (DistributedDataParallel + ModuleProxyWrapper, no unused-parameter
search, no buffer broadcast).  One training step per rank; DDP averages the
gradients, so twice the averaged gradient must equal the single-process
gradient of the summed loss, for the student and the gate alike; the gate's
loss scales, updated from the summed logging outputs, must agree too.
"""
import torch
import torch.distributed as dist

from helpers import STUDENT_ARCH, build_training, fairseq_ddp_wrap, named_grads, spawn_gloo

RANK_IDS = [list(range(0, 7)), list(range(7, 16))]  # uneven on purpose


def build(data, teacher, distilled):
    torch.manual_seed(0)
    _, task, model, criterion = build_training(
        data / "bin", "--task", "translation_kd", "--teacher-path", teacher,
        "--distilled-data", distilled, *STUDENT_ARCH, "--dropout", "0",
        "--criterion", "hybrid_kd", "--gate", "relative_loss", "--kd-temperature", "2")
    model.double().train()
    criterion.double().train()
    torch.manual_seed(1)
    torch.nn.init.normal_(criterion.gate.proj.weight, std=0.5)  # per-sentence gates differ
    criterion.loss_scales.copy_(torch.tensor([1.3, 3.1]))  # as after some updates
    criterion.scale_updates.fill_(5)
    task.load_dataset("train")
    return task, model, criterion


def batch(task, ids):
    ds = task.dataset("train")
    return ds.collater([ds[i] for i in ids])


def step(rank, world_size, data, teacher, distilled, result_path):
    """One gloo rank (:func:`helpers.spawn_gloo`): a step on its share of the union batch."""
    task, model, criterion = build(data, teacher, distilled)
    ddp_model, ddp_criterion = fairseq_ddp_wrap(model), fairseq_ddp_wrap(criterion)
    loss, _, log = ddp_criterion(ddp_model, batch(task, RANK_IDS[rank]))
    loss.backward()  # DDP all-reduces (averages) the gradients here
    grads = {k: world_size * v for k, v in named_grads(model, criterion).items()}
    # the trainer sums logging outputs over ranks, then translation_kd updates the scales
    summed = {k: torch.as_tensor(v, dtype=torch.float64).clone() for k, v in log.items()}
    for v in summed.values():
        dist.all_reduce(v)
    task.reduce_metrics([summed], criterion)
    if rank == 0:
        torch.save({"grads": grads, "scales": criterion.loss_scales.clone(), "loss": summed["loss"]},
                   result_path)


def test_ddp_gradients_match_single_process_on_union(tiny_data, tiny_teacher, tiny_distilled, tmp_path):
    distilled = tiny_distilled[0]
    result = tmp_path / "ddp.pt"
    spawn_gloo(step, len(RANK_IDS), tiny_data, tiny_teacher, distilled, result)
    ddp = torch.load(result, weights_only=False)

    task, model, criterion = build(tiny_data, tiny_teacher, distilled)
    loss, _, log = criterion(model, batch(task, RANK_IDS[0] + RANK_IDS[1]))
    loss.backward()
    single = named_grads(model, criterion)
    assert loss.item() == ddp["loss"].item() or abs(loss.item() - ddp["loss"].item()) < 1e-6 * loss.item()
    scale = torch.stack([g.norm() for g in single.values()]).max()
    assert set(single) == set(ddp["grads"])
    for name, g in single.items():  # float32 log-probs and gates: compare at that precision
        assert (g - ddp["grads"][name]).norm() <= 1e-6 * scale, name
    for name in ("criterion.gate.proj.weight", "criterion.gate.proj.bias"):
        g = single[name]
        assert g.norm() > 0 and (g - ddp["grads"][name]).norm() <= 1e-5 * g.norm(), name
    task.reduce_metrics([log], criterion)
    assert torch.allclose(criterion.loss_scales, ddp["scales"], rtol=1e-6)
