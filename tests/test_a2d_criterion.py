"""The registered a2d criterion, in process, with a 6x4-head teacher and 3x4 / 2x2 students."""
import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_kd.errors import KDError
from helpers import build_training, first_batch
from test_a2d_attention import arch, save_random_teacher
from test_a2d_loss import brute_force_attention_kl

PAD = 1


@pytest.fixture(scope="module")
def teacher_6x4(tiny_data, tmp_path_factory):
    return save_random_teacher(tiny_data, tmp_path_factory.mktemp("a2d") / "t6x4.pt", 6, 4, seed=3)


def a2d_setup(tiny_data, teacher, student=(3, 4), *criterion_args, max_tokens=1000):
    torch.manual_seed(0)
    _, task, model, criterion = build_training(
        tiny_data / "bin", "--task", "translation_kd", "--teacher-path", teacher,
        *arch(*student), "--criterion", "a2d", *criterion_args,
    )
    model.eval()  # no dropout: compared computations see the same student outputs
    return task, model, criterion, first_batch(task, max_tokens=max_tokens)


@pytest.mark.parametrize("student", [(3, 4), (2, 2)])
def test_alignment_modules_are_sized_from_both_models_and_trained(tiny_data, teacher_6x4, student):
    task, model, criterion, sample = a2d_setup(tiny_data, teacher_6x4, student)
    layers, heads = student
    shapes = {t: tuple(aam.logits.shape) for t, aam in criterion.alignment.items()}
    assert shapes == {t: (6 * 4, layers * heads) for t in ("enc", "dec", "cross")}
    # owned by the criterion, never by the student
    assert not any(p is q for p in model.parameters() for q in criterion.parameters())
    assert set(criterion.state_dict()) == {f"alignment.{t}.logits" for t in ("enc", "dec", "cross")}
    loss, sample_size, log = criterion(model, sample)
    loss.backward()
    for t in ("enc", "dec", "cross"):
        assert log[f"attn_{t}"] > 0
        assert criterion.alignment[t].logits.grad.abs().sum() > 0
    assert model.encoder.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0
    assert model.decoder.layers[-1].encoder_attn.q_proj.weight.grad.abs().sum() > 0
    [teacher] = task.teachers
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert log["attn_loss"] == pytest.approx(sum(log[f"attn_{t}"] for t in ("enc", "dec", "cross")))


def fairseq_cross_heads(model, net_input, layer):
    """Per-head cross-attention of one layer, as fairseq itself returns it."""
    seen = {}
    hook = model.decoder.layers[layer].encoder_attn.register_forward_hook(
        lambda m, args, out: seen.update(heads=out[1]))
    with torch.no_grad():
        model(**net_input, alignment_layer=layer)
    hook.remove()
    return seen["heads"].transpose(0, 1)  # B x H x T x S


