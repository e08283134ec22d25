"""The teacher cache with distilled targets: hybrid_kd and Seq-KD + Word-KD.

* ``hybrid_kd --teacher-cache`` reads the teacher on the *gold* prefixes (the
  KL of L_tok and the teacher-entropy complexity) from a cache built over the
  gold DATA folder, while its batches also carry ``sample["distilled"]``;
* ``seq_kd --word-kd-alpha`` trains on the distilled folder, and reads the
  teacher on the *distilled* prefixes from a cache built over that folder.

Each is compared with the online teacher at the same ``--kd-topk`` on the same
batch, and with an independent computation from the teacher's logits.
Tolerances: a float32 cache stores the log-probs the online teacher computes,
so the results agree to float32 rounding (1e-5 relative); a float16 cache
rounds each stored log-prob s by at most u|s|, u = 2^-11, which bounds what
reaches the losses (2e-3 relative, as for word_kd) and the entropy (below).
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils

from fairseq_kd.errors import KDError
from fairseq_kd.teacher_cache import TeacherCache
from helpers import STUDENT_ARCH, build_training, fairseq_train, first_batch
from test_teacher_cache import EPOCH_LINE, cache_teacher, online_and_cached

pytestmark = pytest.mark.usefixtures("one_thread")

K = 8
FP16_UNIT_ROUNDOFF = 2.0 ** -11
HYBRID = ["--criterion", "hybrid_kd", "--gate", "complexity", "--kd-alpha", "0.7",
          "--kd-topk", str(K), "--kd-temperature", "2", "--label-smoothing", "0.1"]
SEQ_WORD_KD = ["--criterion", "seq_kd", "--word-kd-alpha", "0.5", "--kd-topk", str(K),
               "--kd-temperature", "2", "--label-smoothing", "0.1"]


@pytest.fixture(scope="module")
def gold_cache(tiny_data, tiny_teacher, tmp_path_factory):
    """float32 top-8 cache over the gold DATA folder (train and valid)."""
    out = tmp_path_factory.mktemp("gold_cache") / "fp32"
    cache_teacher(tiny_data / "bin", tiny_teacher, out, "--dtype", "float32")
    return out


@pytest.fixture(scope="module")
def distilled_folder(tiny_data, tiny_distilled, tmp_path_factory):
    """The folder ``fairseq-kd corpus`` writes: the teacher's translations of the training
    split, plus the gold valid split (its --copy-splits), so that it trains as it is."""
    folder = tmp_path_factory.mktemp("distilled_corpus")
    for f in [*tiny_distilled[0].iterdir(), *(tiny_data / "bin").glob("valid.*")]:
        (folder / f.name).symlink_to(f)
    return folder


@pytest.fixture(scope="module")
def distilled_cache(distilled_folder, tiny_teacher, tmp_path_factory):
    """float32 top-8 cache over the distilled folder: the teacher on its own output prefixes."""
    out = tmp_path_factory.mktemp("distilled_cache") / "fp32"
    cache_teacher(distilled_folder, tiny_teacher, out, "--dtype", "float32")
    return out


def teacher_model(task, teacher):
    [model], _ = checkpoint_utils.load_model_ensemble([str(teacher)], task=task)
    return model.eval()


def topk_log_probs(teacher, sample, k=K):
    """(B, T, k) log-probs of the teacher's k best tokens on the sample's target prefixes,
    renormalised over those k, and their ids: computed here from the teacher's logits."""
    with torch.no_grad():
        logits = teacher(**sample["net_input"])[0].float()
    values, index = logits.topk(k, dim=-1)
    return F.log_softmax(values, dim=-1), index


def renormalised_topk_entropy(teacher, sample, pad):
    """Each sentence's mean, over its target tokens, of the entropy of the renormalised top k."""
    log_q, _ = topk_log_probs(teacher, sample)
    entropy = -(log_q.exp() * log_q).sum(-1)
    mask = sample["target"].ne(pad).float()
    return (entropy * mask).sum(1) / mask.sum(1)


