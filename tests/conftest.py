"""Session fixtures: one tiny binarized Bible slice, one tiny trained teacher, and one thread for tiny models."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end checks left out of the default run")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Folder with raw/ (text), pieces/ (spm.model, *.sp.*) and bin/ (fairseq data)."""
    return helpers.prepare_tiny_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_teacher(tiny_data, tmp_path_factory):
    """A 4+4-layer, 64-dim teacher trained for a few epochs; returns its checkpoint."""
    save = tmp_path_factory.mktemp("teacher")
    helpers.fairseq_train(
        tiny_data / "bin", save, *helpers.TEACHER_ARCH,
        "--task", "translation", "--criterion", "label_smoothed_cross_entropy",
        "--label-smoothing", "0.1", "--max-epoch", "6", "--no-epoch-checkpoints",
    )
    return save / "checkpoint_best.pt"


@pytest.fixture(scope="session")
def tiny_distilled(tiny_data, tiny_teacher, tmp_path_factory):
    """The teacher's translations of tiny_data's training split, binarized: (folder, hypotheses)."""
    hyps = helpers.teacher_translations(tiny_data, tiny_teacher)
    dest = tmp_path_factory.mktemp("distilled")
    return helpers.make_distilled_data(tiny_data, dest, helpers.gold_sources(tiny_data), hyps), hyps


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, most of all on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
