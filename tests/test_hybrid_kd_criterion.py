"""The hybrid_kd criterion in-process, against word_kd, label_smoothed_cross_entropy and
independent per-sentence computations."""
import math

import pytest
import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils
from fairseq.logging import metrics

import fairseq_kd.criterions.hybrid_kd as hybrid_module
from fairseq_kd.errors import KDError
from helpers import STUDENT_ARCH, build_training, first_batch

PAD = 1


def hybrid_setup(tiny_data, teacher, distilled, *criterion_args, task="translation_kd"):
    torch.manual_seed(0)  # every setup builds the same student
    _, task, model, criterion = build_training(
        tiny_data / "bin", "--task", task, "--teacher-path", teacher, "--distilled-data", distilled,
        *STUDENT_ARCH, "--dropout", "0", "--criterion", "hybrid_kd", *criterion_args)
    return task, model, criterion


def other_criterion(tiny_data, teacher, *args):
    *_, criterion = build_training(tiny_data / "bin", "--task", "translation_kd", "--teacher-path",
                                   teacher, *STUDENT_ARCH, *args)
    return criterion


def distilled_as_gold(sample):
    """The same sources with the teacher's translations as targets (a seq-KD batch)."""
    d = sample["distilled"]
    net_input = dict(sample["net_input"], prev_output_tokens=d["prev_output_tokens"])
    return {"net_input": net_input, "target": d["target"], "ntokens": d["ntokens"],
            "nsentences": sample["nsentences"], "id": sample["id"]}


@pytest.fixture(scope="module")
def distilled_dir(tiny_distilled):
    return tiny_distilled[0]


def test_fixed_gate_is_exactly_word_kd_seq_kd_and_their_mix(tiny_data, tiny_teacher, distilled_dir):
    ls = ("--label-smoothing", "0.1")
    task, model, hybrid = hybrid_setup(tiny_data, tiny_teacher, distilled_dir, "--gate", "fixed",
                                       "--gate-value", "1", "--kd-temperature", "2", *ls)
    model.double().eval()
    sample = first_batch(task, "train")
    assert sample["distilled"]["target"].size(0) == sample["target"].size(0)
    word = other_criterion(tiny_data, tiny_teacher, "--criterion", "word_kd", "--kd-alpha", "1",
                           "--kd-temperature", "2", *ls)
    seq = other_criterion(tiny_data, tiny_teacher, "--criterion", "label_smoothed_cross_entropy", *ls)
    word_loss, word_size, word_log = word(model, sample)
    seq_loss, _, _ = seq(model, distilled_as_gold(sample))

    loss, size, log = hybrid(model, sample)
    assert size == word_size
    assert loss.item() == pytest.approx(word_loss.item(), rel=1e-6)
    assert log["nll_loss"].item() == pytest.approx(word_log["nll_loss"].item(), rel=1e-6)
    assert log["sent_loss"].item() == pytest.approx(seq_loss.item(), rel=1e-6)
    for g in (0.0, 0.3, 0.75):
        hybrid.gate_value = g
        loss, _, log = hybrid(model, sample)
        assert loss.item() == pytest.approx(g * word_loss.item() + (1 - g) * seq_loss.item(), rel=1e-6)
        assert log["gate_sum"].item() == pytest.approx(g * sample["nsentences"])

    # --gate-value 0 is seq-KD: the teacher is never loaded
    task0, model0, hybrid0 = hybrid_setup(tiny_data, tiny_teacher, distilled_dir, "--gate", "fixed",
                                          "--gate-value", "0", *ls)
    model0.double().eval()
    loss0, _, _ = hybrid0(model0, first_batch(task0, "train"))
    assert loss0.item() == pytest.approx(seq(model0, distilled_as_gold(sample))[0].item(), rel=1e-6)
    assert not task0.teacher.loaded


