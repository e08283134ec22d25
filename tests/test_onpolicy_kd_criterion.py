"""onpolicy_kd on real batches: identities, generated targets, gradients, random streams, errors."""
import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.data import data_utils
from fairseq.sequence_generator import SequenceGenerator

from fairseq_kd.criterions.onpolicy_kd import (
    OnPolicyKDCriterion,
    as_fairseq_targets,
    max_output_lengths,
    sample_outputs,
    step_generators,
)
from fairseq_kd.errors import KDError
from fairseq_kd.teacher import TeacherSource
from helpers import STUDENT_ARCH, build_training, first_batch


pytestmark = pytest.mark.usefixtures("one_thread")


def start_update(k, seed=1):
    """What fairseq's trainer does at the start of update k + 1 (k updates done):
    seed torch with --seed + k (``Trainer._set_seed``)."""
    torch.manual_seed(seed + k)


def onpolicy(tiny_data, teacher, *args, criterion="onpolicy_kd"):
    """(task, student, criterion) as fairseq-train builds them; the student without dropout."""
    torch.manual_seed(0)
    _, task, model, crit = build_training(tiny_data / "bin", "--task", "translation_kd", "--teacher-path",
                                          teacher, *STUDENT_ARCH, "--criterion", criterion, *args)
    return task, model.eval(), crit


def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def recording(crit):
    """Records every on-policy batch the criterion builds from now on (``crit.recorded``)."""
    wrapped = hasattr(crit, "recorded")
    crit.recorded = []
    if wrapped:
        return crit
    build = crit.onpolicy_sample

    def record(*args):
        trained, logged = build(*args)
        crit.recorded.append(trained)
        return trained, logged

    crit.onpolicy_sample = record
    return crit


@pytest.mark.parametrize("T", ["1", "2"])
def test_ratio_zero_beta_zero_is_word_kd_at_alpha_one(tiny_data, tiny_teacher, T):
    task, model, ours = onpolicy(tiny_data, tiny_teacher, "--onpolicy-ratio", "0", "--jsd-beta", "0",
                                 "--kd-temperature", T)
    *_, word = onpolicy(tiny_data, tiny_teacher, "--kd-alpha", "1", "--label-smoothing", "0",
                        "--kd-temperature", T, criterion="word_kd")
    sample = first_batch(task)
    results = []
    for crit in (ours.train(), word.train()):
        model.zero_grad()
        loss, size, log = crit(model, sample)
        loss.backward()
        results.append((loss, size, log, gradients(model)))
    (l1, s1, log1, g1), (l2, s2, log2, g2) = results
    assert torch.equal(l1, l2) and l1 > 0
    assert s1 == s2 == sample["ntokens"]
    assert torch.equal(log1["nll_loss"], log2["nll_loss"])
    assert torch.equal(log1["jsd_loss"], log2["kd_loss"])
    assert g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)
    assert log1["onpolicy_share"] == 0.0 and log1["gen_sentences"] == 0


def test_greedy_outputs_are_fairseqs_greedy_translations(tiny_data, tiny_teacher):
    """The decoder of ours at temperature 0, run on a real checkpoint (the trained tiny
    teacher), writes what fairseq's own generator writes with beam 1, and its rows
    become the targets fairseq's collater would make of those translations."""
    task, _, crit = onpolicy(tiny_data, tiny_teacher)
    [model], _ = checkpoint_utils.load_model_ensemble([str(tiny_teacher)], task=task)
    model.eval()
    sample = first_batch(task)
    src_tokens, src_lengths = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    limits = torch.full_like(src_lengths, 60)
    pad, eos = task.target_dictionary.pad(), task.target_dictionary.eos()
    tokens = sample_outputs(model, src_tokens, src_lengths, limits, 0.0, None, eos, pad)
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=1, max_len_a=0, max_len_b=60)
    hypos = [h[0]["tokens"] for h in generator.generate([model], sample)]
    ours = [row[1:][row[1:].ne(pad)] for row in tokens]
    assert [h.tolist() for h in hypos] == [o.tolist() for o in ours]
    assert all(o[-1] == eos and o[:-1].ne(eos).all() and len(o) >= 2 for o in ours)
    assert max(len(o) for o in ours) == 61  # the teacher of 6 epochs loops: EOS forced at the cap
    target, prev = as_fairseq_targets(tokens, pad)
    assert torch.equal(target, data_utils.collate_tokens(hypos, pad, eos))
    assert torch.equal(prev, data_utils.collate_tokens(hypos, pad, eos, move_eos_to_beginning=True))
    assert not target.requires_grad and not tokens.requires_grad