def hybrid_pair(tiny_data, teacher, cache, distilled):
    """Online and cached hybrid_kd criterions in training mode with the complexity gate
    live: warm-up over, loss references set, statistics that spread this teacher's
    entropies over z in about [-1, 1] (its sentences differ by a few 1e-3 nats)."""
    online, cached, model, crit_online, crit_cached = online_and_cached(
        tiny_data, teacher, cache, "--distilled-data", distilled, "--dropout", "0", *HYBRID)
    sample = first_batch(online, "train")
    c = renormalised_topk_entropy(teacher_model(online, teacher), sample, online.target_dictionary.pad())
    n, mean, var = 1000.0, c.mean().item(), c.var().item()
    for crit in (crit_online, crit_cached):
        crit.train()
        crit.complexity_seen.fill_(10 ** 6)
        crit.complexity_stats.copy_(torch.tensor([n, n * mean, n * (var + mean * mean)]))
        crit.loss_scales.copy_(torch.tensor([2.0, 3.0]))
        crit.scale_updates.fill_(1)
    return online, cached, model, crit_online, crit_cached, c


def loss_and_grads(crit, model, sample):
    model.zero_grad()
    crit.zero_grad()
    loss, size, log = crit(model, sample)
    loss.backward()
    grads = [p.grad.flatten() for m in (model, crit) for p in m.parameters() if p.grad is not None]
    return loss.detach(), size, log, torch.cat(grads)


def test_hybrid_kd_cached_equals_online_topk(tiny_data, tiny_teacher, gold_cache, tiny_distilled):
    """Same batch: losses, per-sentence complexity, gate and gradients (student and gate)
    from the gold cache equal those of the online teacher with --kd-topk 8."""
    online, cached, model, crit_online, crit_cached, expected_c = hybrid_pair(
        tiny_data, tiny_teacher, gold_cache, tiny_distilled[0])
    sample_o, sample_c = first_batch(online, "train"), first_batch(cached, "train")
    assert torch.equal(sample_o["id"], sample_c["id"])
    # the batch carries distilled targets of other lengths: a lookup through them would misalign
    assert sample_c["distilled"]["ntokens"] != sample_c["ntokens"]
    dist = cached.teacher.distribution(sample_c, K, like=model)
    assert dist.scores.size(0) == sample_c["target"].numel()

    complexity = crit_cached.sentence_complexity(sample_c, dist)
    torch.testing.assert_close(complexity, expected_c, rtol=0, atol=1e-5)
    assert expected_c.max() - expected_c.min() > 1e-3  # the comparison can see a difference

    loss_o, size_o, log_o, grads_o = loss_and_grads(crit_online, model, sample_o)
    loss_c, size_c, log_c, grads_c = loss_and_grads(crit_cached, model, sample_c)
    assert size_c == size_o and log_o["kd_loss"] > 0
    assert loss_c.item() == pytest.approx(loss_o.item(), rel=1e-5)
    for key in ("tok_loss", "sent_loss", "kd_loss", "nll_loss", "gate_sum", "gate_sqsum",
                "complexity_sum", "complexity_sqsum"):
        assert log_c[key].item() == pytest.approx(log_o[key].item(), rel=1e-5), key
    assert log_c["complexity_sum"].item() == pytest.approx(expected_c.sum().item(), rel=1e-6)
    # the complexity gate really spreads the sentences (so the gradients depend on it)
    g = log_c["gate_sum"] / sample_c["nsentences"]
    assert (log_c["gate_sqsum"] / sample_c["nsentences"] - g * g).item() > 1e-4
    # The gate divides the complexity by its spread, a few 1e-3 nats for this weak teacher:
    # the 1e-7 float32 rounding of the entropies reaches the gates about 1e3 times larger
    # (measured: 2e-6 relative in norm; 4e-8 when both sides use the same complexities).
    assert ((grads_c - grads_o).norm() / grads_o.norm()).item() < 1e-5
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in crit_cached.parameters())

    # validation: no distilled targets, the fixed mixture; the KL still reads the cache
    crit_online.eval()
    crit_cached.eval()
    loss_o, _, _ = crit_online(model, first_batch(online, "valid"))
    loss_c, _, _ = crit_cached(model, first_batch(cached, "valid"))
    assert loss_c.item() == pytest.approx(loss_o.item(), rel=1e-5)
    assert isinstance(cached.teacher, TeacherCache)


