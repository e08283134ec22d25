"""ckd end to end: fairseq-train -> checkpoint (criterion entry) -> restore -> fairseq-generate."""
import re

import pytest
import torch

import helpers
from helpers import STUDENT_ARCH, build_training, fairseq_train

CKD_ARGS = ["--task", "translation_kd", "--criterion", "ckd", "--kd-alpha", "0.3",
            "--ckd-beta", "0.3", "--kd-temperature", "2", "--label-smoothing", "0.1",
            "--ckd-side", "both", "--layer-map", "regular", "--decoder-layer-map", "overlap"]
TERMS = ("loss", "nll_loss", "word_loss", "layer_loss")


def epoch_terms(log):
    """{epoch: {term: value}} from fairseq's end-of-epoch train lines."""
    out = {}
    for line in log.splitlines():
        m = re.search(r"\| train \| epoch (\d+) \| (.*)", line)
        if m:
            pairs = dict(re.findall(r"(\w+) ([-\d.e]+)", m.group(2)))
            out[int(m.group(1))] = {k: float(pairs[k]) for k in TERMS if k in pairs}
    return out


@pytest.fixture(scope="module")
def ckd_run(tiny_data, tiny_teacher, tmp_path_factory):
    save = tmp_path_factory.mktemp("ckd")
    proc = fairseq_train(tiny_data / "bin", save, *STUDENT_ARCH, "--teacher-path", tiny_teacher,
                         *CKD_ARGS, "--max-epoch", "3", "--no-epoch-checkpoints")
    return save, proc.stdout + proc.stderr


def test_training_lowers_every_term(ckd_run):
    _, log = ckd_run
    terms = epoch_terms(log)
    assert sorted(terms) == [1, 2, 3], log[-2000:]
    assert all(set(terms[e]) == set(TERMS) for e in terms), terms
    for name in TERMS:
        assert terms[3][name] < terms[1][name], (name, terms)


def test_checkpoint_keeps_projections_in_the_criterion_entry(ckd_run):
    save, _ = ckd_run
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert all(k.startswith(("encoder.", "decoder.")) for k in state["model"])
    assert not any("projections" in k for k in state["model"])
    # 2 encoder groups of 2 teacher layers; decoder overlap {0,1,2} {2,3}; teacher dim 64
    shapes = {k: tuple(v.shape) for k, v in state["criterion"].items()}
    assert shapes == {
        "projections.encoder.0.weight": (128, 32), "projections.encoder.0.bias": (128,),
        "projections.encoder.1.weight": (128, 32), "projections.encoder.1.bias": (128,),
        "projections.decoder.0.weight": (192, 32), "projections.decoder.0.bias": (192,),
        "projections.decoder.1.weight": (128, 32), "projections.decoder.1.bias": (128,),
    }
    # the optimizer trained student and projections (and nothing of the teacher)
    unique = {v.data_ptr(): v.numel() for k, v in state["model"].items()
              if not k.endswith(("version", "_float_tensor"))}
    n_criterion = sum(v.numel() for v in state["criterion"].values())
    opt_numel = sum(s["exp_avg"].numel() for s in state["last_optimizer_state"]["state"].values())
    assert opt_numel == sum(unique.values()) + n_criterion


def test_resume_restores_the_projections(ckd_run, tiny_data, tiny_teacher):
    """fairseq's own resume path: Trainer.load_checkpoint into a freshly built criterion."""
    from fairseq.trainer import Trainer

    save, _ = ckd_run
    saved = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    cfg, task, model, criterion = build_training(
        tiny_data / "bin", *STUDENT_ARCH, "--teacher-path", tiny_teacher, *CKD_ARGS,
        "--optimizer", "adam", "--lr", "0.002", "--lr-scheduler", "inverse_sqrt")
    fresh = {k: v.clone() for k, v in criterion.state_dict().items()}
    assert not torch.equal(fresh["projections.encoder.0.weight"],
                           saved["criterion"]["projections.encoder.0.weight"])
    trainer = Trainer(cfg, task, model, criterion)
    extra = trainer.load_checkpoint(str(save / "checkpoint_last.pt"))
    assert extra["train_iterator"]["epoch"] == 4  # the next epoch to run, after 3 done
    restored = trainer.get_criterion().state_dict()
    assert set(restored) == set(saved["criterion"])
    assert all(torch.equal(restored[k], saved["criterion"][k]) for k in restored)


def test_generate_loads_the_plain_student(ckd_run, tiny_data):
    save, _ = ckd_run
    helpers.assert_generate_loads_student(tiny_data, save / "checkpoint_best.pt")


def test_unbuildable_map_is_one_line_error(tiny_data, tiny_teacher, tmp_path):
    proc = fairseq_train(tiny_data / "bin", tmp_path, *STUDENT_ARCH, "--teacher-path", tiny_teacher,
                         "--task", "translation_kd", "--criterion", "ckd",
                         "--layer-map", "0|1|2", "--max-epoch", "1", check=False)
    assert "has 3 groups but the student has 2 layers (teacher 4)" in helpers.one_line_error(proc)