def test_sentence_gate_weighs_each_sentence(tiny_data, tiny_teacher, distilled_dir):
    """L = sum_i g_i L_tok_i + (1 - g_i) L_sent_i, g_i from the pooled encoder, recomputed by hand."""
    task, model, hybrid = hybrid_setup(tiny_data, tiny_teacher, distilled_dir, "--gate", "relative_loss",
                                       "--kd-temperature", "2")
    model.double().eval()
    hybrid.double()
    torch.nn.init.normal_(hybrid.gate.proj.weight, std=0.5)
    hybrid.loss_scales.copy_(torch.tensor([1.5, 3.25]))  # as after some updates
    hybrid.scale_updates.fill_(3)
    sample = first_batch(task, "train")
    loss, _, log = hybrid(model, sample)

    [teacher], _ = checkpoint_utils.load_model_ensemble([str(tiny_teacher)], task=task)
    teacher.double().eval()
    with torch.no_grad():
        src, lengths = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
        enc = model.encoder(src, src_lengths=lengths)
        keep = src.ne(PAD).double()
        pooled = (enc["encoder_out"][0].transpose(0, 1) * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True)
        g = torch.sigmoid(pooled @ hybrid.gate.proj.weight[0] + hybrid.gate.proj.bias[0])
        s_logits = model(**sample["net_input"])[0]
        t_logits = teacher(**sample["net_input"])[0]
        kl = (F.softmax(t_logits / 2, -1) * (F.log_softmax(t_logits / 2, -1)
                                             - F.log_softmax(s_logits / 2, -1))).sum(-1)
        kd = (kl * sample["target"].ne(PAD)).sum(1)
        tok = 4 * kd
        d = sample["distilled"]
        h_lprobs = F.log_softmax(model(src, lengths, d["prev_output_tokens"])[0], -1)
        nll = -h_lprobs.gather(-1, d["target"].unsqueeze(-1)).squeeze(-1)
        sent = (nll * d["target"].ne(PAD)).sum(1)
    assert g.std() > 0.01  # the gate really differs between sentences
    assert loss.item() == pytest.approx((g * tok + (1 - g) * sent).sum().item(), rel=1e-6)
    assert log["tok_loss"].item() == pytest.approx(tok.sum().item(), rel=1e-6)
    assert log["sent_loss"].item() == pytest.approx(sent.sum().item(), rel=1e-6)
    assert log["gate_sum"].item() == pytest.approx(g.sum().item(), rel=1e-6)
    assert log["gate_sqsum"].item() == pytest.approx((g * g).sum().item(), rel=1e-6)
    assert log["kd_loss"].item() == pytest.approx(kd.sum().item(), rel=1e-6)
    # every component reaches fairseq's metrics (bits per sample_size / per token)
    with metrics.aggregate(new_root=True) as agg:
        hybrid.reduce_metrics([log])
    logged = agg.get_smoothed_values()
    ntokens, ln2 = sample["ntokens"], math.log(2)
    for key, value in (("tok_loss", tok.sum()), ("sent_loss", sent.sum()), ("kd_loss", kd.sum())):
        assert logged[key] == pytest.approx(value.item() / ntokens / ln2, abs=1e-3), key
    assert logged["tok_scale"] == pytest.approx(1.5 / ln2, abs=1e-4)
    assert logged["sent_scale"] == pytest.approx(3.25 / ln2, abs=1e-4)
    assert logged["gate"] == pytest.approx(g.mean().item(), abs=1e-4)


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("gate", ["scalar", "relative_loss", "complexity"])
def test_learned_gate_gets_gradients_and_the_student_does_not_see_them(
        tiny_data, tiny_teacher, distilled_dir, gate):
    task, model, hybrid = hybrid_setup(tiny_data, tiny_teacher, distilled_dir, "--gate", gate)
    model.double().train()
    hybrid.double().train()
    sample = first_batch(task, "train")
    # before the first update has set the loss scales, the gate waits
    hybrid(model, sample)[0].backward()
    assert all(torch.all(g == 0) for g in grads(hybrid).values()) and grads(hybrid)
    student_grads_learned = grads(model)
    # with scales set, every gate parameter gets a gradient
    model.zero_grad()
    hybrid.loss_scales.copy_(torch.tensor([1.0, 4.0]))
    hybrid.scale_updates.fill_(1)
    loss, _, _ = hybrid(model, sample)
    loss.backward()
    gate_grads = grads(hybrid)
    assert set(gate_grads) == {n for n, _ in hybrid.named_parameters()}
    assert all(g.abs().sum() > 0 for g in gate_grads.values())
    # the student's gradient is that of the mixed loss at g = 0.5, as with --gate fixed 0.5
    _, _, fixed = hybrid_setup(tiny_data, tiny_teacher, distilled_dir, "--gate", "fixed")
    model.zero_grad()
    fixed(model, sample)[0].backward()
    for name, g in grads(model).items():
        assert torch.allclose(g, student_grads_learned[name], rtol=1e-9, atol=1e-12), name
    if gate == "complexity":  # with statistics set its gates differ from 0.5 (tested below)
        return
    model.zero_grad()
    hybrid(model, sample)[0].backward()
    for name, g in grads(model).items():
        assert torch.allclose(g, student_grads_learned[name], rtol=1e-9, atol=1e-12), name