def test_hybrid_kd_float16_cache_within_its_rounding(tiny_data, tiny_teacher, tiny_distilled, tmp_path):
    """A float16 cache (the default) rounds each log-prob s by at most u|s|.  The entropy
    H of softmax(s) moves by at most sum_i p_i |log p_i + H| max|ds| <= 2 H max|ds|
    <= 2 log(k) u max|s|; the losses and gradients stay within 2e-3 relative."""
    cache_teacher(tiny_data / "bin", tiny_teacher, tmp_path / "fp16")
    online, cached, model, crit_online, crit_cached, expected_c = hybrid_pair(
        tiny_data, tiny_teacher, tmp_path / "fp16", tiny_distilled[0])
    sample = first_batch(cached, "train")
    dist = cached.teacher.distribution(sample, K, like=model)
    bound = 2 * math.log(K) * FP16_UNIT_ROUNDOFF * dist.scores.abs().max().item()
    complexity = crit_cached.sentence_complexity(sample, dist)
    assert (complexity - expected_c).abs().max().item() <= bound
    loss_o, _, log_o, grads_o = loss_and_grads(crit_online, model, first_batch(online, "train"))
    loss_c, _, log_c, grads_c = loss_and_grads(crit_cached, model, sample)
    assert loss_c.item() == pytest.approx(loss_o.item(), rel=2e-3)
    assert log_c["kd_loss"].item() == pytest.approx(log_o["kd_loss"].item(), rel=2e-3)
    assert ((grads_c - grads_o).norm() / grads_o.norm()).item() < 2e-3


# an epoch line of hybrid_kd: loss, nll_loss, tok_loss, sent_loss, kd_loss, complexity_mean
HYBRID_EPOCH_LINE = re.compile(
    r"\| (train|valid) \| epoch (\d+) \|(?: valid on '\w+' subset \|)? loss ([\d.]+) \| "
    r"nll_loss ([\d.]+) \| tok_loss ([\d.]+) \| sent_loss ([\d.]+) \| kd_loss ([\d.]+) \|"
    r".*? complexity_mean ([\d.]+) \|")


@pytest.mark.slow  # a real training run; the batch-level equalities above stay in the default suite
def test_fairseq_train_hybrid_kd_from_the_cache(tiny_data, tiny_teacher, gold_cache, tiny_distilled,
                                                tmp_path):
    """fairseq-train with --teacher-cache and --distilled-data: an epoch and a validation
    complete without a teacher, and follow the online top-8 run (dropout in the student,
    fairseq's per-update seeds), complexity statistics included."""
    args = [*STUDENT_ARCH, "--task", "translation_kd", "--distilled-data", tiny_distilled[0], *HYBRID,
            "--gate-complexity-warmup", "100", "--max-epoch", "1", "--no-save"]
    logs = {}
    for name, teacher in (("online", ["--teacher-path", tiny_teacher]),
                          ("cached", ["--teacher-cache", gold_cache])):
        proc = fairseq_train(tiny_data / "bin", tmp_path / name, *args, *teacher)
        logs[name] = proc.stdout + proc.stderr
    assert "loaded teacher" in logs["online"] and "loaded teacher" not in logs["cached"]
    lines = {name: [(kind, int(epoch), *map(float, values)) for kind, epoch, *values
                    in HYBRID_EPOCH_LINE.findall(log)] for name, log in logs.items()}
    assert [l[:2] for l in lines["cached"]] == [("valid", 1), ("train", 1)], logs["cached"][-2000:]
    assert [l[:2] for l in lines["online"]] == [l[:2] for l in lines["cached"]]
    assert lines["cached"][-1][-1] > 0  # complexity_mean: the cache's entropies reached the gate
    for a, b in zip(lines["online"], lines["cached"]):
        assert b[2:] == pytest.approx(a[2:], abs=2e-3)