def test_sampled_targets_are_well_formed_and_trained_on(tiny_data, tiny_teacher):
    """A random tiny student samples at temperature 1 up to its length limits: every row
    ends in one EOS followed by padding, within int(a * src_len + b) tokens, and the
    batch the student is scored on is that one, counted in sample_size."""
    task, model, crit = onpolicy(tiny_data, tiny_teacher, "--onpolicy-ratio", "1",
                                 "--onpolicy-max-len-a", "0.5", "--onpolicy-max-len-b", "3")
    recording(crit.train())
    sample = first_batch(task)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["prev_output_tokens"]),
                                           with_kwargs=True)
    loss, size, log = crit(model, sample)
    hook.remove()
    [trained] = crit.recorded
    target, prev = trained["target"], trained["net_input"]["prev_output_tokens"]
    pad, eos = task.target_dictionary.pad(), task.target_dictionary.eos()
    limits = max_output_lengths(sample["net_input"]["src_lengths"], 0.5, 3, 10 ** 6)
    lengths = target.ne(pad).sum(1)
    assert torch.equal(target[torch.arange(len(target)), lengths - 1], torch.full_like(lengths, eos))
    assert int(target.eq(eos).sum()) == len(target)  # one EOS per row
    assert all(bool(row[:n].ne(pad).all() and row[n:].eq(pad).all()) for row, n in zip(target, lengths))
    assert bool((lengths >= 2).all() and (lengths <= limits + 1).all())
    assert bool((lengths == limits + 1).any())  # some rows end at their limit
    assert torch.equal(prev[:, 0], torch.full_like(lengths, eos))
    assert torch.equal(prev[:, 1:], target[:, :-1].masked_fill(target[:, 1:].eq(pad), pad))
    assert [torch.equal(s, prev) for s in seen] == [True]  # the one student pass, on them
    assert torch.equal(trained["net_input"]["src_tokens"], sample["net_input"]["src_tokens"])
    assert size == log["ntokens"] == log["gen_tokens"] == int(lengths.sum())
    assert log["gen_sentences"] == len(target) and log["onpolicy_share"] == 1.0 and log["gen_seconds"] > 0


@pytest.mark.parametrize("beta", ["0", "0.5", "1"])
def test_gradient_reaches_the_student_only_through_the_scoring_pass(tiny_data, tiny_teacher, beta):
    """On-policy loss and gradients equal those of the supervised branch fed the same
    generated targets as a fixed batch: nothing flows through the sampling."""
    task, model, crit = onpolicy(tiny_data, tiny_teacher, "--onpolicy-ratio", "1", "--jsd-beta", beta,
                                 "--sample-temperature", "0.7")
    sample = first_batch(task)
    loss, size, log = recording(crit.train())(model, sample)
    loss.backward()
    grads = gradients(model)
    [trained] = crit.recorded
    assert not trained["target"].requires_grad
    assert not trained["net_input"]["prev_output_tokens"].requires_grad
    _, _, fixed = onpolicy(tiny_data, tiny_teacher, "--onpolicy-ratio", "0", "--jsd-beta", beta)
    model.zero_grad()
    loss2, size2, log2 = fixed.train()(model, trained)
    loss2.backward()
    assert torch.equal(loss, loss2) and size == size2 and loss > 0
    assert torch.equal(log["nll_loss"], log2["nll_loss"])
    assert all(torch.equal(g, gradients(model)[n]) for n, g in grads.items())
    assert sum(g.abs().sum() for g in grads.values()) > 0


def test_streams_depend_on_update_and_micro_batch_and_resume(tiny_data, tiny_teacher):
    """Outputs at update k, micro-batch i, are a function of (--seed + k, i, rank): a
    fresh criterion (a resumed run) draws what the running one drew; the next
    micro-batch (--update-freq) and the next update draw others.  (The whole chain,
    fairseq-train resumed from a checkpoint, is in test_onpolicy_kd_train.py.)"""
    task, model, crit = onpolicy(tiny_data, tiny_teacher, "--onpolicy-ratio", "1")
    sample = first_batch(task, max_tokens=300)

    def outputs(criterion, passes):
        recording(criterion.train())
        for _ in range(passes):
            criterion(model, sample)
        return [t["target"] for t in criterion.recorded]

    *_, resumed = onpolicy(tiny_data, tiny_teacher, "--onpolicy-ratio", "1")
    start_update(7)
    first, second = outputs(crit, 2)
    start_update(7)
    again_first, again_second = outputs(resumed, 2)
    assert torch.equal(first, again_first) and torch.equal(second, again_second)
    assert not torch.equal(first, second)
    start_update(8)
    [next_update] = outputs(crit, 1)
    assert not torch.equal(first, next_update)


