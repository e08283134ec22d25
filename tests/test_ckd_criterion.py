"""The ckd criterion in-process: hidden states, loss, projections, errors."""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils
from fairseq.logging import metrics
from fairseq.distributed import ModuleProxyWrapper

from fairseq_kd.errors import KDError
from fairseq_kd.capture import CaptureSpec, capture
from helpers import STUDENT_ARCH, build_training, first_batch
from test_word_kd_loss import brute_force_word_kd


def ckd_setup(tiny_data, teacher, *criterion_args, arch=STUDENT_ARCH):
    _, task, model, criterion = build_training(
        tiny_data / "bin", "--task", "translation_kd", "--teacher-path", teacher,
        *arch, "--criterion", "ckd", *criterion_args,
    )
    torch.manual_seed(0)
    model.eval()  # no dropout: plain and recorded forwards see the same network
    return task, model, criterion, first_batch(task)


def layer_hooks(model):
    return sum(len(layer._forward_hooks) for side in (model.encoder, model.decoder)
               for layer in side.layers)


def plain_states(model, net_input):
    """Every layer output of a plain forward pass, through fairseq's own return_all_hiddens."""
    enc = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"],
                        return_all_hiddens=True)
    logits, extra = model.decoder(net_input["prev_output_tokens"], encoder_out=enc)
    return enc["encoder_states"][1:], extra["inner_states"][1:], logits