def test_loss_is_word_kd_plus_weighted_attention_kl(tiny_data, teacher_6x4):
    opts = ["--kd-alpha", "0.3", "--kd-temperature", "2", "--label-smoothing", "0.1"]
    task, model, criterion, sample = a2d_setup(
        tiny_data, teacher_6x4, (2, 2), *opts, "--attn-types", "cross",
        "--a2d-beta", "0.7", "--a2d-decay", "0.5", max_tokens=200)
    model.double()
    torch.manual_seed(5)
    with torch.no_grad():
        criterion.alignment["cross"].logits.normal_(0, 1.5)
    task.begin_epoch(3, model)  # the trainer's hook: weight 0.7 * 0.5^2
    loss, _, log = criterion(model, sample)
    assert log["attn_weight"] == pytest.approx(0.7 * 0.25)

    *_, word_kd = build_training(tiny_data / "bin", "--task", "translation_kd", "--teacher-path",
                                 teacher_6x4, *arch(2, 2), "--criterion", "word_kd", *opts)
    word_loss, _, _ = word_kd(model, sample)
    # independent attention term: fairseq's own per-head maps, explicit mixing and loops
    [teacher], _ = checkpoint_utils.load_model_ensemble([str(teacher_6x4)], task=task)
    teacher.eval().double()
    net_input = sample["net_input"]
    t_maps = torch.cat([fairseq_cross_heads(teacher, net_input, i) for i in range(6)], dim=1)
    s_maps = torch.cat([fairseq_cross_heads(model, net_input, i) for i in range(2)], dim=1)
    w = torch.softmax(criterion.alignment["cross"].logits.detach().double(), dim=-1)
    aligned = torch.stack([sum(w[t, s] * s_maps[:, s] for s in range(4)) for t in range(24)], dim=1)
    expected_attn = brute_force_attention_kl(
        t_maps, aligned, net_input["prev_output_tokens"].ne(PAD), net_input["src_tokens"].ne(PAD))
    assert log["attn_cross"].item() == pytest.approx(expected_attn, rel=1e-6)
    assert loss.item() == pytest.approx(word_loss.item() + 0.7 * 0.25 * expected_attn, rel=1e-8)


def test_validation_loss_of_an_unchanged_student_does_not_depend_on_the_epoch(tiny_data, teacher_6x4):
    """checkpoint_best.pt and --patience compare validation losses across epochs: fairseq's
    valid step (model and criterion in eval mode, task.valid_step) weighs the attention term
    with beta in every epoch, while training weighs it with beta * decay^(epoch-1)."""
    task, model, criterion, sample = a2d_setup(
        tiny_data, teacher_6x4, (2, 2), "--kd-alpha", "0.5", "--label-smoothing", "0.1",
        "--a2d-beta", "0.7", "--a2d-decay", "0.5", max_tokens=400)

    def valid_loss():
        criterion.eval()  # what fairseq's Trainer.valid_step does before task.valid_step
        loss, _, log = task.valid_step(sample, model, criterion)
        return loss, log

    def train_loss():
        criterion.train()  # the model stays in eval mode: no dropout, comparable outputs
        with torch.no_grad():
            return criterion(model, sample)[0]

    valid_1, log_1 = valid_loss()
    train_1 = train_loss()
    task.begin_epoch(5, model)
    valid_5, log_5 = valid_loss()
    train_5 = train_loss()
    assert torch.equal(valid_5, valid_1)
    assert log_1["attn_weight"] == log_5["attn_weight"] == 0.7
    # training still decays: epoch 5 drops (1 - 0.5^4) of epoch 1's attention term
    attn = log_1["attn_loss"].item()
    assert attn > 0
    assert train_1.item() == pytest.approx(valid_1.item(), rel=1e-6)
    assert train_5.item() == pytest.approx(train_1.item() - 0.7 * (1 - 0.5 ** 4) * attn, rel=1e-6)


def duplicated(sample):
    net = sample["net_input"]
    return {
        "id": torch.cat([sample["id"], sample["id"]]),
        "nsentences": 2 * sample["nsentences"], "ntokens": 2 * sample["ntokens"],
        "net_input": {k: torch.cat([v, v]) for k, v in net.items()},
        "target": torch.cat([sample["target"], sample["target"]]),
    }


def test_duplicating_the_batch_keeps_the_per_token_loss(tiny_data, teacher_6x4):
    _, model, criterion, sample = a2d_setup(tiny_data, teacher_6x4, (2, 2), max_tokens=400)
    with torch.no_grad():
        loss1, size1, log1 = criterion(model, sample)
        loss2, size2, log2 = criterion(model, duplicated(sample))
    assert size2 == 2 * size1
    assert (loss2 / size2).item() == pytest.approx((loss1 / size1).item(), rel=1e-5)
    for t in ("enc", "dec", "cross"):
        assert (log2[f"attn_{t}"] / size2).item() == pytest.approx((log1[f"attn_{t}"] / size1).item(), rel=1e-5)


