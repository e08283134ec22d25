"""KD under torch DDP (what fairseq's pytorch_ddp backend uses), two gloo ranks on CPU.

fairseq's own launcher needs CUDA for several ranks, so the test wraps the
student (and a criterion with parameters) in DistributedDataParallel itself:
every rank loads its own teacher through the task, and the synchronised
gradients must equal single-process gradients over both ranks' batches.
"""
import torch
import torch.multiprocessing as mp

import helpers
from helpers import STUDENT_ARCH


def check_ddp_matches_single_process(build_args, tmp_path):
    port = helpers.free_port()
    mp.spawn(helpers.ddp_gradients, args=(2, port, build_args, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    reference = helpers.local_gradients(build_args, 2)
    assert set(ranks[0]) == set(reference)
    for name, grad in reference.items():
        assert torch.allclose(ranks[0][name], ranks[1][name], atol=1e-7), name
        assert torch.allclose(ranks[0][name], grad, rtol=1e-4, atol=1e-7), name
    return reference


def test_word_kd_under_ddp(tiny_data, tiny_teacher, tmp_path):
    build_args = (tiny_data / "bin", "--task", "translation_kd", "--teacher-path", tiny_teacher,
                  *STUDENT_ARCH, "--dropout", "0", "--criterion", "word_kd", "--kd-alpha", "0.5",
                  "--kd-temperature", "2")
    grads = check_ddp_matches_single_process(build_args, tmp_path)
    assert any(g.abs().sum() > 0 for g in grads.values())