class FakeDDP(torch.nn.Module):
    """Stands in for DistributedDataParallel: a .module and a forward."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_recorded_student_states_equal_a_plain_forward(tiny_data, tiny_teacher):
    task, model, ckd, sample = ckd_setup(tiny_data, tiny_teacher, "--ckd-side", "both")
    net_input = sample["net_input"]
    enc_states, dec_states, plain_logits = plain_states(model, net_input)
    assert layer_hooks(model) == 0  # nothing until the criterion runs
    # through a DDP-like wrapper, as fairseq's trainer calls the criterion
    wrapped = ModuleProxyWrapper(FakeDDP(model))
    with capture(wrapped, ckd.student_spec) as seen:
        logits = wrapped(**net_input)[0]
        assert layer_hooks(model) == 4
    assert layer_hooks(model) == 0
    assert torch.equal(logits, plain_logits)  # the hooks change nothing
    states = {side: seen.layer_states(side) for side in ("encoder", "decoder")}
    assert len(states["encoder"]) == len(enc_states) == 2
    assert len(states["decoder"]) == len(dec_states) == 2
    for got, want in zip(states["encoder"] + states["decoder"], enc_states + dec_states):
        assert torch.equal(got, want)
    assert torch.equal(seen.source_mask, net_input["src_tokens"].ne(task.source_dictionary.pad()))
    assert torch.equal(seen.target_mask, net_input["prev_output_tokens"].ne(task.target_dictionary.pad()))
    # hooks exist only while the criterion's forward runs
    ckd(wrapped, sample)
    ckd(wrapped, sample)
    assert layer_hooks(model) == 0


def test_teacher_states_are_the_checkpoint_teachers_layer_outputs(tiny_data, tiny_teacher):
    task, model, ckd, sample = ckd_setup(tiny_data, tiny_teacher)
    both = CaptureSpec(layers=("encoder", "decoder"))
    [out] = task.teacher.forward(sample["net_input"], like=model, capture=both)
    [teacher], _ = checkpoint_utils.load_model_ensemble([str(tiny_teacher)], task=task)
    teacher.eval()
    with torch.no_grad():
        enc_states, dec_states, _ = plain_states(teacher, sample["net_input"])
    got_enc, got_dec = out.layer_states("encoder"), out.layer_states("decoder")
    assert len(got_enc) == len(got_dec) == 4  # embedding output dropped
    for got, want in zip(got_enc + got_dec, enc_states + dec_states):
        assert torch.allclose(got, want, atol=1e-6)
    # states that were not asked for are a clear error, not an empty list
    [bare] = task.teacher.forward(sample["net_input"], like=model)
    with pytest.raises(KDError, match=r"no encoder layer states were captured"):
        bare.layer_states("encoder")


def brute_force_layer_term(student_states, teacher_states, groups, projections, mask):
    total = 0.0
    for h, group, proj in zip(student_states, groups, projections):
        s = proj(h)[mask]
        c = torch.cat([teacher_states[j] for j in group], -1)[mask]
        total += (2 - 2 * F.cosine_similarity(s, c, dim=-1)).sum().item()
    return total


def test_loss_matches_an_independent_computation(tiny_data, tiny_teacher):
    alpha, beta, T, eps = 0.3, 0.25, 2.0, 0.1
    task, model, ckd, sample = ckd_setup(
        tiny_data, tiny_teacher, "--ckd-side", "both", "--layer-map", "0,1|2,3",
        "--decoder-layer-map", "overlap", "--kd-alpha", alpha, "--ckd-beta", beta,
        "--kd-temperature", T, "--label-smoothing", eps)
    assert ckd.groups == {"encoder": [[0, 1], [2, 3]], "decoder": [[0, 1, 2], [2, 3]]}
    model.double()
    ckd.double()
    loss, sample_size, log = ckd(model, sample)

    [teacher], _ = checkpoint_utils.load_model_ensemble([str(tiny_teacher)], task=task)
    teacher.eval().double()
    net_input = sample["net_input"]
    with torch.no_grad():
        t_enc, t_dec, t_logits = plain_states(teacher, net_input)
        s_enc, s_dec, s_logits = plain_states(model, net_input)
        src_mask = net_input["src_tokens"].ne(task.src_dict.pad()).t()
        tgt_mask = sample["target"].ne(task.tgt_dict.pad()).t()
        layer_enc = brute_force_layer_term(s_enc, t_enc, ckd.groups["encoder"],
                                           ckd.projections["encoder"], src_mask)
        layer_dec = brute_force_layer_term(s_dec, t_dec, ckd.groups["decoder"],
                                           ckd.projections["decoder"], tgt_mask)
        layer = layer_enc + layer_dec
    ls, nll, kd = brute_force_word_kd(s_logits, t_logits, sample["target"], alpha=0.0, T=T, eps=eps)
    expected = (1 - alpha - beta) * ls + alpha * T * T * kd + beta * layer
    assert log["layer_loss"].item() == pytest.approx(layer, rel=1e-9)
    assert log["layer_loss_enc"].item() == pytest.approx(layer_enc, rel=1e-9)
    assert log["layer_loss_dec"].item() == pytest.approx(layer_dec, rel=1e-9)
    with metrics.aggregate(new_root=True) as agg:  # logged per sample_size, in bits
        ckd.reduce_metrics([log])
    logged = agg.get_smoothed_values()
    for key, value in (("layer_loss", layer), ("layer_loss_enc", layer_enc),
                       ("layer_loss_dec", layer_dec), ("word_loss", kd)):
        assert logged[key] == pytest.approx(value / sample_size / math.log(2), abs=1e-3), key
    assert log["word_loss"].item() == pytest.approx(kd, rel=1e-6)
    assert log["nll_loss"].item() == pytest.approx(nll, rel=1e-6)  # fairseq log-softmax is fp32
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert sample_size == sample["ntokens"]


def test_projections_are_trained_criterion_parameters(tiny_data, tiny_teacher):
    task, model, ckd, sample = ckd_setup(tiny_data, tiny_teacher, "--layer-map", "skip")
    # encoder only (the default): student 32 -> one 64-dim teacher layer each
    assert ckd.groups == {"encoder": [[1], [3]]}
    shapes = {k: tuple(v.shape) for k, v in ckd.state_dict().items()}
    assert shapes == {"projections.encoder.0.weight": (64, 32), "projections.encoder.0.bias": (64,),
                      "projections.encoder.1.weight": (64, 32), "projections.encoder.1.bias": (64,)}
    model.train()
    loss, _, _ = ckd(model, sample)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ckd.parameters())
    # the layer term reaches every student encoder layer
    assert all(p.grad.abs().sum() > 0 for p in model.encoder.layers[0].parameters())
    student_params = {id(p) for p in model.parameters()}
    assert not any(id(p) in student_params for p in ckd.parameters())
    assert not any(k.startswith("projections.") for k in model.state_dict())
    # the teacher is neither in the criterion nor in the student
    [t] = task.teachers
    assert not any(id(p) in student_params for p in t.parameters())
    assert {id(p) for p in ckd.parameters()}.isdisjoint(id(p) for p in t.parameters())


def test_only_ckd_with_a_layer_term_adds_hooks(tiny_data, tiny_teacher):
    _, task, model, word_kd = build_training(
        tiny_data / "bin", "--task", "translation_kd", "--teacher-path", tiny_teacher,
        *STUDENT_ARCH, "--criterion", "word_kd")
    sample = first_batch(task)
    word_kd(model, sample)
    assert layer_hooks(model) == 0
    task, model, ckd, sample = ckd_setup(tiny_data, tiny_teacher, "--ckd-beta", "0")
    _, _, log = ckd(model, sample)
    assert layer_hooks(model) == 0 and not list(ckd.parameters())
    assert log["layer_loss"].item() == 0


def test_beta_zero_with_an_ensemble_is_word_kd(tiny_data, tmp_path):
    """README: --ckd-beta 0 is word_kd, also with an ensemble (no hidden states are needed)."""
    from test_a2d_attention import save_random_teacher

    ensemble = ":".join(str(save_random_teacher(tiny_data, tmp_path / f"t{i}.pt", 2, 2, seed=i))
                        for i in (1, 2))
    args = ("--kd-alpha", "0.4", "--kd-temperature", "2", "--kd-topk", "5", "--label-smoothing", "0.1")
    task, model, ckd, sample = ckd_setup(tiny_data, ensemble, "--ckd-beta", "0", *args)
    _, word_task, _, word_kd = build_training(
        tiny_data / "bin", "--task", "translation_kd", "--teacher-path", ensemble, *STUDENT_ARCH,
        "--criterion", "word_kd", *args)
    model.double()
    loss, size, log = ckd(model, sample)
    w_loss, w_size, w_log = word_kd(model, sample)
    assert len(task.teachers) == 2 and size == w_size
    assert w_log["kd_loss"].item() > 0
    # ckd's NLL uses fairseq's log-softmax (float32), word_kd's fused loss the float64 logits
    assert loss.item() == pytest.approx(w_loss.item(), rel=1e-7)
    assert log["word_loss"].item() == pytest.approx(w_log["kd_loss"].item(), rel=1e-9)
    assert log["nll_loss"].item() == pytest.approx(w_log["nll_loss"].item(), rel=1e-7)
    assert log["layer_loss"].item() == 0


def test_ensemble_teacher_is_refused(tiny_data, tiny_teacher):
    with pytest.raises(KDError, match="ckd needs a single teacher: an ensemble of 2"):
        build_training(tiny_data / "bin", "--task", "translation_kd",
                       "--teacher-path", f"{tiny_teacher}:{tiny_teacher}", *STUDENT_ARCH,
                       "--criterion", "ckd")


@pytest.mark.parametrize("args,message", [
    (["--layer-map", "0|1|2"], "ckd encoder (4-layer teacher, 2-layer student): "
                               "--layer-map '0|1|2' has 3 groups but the student has 2 layers"),
    (["--encoder-layers", "6", "--layer-map", "cross"],
     "ckd encoder (4-layer teacher, 6-layer student): cannot build --layer-map cross for a "
     "4-layer teacher and a 6-layer student"),
    (["--ckd-side", "decoder", "--decoder-layer-map", "0,4|1"],
     "ckd decoder (4-layer teacher, 2-layer student): --layer-map '0,4|1' names teacher layers [4]"),
    (["--kd-alpha", "0.6", "--ckd-beta", "0.5"], "--kd-alpha + --ckd-beta must be <= 1"),
    (["--ckd-side", "both", "--decoder-layerdrop", "0.1"],
     "ckd needs the output of every student decoder layer: --decoder-layerdrop must be 0, got 0.1"),
])
def test_maps_that_cannot_be_built_are_clear_errors(tiny_data, tiny_teacher, args, message):
    with pytest.raises(KDError, match=re.escape(message)):
        build_training(tiny_data / "bin", "--task", "translation_kd",
                       "--teacher-path", tiny_teacher, *STUDENT_ARCH, "--criterion", "ckd", *args)