def test_beta_zero_is_word_kd_without_capture(tiny_data, teacher_6x4):
    opts = ["--kd-alpha", "0.5", "--label-smoothing", "0.1"]
    _, model, a2d, sample = a2d_setup(tiny_data, teacher_6x4, (2, 2), *opts, "--a2d-beta", "0")
    *_, word_kd = build_training(tiny_data / "bin", "--task", "translation_kd", "--teacher-path",
                                 teacher_6x4, *arch(2, 2), "--criterion", "word_kd", *opts)
    assert list(a2d.parameters()) == []
    with torch.no_grad():
        assert torch.equal(a2d(model, sample)[0], word_kd(model, sample)[0])


def test_alignment_state_round_trips(tiny_data, teacher_6x4):
    _, model, criterion, sample = a2d_setup(tiny_data, teacher_6x4, (3, 4))
    with torch.no_grad():
        for aam in criterion.alignment.values():
            aam.logits.normal_()
        expected = criterion(model, sample)[0]
    *_, fresh = build_training(tiny_data / "bin", "--task", "translation_kd", "--teacher-path",
                               teacher_6x4, *arch(3, 4), "--criterion", "a2d")
    fresh.load_state_dict(criterion.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(model, sample)[0], expected)


@pytest.mark.parametrize("args,message", [
    (["--teacher-path", "{t}:{t}"], "a2d needs a single teacher"),
    (["--teacher-path", "{t}", "--attn-types", "enc,decoder"], "--attn-types must be"),
    (["--teacher-path", "{t}", "--a2d-decay", "1.5"], "--a2d-decay must be in [0, 1]"),
    (["--teacher-path", "{t}", "--a2d-beta", "-1"], "--a2d-beta must be >= 0"),
    # a skipped layer captures no map: refused when built, not at the first step
    (["--teacher-path", "{t}", "--encoder-layerdrop", "0.2"],
     "a2d needs the attention maps of every student encoder layer: "
     "--encoder-layerdrop must be 0, got 0.2"),
    (["--teacher-path", "{t}", "--attn-types", "cross", "--decoder-layerdrop", "0.1"],
     "a2d needs the attention maps of every student decoder layer: "
     "--decoder-layerdrop must be 0, got 0.1"),
])
def test_bad_configurations_are_kd_errors(tiny_data, teacher_6x4, args, message):
    args = [a.format(t=teacher_6x4) for a in args]
    with pytest.raises(KDError) as err:
        build_training(tiny_data / "bin", "--task", "translation_kd", *args, *arch(2, 2),
                       "--criterion", "a2d")
    assert message in str(err.value)


def test_beta_zero_with_an_ensemble_is_word_kd(tiny_data, tmp_path):
    """README: --a2d-beta 0 is word_kd, also with an ensemble (no attention is needed);
    accepted when built and at every step, like ckd --ckd-beta 0."""
    ensemble = ":".join(str(save_random_teacher(tiny_data, tmp_path / f"t{i}.pt", 2, 2, seed=i))
                        for i in (1, 2))
    opts = ["--kd-alpha", "0.4", "--kd-temperature", "2", "--kd-topk", "5", "--label-smoothing", "0.1"]
    task, model, a2d, sample = a2d_setup(tiny_data, ensemble, (2, 2), *opts, "--a2d-beta", "0")
    _, word_task, _, word_kd = build_training(
        tiny_data / "bin", "--task", "translation_kd", "--teacher-path", ensemble, *arch(2, 2),
        "--criterion", "word_kd", *opts)
    loss, size, log = a2d(model, sample)
    w_loss, w_size, w_log = word_kd(model, sample)
    assert len(task.teachers) == 2 and size == w_size
    assert w_log["kd_loss"].item() > 0
    assert torch.equal(loss, w_loss)
    assert torch.equal(log["kd_loss"], w_log["kd_loss"])
    assert "attn_loss" not in log