def update_scales(task, criterion, logging_outputs):
    with metrics.aggregate(new_root=True):
        task.reduce_metrics(logging_outputs, criterion)


def train_gate_only(task, model, hybrid, sample, steps):
    """Adam on the gate alone, the student frozen; the scales updated as fairseq-train does."""
    opt = torch.optim.Adam(hybrid.parameters(), lr=0.05)
    trajectory = []
    for _ in range(steps):
        opt.zero_grad()
        loss, sample_size, log = hybrid(model, sample)
        (loss / sample_size).backward()
        opt.step()
        update_scales(task, hybrid, [log])
        trajectory.append(log["gate_sum"].item() / log["gate_n"])
    with torch.no_grad():
        _, _, log = hybrid(model, sample)
    return torch.tensor(trajectory), log


@pytest.mark.parametrize("gate", ["scalar", "relative_loss", "complexity"])
def test_gate_does_not_follow_the_units_of_a_term(tiny_data, tiny_teacher, distilled_dir, gate,
                                                  monkeypatch):
    """Sentence-level loss x100 (a change of units): same gate trajectory, inside (0, 1)."""
    runs = {}
    for factor in (1.0, 100.0):
        task, model, hybrid = hybrid_setup(tiny_data, tiny_teacher, distilled_dir, "--gate", gate)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        hybrid.train()
        real = hybrid_module.hybrid_sentence_losses

        def scaled(*a, f=factor, **k):  # (tok, sent, nll, kd): sent in other units
            tok, sent, nll, kd = real(*a, **k)
            return tok, f * sent, nll, kd
        monkeypatch.setattr(hybrid_module, "hybrid_sentence_losses", scaled)
        sample = first_batch(task, "train", max_tokens=500)
        runs[factor] = train_gate_only(task, model, hybrid, sample, steps=15)
        monkeypatch.undo()
    (traj1, log1), (traj100, log100) = runs[1.0], runs[100.0]
    assert log100["sent_loss"].item() == pytest.approx(100 * log1["sent_loss"].item(), rel=1e-4)
    assert torch.allclose(traj1, traj100, atol=2e-3), (traj1, traj100)
    n = log1["gate_n"]
    mean = log1["gate_sum"].item() / n
    assert 0.1 < mean < 0.9
    if gate == "relative_loss":  # per-sentence gates differ, and stay off the boundaries
        std = (log1["gate_sqsum"].item() / n - mean ** 2) ** 0.5
        assert 0.005 < std < 0.25