def test_decision_is_shared_by_ranks_and_sampling_is_not():
    draws = {}
    for rank in (0, 1):
        for update in range(400):
            decision, sampling = step_generators(1 + update, 0, rank, "cpu")
            draws.setdefault(rank, []).append((torch.rand((), generator=decision).item(),
                                               torch.rand((), generator=sampling).item()))
    decisions = [[d for d, _ in draws[r]] for r in (0, 1)]
    assert decisions[0] == decisions[1]
    assert all(a != b for (_, a), (_, b) in zip(draws[0], draws[1]))
    share = sum(d < 0.3 for d in decisions[0]) / 400  # Bernoulli(0.3) decisions
    assert 0.23 < share < 0.37
    seeds = {g.initial_seed() for s in (1, 2) for m in (0, 1) for g in step_generators(s, m, 0, "cpu")}
    assert len(seeds) == 8  # four passes, two streams each: all different


def test_validation_scores_the_batch_targets_without_sampling(tiny_data, tiny_teacher):
    task, model, crit = onpolicy(tiny_data, tiny_teacher, "--onpolicy-ratio", "1")
    _, _, supervised = onpolicy(tiny_data, tiny_teacher, "--onpolicy-ratio", "0")
    sample = first_batch(task)
    loss, size, log = crit.eval()(model, sample)
    loss2, _, _ = supervised.train()(model, sample)
    assert torch.equal(loss, loss2) and size == sample["ntokens"]
    assert not any(k.startswith("gen_") or k == "onpolicy_share" for k in log)


def test_supervised_branch_trains_on_distilled_targets(tiny_data, tiny_teacher):
    """With --distilled-data the batch's distilled targets are the supervised ones."""
    task, model, crit = onpolicy(tiny_data, tiny_teacher, "--onpolicy-ratio", "0")
    sample = first_batch(task)
    other = first_batch(task, max_tokens=300)  # other targets, as a stand-in for y_hat
    n = min(len(sample["target"]), len(other["target"]))
    gold = {k: (v[:n] if torch.is_tensor(v) else v) for k, v in sample["net_input"].items()}
    sample = {"id": sample["id"][:n], "net_input": gold, "target": sample["target"][:n],
              "ntokens": int(sample["target"][:n].ne(1).sum())}
    hyp = other["target"][:n]
    sample["distilled"] = {"target": hyp, "prev_output_tokens": other["net_input"]["prev_output_tokens"][:n],
                           "ntokens": int(hyp.ne(task.target_dictionary.pad()).sum())}
    as_batch = {"id": sample["id"], "target": hyp, "ntokens": sample["distilled"]["ntokens"],
                "net_input": dict(gold, prev_output_tokens=sample["distilled"]["prev_output_tokens"])}
    loss, size, _ = crit.train()(model, sample)
    loss2, size2, _ = crit(model, as_batch)
    assert torch.equal(loss, loss2) and size == size2 == sample["distilled"]["ntokens"]
    assert not torch.equal(loss, crit(model, {k: v for k, v in sample.items() if k != "distilled"})[0])


@pytest.mark.parametrize("args,message", [
    (["--jsd-beta", "0.5", "--kd-topk", "8"], r"--kd-topk 8 needs --jsd-beta 0: the JSD's mixture"),
    (["--onpolicy-ratio", "1.5"], r"--onpolicy-ratio must be in \[0, 1\], got 1.5"),
    (["--jsd-beta", "-0.1"], r"--jsd-beta must be in \[0, 1\]"),
    (["--sample-temperature", "-1"], r"--sample-temperature must be >= 0 \(0 = greedy\)"),
    (["--onpolicy-max-len-a", "0", "--onpolicy-max-len-b", "0"], "allows no token before EOS"),
])
def test_bad_options_are_one_line_errors(tiny_data, tiny_teacher, args, message):
    with pytest.raises(KDError, match=message):
        onpolicy(tiny_data, tiny_teacher, *args)


def test_a_teacher_cache_is_refused(tiny_data, tiny_teacher):
    """Anything but the teacher model (the cache is another TeacherSource) cannot score
    the student's own outputs."""
    task, _, crit = onpolicy(tiny_data, tiny_teacher)
    task.teacher = TeacherSource()
    with pytest.raises(KDError, match=r"onpolicy_kd needs the teacher model \(--teacher-path\)"):
        OnPolicyKDCriterion(task, 0.5, 0.5, 1.0, 1.5, 10, 1.0, 0, False, False)
