"""The registered word_kd criterion against fairseq's own criterion and a plain teacher."""
import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_kd.errors import KDError
from helpers import STUDENT_ARCH, build_training, first_batch
from test_word_kd_loss import brute_force_word_kd


def kd_setup(tiny_data, teacher, *criterion_args):
    _, task, model, criterion = build_training(
        tiny_data / "bin", "--task", "translation_kd", "--teacher-path", teacher,
        *STUDENT_ARCH, *criterion_args,
    )
    torch.manual_seed(0)
    model.eval()  # no dropout: both criteria see the same student outputs
    return task, model, criterion, first_batch(task)


def test_alpha_zero_is_label_smoothed_cross_entropy(tiny_data, tiny_teacher):
    task, model, word_kd, sample = kd_setup(
        tiny_data, tiny_teacher, "--criterion", "word_kd", "--kd-alpha", "0", "--label-smoothing", "0.1")
    *_, ls_ce = build_training(
        tiny_data / "bin", "--task", "translation", *STUDENT_ARCH,
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1")
    loss_kd, size_kd, log_kd = word_kd(model, sample)
    loss_ce, size_ce, log_ce = ls_ce(model, sample)
    assert torch.equal(loss_kd, loss_ce)
    assert torch.equal(log_kd["nll_loss"], log_ce["nll_loss"])
    assert size_kd == size_ce
    assert not task.teacher.loaded  # alpha = 0 never loads the teacher


def test_criterion_uses_the_checkpoint_teacher(tiny_data, tiny_teacher):
    task, model, word_kd, sample = kd_setup(
        tiny_data, tiny_teacher, "--criterion", "word_kd", "--kd-alpha", "0.4",
        "--kd-temperature", "2", "--kd-topk", "5", "--label-smoothing", "0.1")
    loss, _, log = word_kd(model.double(), sample)
    # an independent load of the teacher with fairseq's own loader
    [teacher], _ = checkpoint_utils.load_model_ensemble([str(tiny_teacher)], task=task)
    teacher.eval().double()
    with torch.no_grad():
        t_logits = teacher(**sample["net_input"])[0]
        s_logits = model(**sample["net_input"])[0]
    exp_loss, exp_nll, exp_kd = brute_force_word_kd(
        s_logits, t_logits, sample["target"], alpha=0.4, T=2.0, eps=0.1, topk=5)
    assert loss.item() == pytest.approx(exp_loss, rel=1e-6)
    assert log["kd_loss"].item() == pytest.approx(exp_kd, rel=1e-6)
    # the teacher followed the student to float64 and stayed frozen and in eval mode
    [t] = task.teachers
    assert next(t.parameters()).dtype == torch.float64
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    assert not any(p is q for p in t.parameters() for q in word_kd.parameters())


def test_ensemble_teacher_averages_member_probabilities(tiny_data, tiny_teacher, tmp_path):
    # a second, different teacher: the first with perturbed weights
    state = torch.load(tiny_teacher, map_location="cpu", weights_only=False)
    g = torch.Generator().manual_seed(0)
    state["model"] = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    other = tmp_path / "other.pt"
    torch.save(state, other)
    task, model, _, sample = kd_setup(
        tiny_data, f"{tiny_teacher}:{other}", "--criterion", "word_kd", "--kd-alpha", "0.5")
    dist = task.teacher.distribution(sample, like=model)
    members = []
    for path in (tiny_teacher, other):
        [t], _ = checkpoint_utils.load_model_ensemble([str(path)], task=task)
        with torch.no_grad():
            members.append(t.eval()(**sample["net_input"])[0].softmax(-1))
    expected = torch.stack(members).mean(0).reshape(dist.scores.shape)
    assert len(task.teachers) == 2
    assert not torch.allclose(members[0], members[1], atol=1e-3)
    assert torch.allclose(dist.scores.softmax(-1), expected, atol=1e-6)


@pytest.mark.parametrize("criterion", [
    ["--criterion", "word_kd"],
    ["--criterion", "seq_kd", "--word-kd-alpha", "0.5"],
    ["--criterion", "ckd"],
    ["--criterion", "a2d"],
    ["--criterion", "hybrid_kd", "--distilled-data", None],  # the gold data as a stand-in
])
def test_topk_larger_than_the_vocabulary_fails_at_build(tiny_data, tiny_teacher, criterion):
    criterion = [str(tiny_data / "bin") if a is None else a for a in criterion]
    with pytest.raises(KDError, match=r"--kd-topk 5000 is larger than the target vocabulary \(\d+ entries\)"):
        kd_setup(tiny_data, tiny_teacher, *criterion, "--kd-topk", "5000")


def test_topk_equal_to_the_vocabulary_is_the_full_distribution(tiny_data, tiny_teacher):
    task, model, full, sample = kd_setup(tiny_data, tiny_teacher, "--criterion", "word_kd")
    vocab = len(task.target_dictionary)
    _, _, all_k, _ = kd_setup(tiny_data, tiny_teacher, "--criterion", "word_kd", "--kd-topk", vocab)
    assert all_k(model, sample)[2]["kd_loss"].item() == pytest.approx(
        full(model, sample)[2]["kd_loss"].item(), rel=1e-5)


def test_teacher_is_loaded_when_the_criterion_is_built(tiny_data, tiny_teacher):
    *_, word_kd = build_training(tiny_data / "bin", "--task", "translation_kd", "--teacher-path",
                                 tiny_teacher, *STUDENT_ARCH, "--criterion", "word_kd")
    assert word_kd.task.teacher.loaded  # checked before fairseq-train's first step


def test_bad_prune_mask_is_one_line_error(tiny_data, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a mask\n")
    with pytest.raises(KDError, match=r"^--prune-mask: \S+junk.pt is not a mask file written by "
                                      r"fairseq-kd prune \(torch cannot read it: \w+\)$"):
        build_training(tiny_data / "bin", "--task", "translation_kd", "--prune-mask", junk,
                       *STUDENT_ARCH, "--criterion", "label_smoothed_cross_entropy")


def test_adaptive_softmax_student_is_refused_by_kd_criterions(tiny_data, tiny_teacher):
    """Its decoder returns hidden states, not the vocabulary logits the KD losses read."""
    adaptive = ["--adaptive-softmax-cutoff", "10", "--criterion"]
    with pytest.raises(KDError, match=r"--criterion word_kd does not support students with an "
                                      r"adaptive softmax"):
        build_training(tiny_data / "bin", "--task", "translation_kd", "--teacher-path", tiny_teacher,
                       *STUDENT_ARCH, *adaptive, "word_kd")
    # fairseq's own criterion for it is still accepted by the task
    build_training(tiny_data / "bin", "--task", "translation_kd", "--ddp-backend", "legacy_ddp", *STUDENT_ARCH,
                   *adaptive, "adaptive_loss")


def test_batches_are_filtered_by_a_teacher_with_fewer_positions(tiny_data, tmp_path):
    """A teacher with learned positions for 40 tokens and a student for 1024: the
    training batches fairseq's trainer builds keep exactly the sentences both accept,
    so the teacher never sees a sentence it cannot embed."""
    from fairseq import utils

    from test_a2d_attention import save_random_teacher

    short = save_random_teacher(tiny_data, tmp_path / "short.pt", 2, 2, 0, 32,
                                "--encoder-learned-pos", "--decoder-learned-pos",
                                "--max-source-positions", "40", "--max-target-positions", "40")
    cfg, task, model, word_kd = build_training(
        tiny_data / "bin", "--task", "translation_kd", "--teacher-path", short, *STUDENT_ARCH,
        "--criterion", "word_kd", "--max-tokens", "2000")
    assert model.max_positions() == (1024, 1024) and task.max_positions() == (40, 40)
    task.load_dataset("train")
    ds = task.dataset("train")
    # as fairseq's Trainer.get_train_iterator
    max_positions = utils.resolve_max_positions(task.max_positions(), model.max_positions(),
                                                cfg.dataset.max_tokens)
    itr = task.get_batch_iterator(dataset=ds, max_tokens=2000, max_positions=max_positions,
                                  ignore_invalid_inputs=True, seed=1)
    kept = sorted(int(i) for batch in itr.frozen_batches for i in batch)
    fits = [i for i in range(len(ds)) if ds.src_sizes[i] <= 40 and ds.tgt_sizes[i] <= 40]
    assert kept == fits and 0 < len(fits) < len(ds)
    # the sentences left out really are too long for the teacher ...
    too_long = ds.collater([ds[next(i for i in range(len(ds)) if ds.src_sizes[i] > 40)]])
    with pytest.raises((IndexError, RuntimeError)):
        task.teacher.forward(too_long["net_input"])
    # ... and the longest batch kept trains
    longest = max(itr.frozen_batches, key=lambda b: max(ds.src_sizes[i] for i in b))
    loss, _, log = word_kd(model, ds.collater([ds[int(i)] for i in longest]))
    assert torch.isfinite(loss) and log["kd_loss"] > 0


def test_student_limits_stand_while_the_teacher_is_not_loaded(tiny_data, tiny_teacher):
    """fairseq-generate --task translation_kd builds no criterion: the teacher is never
    loaded and the task's limits are the student's options."""
    _, task, _, _ = build_training(tiny_data / "bin", "--task", "translation_kd", "--teacher-path",
                                   tiny_teacher, *STUDENT_ARCH, "--max-source-positions", "50",
                                   "--criterion", "label_smoothed_cross_entropy")
    assert task.max_positions() == (50, 1024) and not task.teacher.loaded
