"""The online teacher's forward pass: one matrix product onto the vocabulary, frozen outside it."""
import torch

from fairseq_kd.teacher import Teacher


def teacher_and_batch(tiny_data, tiny_teacher):
    from fairseq_kd.teacher_cache_build import BuildSpec, data_task

    task = data_task(BuildSpec(data=str(tiny_data / "bin"), teacher_path=str(tiny_teacher), out="",
                               splits=["valid"]))
    task.load_dataset("valid", combine=True)
    dataset = task.dataset("valid")
    batch = dataset.collater([dataset[i] for i in range(8)])
    return Teacher([str(tiny_teacher)], task), batch, len(task.target_dictionary)


def test_teacher_projects_onto_the_vocabulary_in_one_matrix_product(tiny_data, tiny_teacher, one_thread):
    """fairseq's decoder hands the projection a transposed (non-contiguous) B x T x C tensor:
    with frozen weights PyTorch ran it as B batched products (``foldable_products``)."""
    from torch.profiler import ProfilerActivity, profile

    teacher, batch, vocab = teacher_and_batch(tiny_data, tiny_teacher)
    teacher.load()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        logits = teacher.forward(batch["net_input"])[0].logits
    projections = [e.name for e in prof.events() if e.name in ("aten::mm", "aten::bmm")
                   and any(vocab in shape for shape in e.input_shapes if isinstance(shape, list))]
    assert projections and set(projections) == {"aten::mm"}
    assert all(not p.requires_grad and p.grad is None for m in teacher.models for p in m.parameters())
    assert not logits.requires_grad
    # the same scores as the model's own forward pass (frozen, batched products)
    with torch.no_grad():
        reference, _ = teacher.models[0](**batch["net_input"])
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