def test_seq_word_kd_cache_over_the_distilled_folder_equals_online(
        tiny_teacher, tiny_distilled, distilled_folder, distilled_cache):
    """seq_kd --word-kd-alpha on the distilled folder: the cache built over that folder
    holds the teacher on its own output prefixes, as the online teacher computes them."""
    _, online, model, crit_online = build_training(
        distilled_folder, "--task", "translation_kd", "--teacher-path", tiny_teacher,
        *STUDENT_ARCH, *SEQ_WORD_KD)
    _, cached, _, crit_cached = build_training(
        distilled_folder, "--task", "translation_kd", "--teacher-cache", distilled_cache,
        *STUDENT_ARCH, *SEQ_WORD_KD)
    model.eval()
    teacher = teacher_model(online, tiny_teacher)
    for split in ("train", "valid"):
        sample = first_batch(cached, split)
        # independent: the teacher's top 8 on these (distilled, for train) target prefixes
        log_q, index = topk_log_probs(teacher, sample)
        dist = cached.teacher.distribution(sample, K, like=model)
        real = sample["target"].reshape(-1).ne(cached.target_dictionary.pad())
        assert torch.equal(dist.index[real], index.reshape(-1, K)[real])
        torch.testing.assert_close(F.log_softmax(dist.scores[real], -1), log_q.reshape(-1, K)[real],
                                   rtol=0, atol=1e-5)
        loss_o, size_o, log_o, grads_o = loss_and_grads(crit_online, model, first_batch(online, split))
        loss_c, size_c, log_c, grads_c = loss_and_grads(crit_cached, model, sample)
        assert size_c == size_o and log_o["kd_loss"] > 0
        assert loss_c.item() == pytest.approx(loss_o.item(), rel=1e-5)
        assert log_c["kd_loss"].item() == pytest.approx(log_o["kd_loss"].item(), rel=1e-5)
        torch.testing.assert_close(grads_c, grads_o, rtol=1e-4, atol=1e-6)
        if split == "train":  # the targets are the teacher's translations (valid: gold)
            tgt_dict, hyps = cached.target_dictionary, tiny_distilled[1]
            i = int(sample["id"][0])
            assert torch.equal(sample["target"][0][sample["target"][0].ne(tgt_dict.pad())],
                               tgt_dict.encode_line(hyps[i], add_if_not_exist=False).long())


@pytest.mark.slow  # a real training run; the batch-level equalities above stay in the default suite
def test_fairseq_train_seq_word_kd_from_the_distilled_cache(distilled_folder, distilled_cache, tmp_path):
    proc = fairseq_train(distilled_folder, tmp_path / "ck", *STUDENT_ARCH, "--task", "translation_kd",
                         "--teacher-cache", distilled_cache, *SEQ_WORD_KD, "--max-epoch", "1", "--no-save")
    log = proc.stdout + proc.stderr
    assert "loaded teacher" not in log
    kinds = [(kind, int(epoch)) for kind, epoch, *_ in EPOCH_LINE.findall(log)]
    assert kinds == [("valid", 1), ("train", 1)], log[-2000:]


def test_a_cache_over_the_wrong_folder_is_a_clear_error(tiny_data, gold_cache, distilled_folder,
                                                        distilled_cache):
    """hybrid_kd reads the gold targets, Seq-KD + Word-KD the distilled ones: each with the
    other's cache is an error that names the folder the cache was built over."""
    with pytest.raises(KDError, match="was built over the --distilled-data folder .* build it with "
                                      "fairseq-kd cache-teacher DATA"):
        build_training(tiny_data / "bin", "--task", "translation_kd", "--teacher-cache", distilled_cache,
                       "--distilled-data", distilled_folder, *STUDENT_ARCH, *HYBRID)
    _, task, _, _ = build_training(distilled_folder, "--task", "translation_kd", "--teacher-cache",
                                   gold_cache, *STUDENT_ARCH, *SEQ_WORD_KD)
    message = (rf"built from the 'train' split of {re.escape(str(tiny_data / 'bin'))} \(600 "
               r"sentences / .* the data has 600 / .* seq_kd --word-kd-alpha: the distilled corpus")
    with pytest.raises(KDError, match=message):
        task.load_dataset("train")


def test_hybrid_kd_without_kd_topk_stops_at_start(tiny_data, gold_cache, tiny_distilled):
    """hybrid_kd's default --kd-topk 0 asks for the full distribution, which a cache lacks:
    an error when the criterion is built, before any data is read."""
    args = ["--task", "translation_kd", "--teacher-cache", gold_cache, "--distilled-data",
            tiny_distilled[0], *STUDENT_ARCH, "--criterion", "hybrid_kd"]
    with pytest.raises(KDError, match="--kd-topk 0 asks for the teacher's full distribution"):
        build_training(tiny_data / "bin", *args)
    # the complexity gate alone needs the teacher too; source length and no KL need none
    with pytest.raises(KDError, match="--kd-topk 0 asks"):
        build_training(tiny_data / "bin", *args, "--kd-alpha", "0")
    build_training(tiny_data / "bin", *args, "--kd-alpha", "0", "--gate-complexity", "source_length")