def test_update_freq_accumulates_exactly(tiny_data, tiny_teacher, distilled_dir):
    """Two micro-batches (--update-freq 2) = one batch: gradients, metrics, loss scales."""
    task, model, hybrid = hybrid_setup(tiny_data, tiny_teacher, distilled_dir, "--gate", "relative_loss")
    model.double().train()
    hybrid.double().train()
    torch.nn.init.normal_(hybrid.gate.proj.weight, std=0.5)
    hybrid.loss_scales.copy_(torch.tensor([1.5, 3.0]))
    hybrid.scale_updates.fill_(3)
    task.load_dataset("train")
    dataset = task.dataset("train")
    ids = list(range(0, 12))
    whole = dataset.collater([dataset[i] for i in ids])
    parts = [dataset.collater([dataset[i] for i in ids[:5]]), dataset.collater([dataset[i] for i in ids[5:]])]

    loss, size, log = hybrid(model, whole)
    loss.backward()
    g_whole = {**grads(model), **{"c." + k: v for k, v in grads(hybrid).items()}}
    model.zero_grad()
    hybrid.zero_grad()
    logs, sizes = [], 0
    for part in parts:
        loss_p, size_p, log_p = hybrid(model, part)
        loss_p.backward()
        logs.append(log_p)
        sizes += size_p
    g_parts = {**grads(model), **{"c." + k: v for k, v in grads(hybrid).items()}}
    assert sizes == size
    # log-probs and gates are float32 whatever the model dtype: compare at that precision
    scale = torch.stack([g.norm() for g in g_whole.values()]).max()
    for name, g in g_whole.items():
        assert (g - g_parts[name]).norm() <= 1e-6 * scale, name
        if name.startswith("c."):
            assert (g - g_parts[name]).norm() <= 1e-5 * g.norm(), name

    def reduced(logging_outputs):
        with metrics.aggregate(new_root=True) as agg:
            hybrid.reduce_metrics(logging_outputs)
            return agg.get_smoothed_values()

    one, two = reduced([log]), reduced(logs)
    for key in ("loss", "tok_loss", "sent_loss", "gate", "gate_std"):
        assert one[key] == pytest.approx(two[key], rel=1e-6, abs=1e-6), key
    assert one["gate_std"] > 0
    before = {k: v.clone() for k, v in hybrid.state_dict().items()}
    hybrid.on_update([log])
    scales_one = hybrid.loss_scales.clone()
    hybrid.load_state_dict(before)
    hybrid.on_update(logs)
    assert torch.allclose(scales_one, hybrid.loss_scales, rtol=1e-10)
    assert not torch.allclose(scales_one, before["loss_scales"])
    assert int(hybrid.scale_updates) == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_student(tiny_data, tiny_teacher, distilled_dir, dtype):
    """As under --fp16/--bf16: student and criterion cast by the trainer, gate maths in float32."""
    task, model, hybrid = hybrid_setup(tiny_data, tiny_teacher, distilled_dir, "--gate", "relative_loss")
    model.eval()
    sample = first_batch(task, "train", max_tokens=300)
    hybrid.loss_scales.copy_(torch.tensor([1.0, 4.0]))
    hybrid.scale_updates.fill_(1)
    ref, _, ref_log = hybrid(model, sample)
    model.to(dtype)
    hybrid.to(dtype)
    try:
        loss, _, log = hybrid(model, sample)
    except RuntimeError as e:  # an op without a CPU kernel for this dtype
        pytest.skip(f"{dtype} on CPU: {e}")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref.item(), rel=0.05)
    assert log["gate_sum"].item() == pytest.approx(ref_log["gate_sum"].item(), rel=0.01)
    assert next(task.teachers[0].parameters()).dtype == dtype
    loss.backward()
    for p in hybrid.parameters():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("cast", ["fp16", "bf16"])
def test_running_means_move_as_in_float32_under_half_precision(
        tiny_data, tiny_teacher, distilled_dir, cast):
    """The trainer casts the whole criterion (--fp16: .half(), --bf16: .to(bfloat16)); the
    running means must still follow the float32 EMA (in bfloat16 a 1% step rounds away)."""
    task, model, hybrid = hybrid_setup(tiny_data, tiny_teacher, distilled_dir, "--gate", "relative_loss")
    model.eval()
    hybrid.train()
    with torch.no_grad():
        _, _, log = hybrid(model, first_batch(task, "train", max_tokens=300))
    start = [1.3, 3.1]
    hybrid.loss_scales.copy_(torch.tensor(start))
    hybrid.scale_updates.fill_(5)
    hybrid = hybrid.half() if cast == "fp16" else hybrid.to(dtype=torch.bfloat16)  # as fairseq's Trainer
    assert hybrid.gate.proj.weight.dtype == (torch.float16 if cast == "fp16" else torch.bfloat16)
    current = [log["tok_loss"].item() / log["ntokens"], log["sent_loss"].item() / log["hyp_ntokens"]]
    expected = [float(torch.tensor(v)) for v in start]  # float32 starting values, in float64
    for _ in range(200):
        update_scales(task, hybrid, [log])
        expected = [0.99 * e + 0.01 * c for e, c in zip(expected, current)]
    assert all(abs(e - s) > 0.1 for e, s in zip(expected, start))  # the means really had to move
    assert hybrid.loss_scales.tolist() == pytest.approx(expected, rel=1e-5)
    assert hybrid.loss_scales.dtype == torch.float32
    assert int(hybrid.scale_updates) == 205
    # saved and restored exactly, as on resume
    state = hybrid.state_dict()
    assert state["loss_scales"].dtype == torch.float32
    _, _, fresh = hybrid_setup(tiny_data, tiny_teacher, distilled_dir, "--gate", "relative_loss")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.loss_scales, hybrid.loss_scales)


