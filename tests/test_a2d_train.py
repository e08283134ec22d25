"""a2d end to end: fairseq-train -> checkpoint (criterion entry) -> fairseq-generate -> resume."""
import re

import pytest
import torch

import helpers
from fairseq_kd.attention import describe_alignment
from helpers import STUDENT_ARCH, fairseq_train

TERMS = ("loss", "nll_loss", "kd_loss", "attn_loss", "attn_enc", "attn_dec", "attn_cross")
A2D_ARGS = ["--criterion", "a2d", "--kd-alpha", "0.5", "--label-smoothing", "0.1",
            "--a2d-beta", "1", "--a2d-decay", "0.9", "--a2d-log-alignment"]


def logged_epochs(log, kind="train"):
    """{epoch: {metric: value}} from fairseq's end-of-epoch lines of ``kind``, train or valid."""
    epochs = {}
    for line in log.splitlines():
        m = re.search(rf"\| {kind} \| epoch (\d+) \|(?: valid on '\w+' subset \|)? (.*)", line)
        if m:
            fields = (f.strip().rsplit(" ", 1) for f in m.group(2).split("|"))
            epochs[int(m.group(1))] = {k: float(v) for k, v in fields}
    return epochs


def alignment_lines(log, epoch):
    """The alignment lines logged by --a2d-log-alignment at the start of ``epoch``."""
    block = log.split(f"a2d alignment at the start of epoch {epoch}:")[1]
    return re.findall(r"a2d (?:enc|dec|cross): teacher .*", block.split("| train |")[0])


@pytest.fixture(scope="module")
def a2d_run(tiny_data, tiny_teacher, tmp_path_factory):
    save = tmp_path_factory.mktemp("a2d")
    proc = fairseq_train(tiny_data / "bin", save, *STUDENT_ARCH, "--task", "translation_kd",
                         "--teacher-path", tiny_teacher, *A2D_ARGS, "--max-epoch", "3",
                         "--no-epoch-checkpoints")
    return save, proc.stdout + proc.stderr


def test_training_lowers_every_term(a2d_run):
    _, log = a2d_run
    epochs = logged_epochs(log)
    assert sorted(epochs) == [1, 2, 3], log[-2000:]
    for term in TERMS:
        assert epochs[3][term] < epochs[1][term], (term, epochs)
    assert [epochs[e]["attn_weight"] for e in (1, 2, 3)] == pytest.approx([1.0, 0.9, 0.81])
    assert len(alignment_lines(log, 1)) == 3 * 16  # 4 layers x 4 teacher heads per type


def test_validation_weighs_attention_with_undecayed_beta(a2d_run):
    """fairseq's trainer validates with the criterion in eval mode: the attention term keeps
    beta in every epoch, so the validation loss that picks checkpoint_best.pt does not fall
    by 10% of that term per epoch by construction."""
    _, log = a2d_run
    valid, train = logged_epochs(log, "valid"), logged_epochs(log, "train")
    assert sorted(valid) == [1, 2, 3], log[-2000:]
    assert [valid[e]["attn_weight"] for e in (1, 2, 3)] == [1.0, 1.0, 1.0]
    assert [train[e]["attn_weight"] for e in (1, 2, 3)] == pytest.approx([1.0, 0.9, 0.81])


def test_alignment_module_lives_in_the_criterion_entry(a2d_run, tiny_teacher):
    save, _ = a2d_run
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert all(k.startswith(("encoder.", "decoder.")) for k in state["model"])
    shapes = {k: tuple(v.shape) for k, v in state["criterion"].items()}
    # teacher 4 layers x 4 heads, student 2 layers x 2 heads, for each attention type
    assert shapes == {f"alignment.{t}.logits": (16, 4) for t in ("enc", "dec", "cross")}
    assert all(v.abs().sum() > 0 for v in state["criterion"].values())  # trained from zeros
    # the optimizer covers the student and the alignment modules
    unique = {v.data_ptr(): v.numel() for k, v in state["model"].items()
              if not k.endswith(("version", "_float_tensor"))}  # shared embeddings count once
    opt_numel = sum(s["exp_avg"].numel() for s in state["last_optimizer_state"]["state"].values())
    assert opt_numel == sum(unique.values()) + 3 * 16 * 4


def test_generate_loads_the_student(a2d_run, tiny_data):
    save, _ = a2d_run
    helpers.assert_generate_loads_student(tiny_data, save / "checkpoint_best.pt")


def test_resume_restores_alignment_and_epoch_weight(a2d_run, tiny_data, tiny_teacher):
    save, _ = a2d_run
    saved = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    expected = [f"a2d {t}: {line}" for t in ("enc", "dec", "cross") for line in describe_alignment(
        torch.softmax(saved["criterion"][f"alignment.{t}.logits"].float(), -1), 2, 4)]
    proc = fairseq_train(tiny_data / "bin", save, *STUDENT_ARCH, "--task", "translation_kd",
                         "--teacher-path", tiny_teacher, *A2D_ARGS, "--max-epoch", "4",
                         "--no-epoch-checkpoints")
    log = proc.stdout + proc.stderr
    assert re.search(r"Loaded checkpoint \S*checkpoint_last.pt \(epoch 4 @ \d+ updates\)", log), log[-3000:]
    assert alignment_lines(log, 4) == expected  # logged before the first update of epoch 4
    epochs = logged_epochs(log)
    assert sorted(epochs) == [4]
    assert epochs[4]["attn_weight"] == pytest.approx(0.9 ** 3)


def test_ensemble_teacher_is_one_line_error(tiny_data, tiny_teacher, tmp_path):
    proc = fairseq_train(tiny_data / "bin", tmp_path, *STUDENT_ARCH, "--task", "translation_kd",
                         "--teacher-path", f"{tiny_teacher}:{tiny_teacher}", "--criterion", "a2d",
                         "--max-epoch", "1", check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("fairseq_kd: error:")]
    assert len(errors) == 1 and "a2d needs a single teacher" in errors[0], proc.stderr[-3000:]