def test_bad_options_are_clear_errors(tiny_data, tiny_teacher, distilled_dir):
    with pytest.raises(KDError, match="--distilled-data DIR"):
        build_training(tiny_data / "bin", "--task", "translation_kd", "--teacher-path", tiny_teacher,
                       *STUDENT_ARCH, "--criterion", "hybrid_kd")
    with pytest.raises(KDError, match=r"--gate-value must be in \[0, 1\], got 1.5"):
        hybrid_setup(tiny_data, tiny_teacher, distilled_dir, "--gate", "fixed", "--gate-value", "1.5")
    with pytest.raises(KDError, match=r"--gate-prior must be in \(0, 1\)"):
        hybrid_setup(tiny_data, tiny_teacher, distilled_dir, "--gate-prior", "1")


# -- each learned gate moves in its documented direction ------------------------------------

def sentence_gates(task, model, hybrid, ids):
    """{id: g_i}, each sentence on its own (the gate of a sentence does not depend on its batch)."""
    dataset = task.dataset("train")
    with torch.no_grad():
        return {i: hybrid(model, dataset.collater([dataset[i]]))[2]["gate_sum"].item() for i in ids}


def frozen_setup(tiny_data, teacher, distilled, *args):
    task, model, hybrid = hybrid_setup(tiny_data, teacher, distilled, *args)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    hybrid.train()
    task.load_dataset("train")
    return task, model, hybrid


def logit(p):
    return math.log(p / (1 - p))


@pytest.mark.parametrize("measure", ["teacher_entropy", "source_length"])
def test_complexity_gate_gives_complex_sentences_more_sentence_level_kd(
        tiny_data, tiny_teacher, distilled_dir, measure, monkeypatch):
    """Half the sentences simple, half complex by the measure: the complex half gets the lower
    gate (more sentence-level KD), each g_i is the documented formula, all inside the bounds."""
    # warm-up of one batch: the statistics standardize from the second update on
    task, model, hybrid = frozen_setup(tiny_data, tiny_teacher, distilled_dir, "--gate", "complexity",
                                       "--gate-complexity", measure, "--gate-complexity-warmup", "40")
    dataset = task.dataset("train")
    ids = list(range(40))
    if measure == "teacher_entropy":  # odd ids: a flat teacher (complex), even: a peaked one
        complex_ids = set(ids[1::2])
        real = task.teacher.distribution

        def constructed(sample, *args, **kw):
            dist = real(sample, *args, **kw)
            B = sample["target"].size(0)
            scale = torch.tensor([0.1 if int(i) in complex_ids else 10.0 for i in sample["id"]])
            scores = dist.scores.view(B, -1, dist.scores.size(-1)) * scale[:, None, None]
            return type(dist)(scores.reshape(dist.scores.shape))
        monkeypatch.setattr(task.teacher, "distribution", constructed)
    else:  # the longer half of the sources
        src_len = {i: dataset[i]["source"].numel() for i in ids}
        by_length = sorted(ids, key=src_len.get)
        complex_ids = set(by_length[len(ids) // 2:])
    sample = dataset.collater([dataset[i] for i in ids])
    train_gate_only(task, model, hybrid, sample, steps=10)  # statistics set, level trained

    gates = sentence_gates(task, model, hybrid, ids)
    simple = [gates[i] for i in ids if i not in complex_ids]
    hard = [gates[i] for i in complex_ids]
    assert max(hard) < min(simple) if measure == "teacher_entropy" else sum(hard) < sum(simple)
    # the formula, from the logged complexities and the criterion's statistics
    level = hybrid.gate.level().item()
    stats = hybrid.gate_stats()
    mean, std = stats["complexity_mean"], stats["complexity_std"]
    for i in ids:
        with torch.no_grad():
            log = hybrid(model, dataset.collater([dataset[i]]))[2]
        z = (log["complexity_sum"].item() - mean) / std
        assert gates[i] == pytest.approx(1 / (1 + math.exp(-(level - math.tanh(z)))), abs=1e-4)
    lo, hi = (1 / (1 + math.exp(-x)) for x in (logit(0.5) - 2, logit(0.5) + 2))  # range 1 + spread 1
    assert all(lo < g < hi for g in gates.values())
    if measure == "source_length":  # monotone: a longer source never gets a higher gate
        order = sorted(ids, key=lambda i: (src_len[i], -gates[i]))
        assert all(gates[a] >= gates[b] - 1e-6 for a, b in zip(order, order[1:]))


@pytest.mark.parametrize("harder", ["tok", "sent"])
def test_scalar_gate_leaves_its_prior_when_one_term_is_consistently_harder(
        tiny_data, tiny_teacher, distilled_dir, harder, monkeypatch):
    """After the first update, the other term falls to 30% of its start and the harder one stays:
    the gate shifts weight to the term that fell (as minimising the mixed loss on one scale
    does), stays inside its bounds, and follows the closed-form optimum's side."""
    # decay 0: a gate dividing each term by its own running mean would see r = 1 from the
    # third update on and stay at the prior; the references of this gate do not decay
    task, model, hybrid = frozen_setup(tiny_data, tiny_teacher, distilled_dir, "--gate", "scalar",
                                       "--gate-scale-decay", "0")
    real = hybrid_module.hybrid_sentence_losses
    calls = []

    def progressing(*a, **k):  # the student is frozen: the losses are made to move
        tok, sent, nll, kd = real(*a, **k)
        f = 1.0 if not calls else 0.3
        calls.append(1)
        return (tok, f * sent, nll, kd) if harder == "tok" else (f * tok, sent, nll, kd)
    monkeypatch.setattr(hybrid_module, "hybrid_sentence_losses", progressing)
    sample = first_batch(task, "train", max_tokens=500)
    trajectory, _ = train_gate_only(task, model, hybrid, sample, steps=40)
    g = trajectory[-1].item()
    bound = 1 / (1 + math.exp(-1.0))  # --gate-level-range 1 around logit(0.5)
    # J's optimum: logit(prior) + (r_sent - r_tok) / lambda = -+0.7 / 0.5, beyond the range
    if harder == "tok":  # the sentence-level term fell: more sentence-level KD
        assert 1 - bound < g < 0.35
    else:
        assert 0.65 < g < bound
    assert abs(trajectory[0].item() - 0.5) < 1e-6  # started at the prior


def test_relative_loss_gate_gives_relatively_harder_sentence_level_more_token_kd(
        tiny_data, tiny_teacher, distilled_dir, monkeypatch):
    """The diagnostic gate's documented direction: sentences whose L_sent is relatively high
    (x3 for even ids) get a higher g (more token-level KD), without reaching 0 or 1."""
    task, model, hybrid = frozen_setup(tiny_data, tiny_teacher, distilled_dir, "--gate", "relative_loss")
    dataset = task.dataset("train")
    ids = list(range(24))
    sample = dataset.collater([dataset[i] for i in ids])
    harder = (sample["id"] % 2 == 0).double()
    real = hybrid_module.hybrid_sentence_losses

    def sent_harder_for_even(*a, **k):
        tok, sent, nll, kd = real(*a, **k)
        return tok, sent * (1 + 2 * harder.to(sent.dtype)), nll, kd
    monkeypatch.setattr(hybrid_module, "hybrid_sentence_losses", sent_harder_for_even)
    train_gate_only(task, model, hybrid, sample, steps=30)
    monkeypatch.undo()
    gates = sentence_gates(task, model, hybrid, ids)
    even = sum(gates[i] for i in ids[::2]) / 12
    odd = sum(gates[i] for i in ids[1::2]) / 12
    assert even > odd + 0.1, (even, odd)
    assert all(0.02 < g < 0.98 for g in gates.values())
