"""Offline teacher cache: fairseq-kd cache-teacher + translation_kd --teacher-cache.

Every check compares the cache with the online teacher it replaces (same
dropout-free teacher, same top-k) or with an uninterrupted build.
"""
import helpers
import filecmp
import os
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import STUDENT_ARCH, build_training, fairseq_train, first_batch, run, tool
from fairseq_kd.errors import KDError
from fairseq_kd.teacher_cache import TeacherCache, split_files

WORD_KD = ["--criterion", "word_kd", "--kd-alpha", "0.5", "--label-smoothing", "0.1"]
BUILD = ["--splits", "train,valid", "--topk", "8", "--max-tokens", "1000", "--no-progress-bar"]


pytestmark = pytest.mark.usefixtures("one_thread")


def cache_teacher(data_bin, teacher, out, *args):
    return run([tool("fairseq-kd"), "cache-teacher", data_bin, "--teacher-path", teacher,
                "--out", out, *BUILD, *args])


@pytest.fixture(scope="module")
def cache32(tiny_data, tiny_teacher, tmp_path_factory):
    """A complete float32 cache of train and valid, built in one go."""
    out = tmp_path_factory.mktemp("cache") / "fp32"
    proc = cache_teacher(tiny_data / "bin", tiny_teacher, out, "--dtype", "float32")
    return out, proc.stdout


def online_and_cached(tiny_data, teacher, cache, *criterion_args):
    """(online task, cached task, student, online criterion, cached criterion)."""
    _, online, model, crit_online = build_training(
        tiny_data / "bin", "--task", "translation_kd", "--teacher-path", teacher,
        *STUDENT_ARCH, *criterion_args)
    _, cached, _, crit_cached = build_training(
        tiny_data / "bin", "--task", "translation_kd", "--teacher-cache", cache,
        *STUDENT_ARCH, *criterion_args)
    model.eval()  # no dropout: both criterions see the same student outputs
    return online, cached, model, crit_online, crit_cached


def test_build_reports_size_and_complete(cache32):
    out, stdout = cache32
    m = re.search(r"train: 600 sentences, ([\d,]+) target tokens, (\d+)/(\d+) batches done, "
                  r"([\d,]+) bytes \(([\d.]+) bytes per target token", stdout)
    assert m, stdout
    tokens, size = int(m.group(1).replace(",", "")), int(m.group(4).replace(",", ""))
    assert m.group(2) == m.group(3)
    # 8 uint16 ids + 8 float32 log-probs per token, plus per-sentence offsets/fingerprints
    assert 48 * tokens < size < 48 * tokens + 64 * 600 + 4096
    assert "complete" in stdout and "INCOMPLETE" not in stdout


@pytest.mark.parametrize("topk,temperature", [(8, 1.0), (4, 2.0)])
def test_cached_loss_equals_online_topk(tiny_data, tiny_teacher, cache32, topk, temperature):
    online, cached, model, crit_online, crit_cached = online_and_cached(
        tiny_data, tiny_teacher, cache32[0], *WORD_KD, "--kd-topk", topk,
        "--kd-temperature", temperature)
    for split in ("valid", "train"):
        sample = first_batch(online, split)
        loss_o, size_o, log_o = crit_online(model, sample)
        loss_c, size_c, log_c = crit_cached(model, first_batch(cached, split))
        assert log_o["kd_loss"] > 0
        assert loss_c.item() == pytest.approx(loss_o.item(), rel=1e-5)
        assert log_c["kd_loss"].item() == pytest.approx(log_o["kd_loss"].item(), rel=1e-5)
        assert size_c == size_o
    # gradients through the cached teacher equal those through the online one
    sample = first_batch(online, "valid")
    grads = []
    for crit in (crit_online, crit_cached):
        model.zero_grad()
        crit(model, sample)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    assert isinstance(cached.teacher, TeacherCache)  # the cache never loads a teacher


def test_shuffled_epochs_and_other_batching_read_the_right_rows(tiny_data, tiny_teacher, cache32):
    """Batches unlike the build's (other --max-tokens, shuffled, two epochs): every
    target token's cached log-probs are the online teacher's at the cached ids, and
    the cached ids are a top-8 of the online teacher."""
    online, cached, model, *_ = online_and_cached(
        tiny_data, tiny_teacher, cache32[0], *WORD_KD, "--kd-topk", "8")
    cached.load_dataset("train")
    dataset = cached.dataset("train")
    pad = cached.target_dictionary.pad()
    seen = 0
    for epoch, max_tokens in ((1, 500), (2, 1700)):  # the cache was built with 1000
        itr = cached.get_batch_iterator(dataset=dataset, max_tokens=max_tokens, seed=3,
                                        epoch=epoch, disable_iterator_cache=True)
        for sample in itr.next_epoch_itr(shuffle=True):
            dist = cached.teacher.distribution(sample, 8, like=model)
            [out] = online.teacher.forward(sample["net_input"], like=model)
            lp = F.log_softmax(out.logits.float(), -1).reshape(-1, out.logits.size(-1))
            real = sample["target"].reshape(-1).ne(pad)
            torch.testing.assert_close(dist.scores[real], lp[real].gather(-1, dist.index[real]),
                                       rtol=0, atol=1e-5)
            ninth = lp[real].topk(9, -1).values[:, 8]
            assert (dist.scores[real].min(-1).values >= ninth - 1e-5).all()
            seen += int(real.sum())
    assert seen == 2 * sum(int(s) for s in dataset.tgt_sizes)


def test_fp16_cache_is_close_and_smaller(tiny_data, tiny_teacher, cache32, tmp_path):
    proc = cache_teacher(tiny_data / "bin", tiny_teacher, tmp_path / "fp16")  # default dtype
    assert re.search(r"train: .* \(3[23]\.\d bytes per target token", proc.stdout), proc.stdout
    online, cached, model, crit_online, crit_cached = online_and_cached(
        tiny_data, tiny_teacher, tmp_path / "fp16", *WORD_KD, "--kd-topk", "8",
        "--kd-temperature", "2")
    sample = first_batch(online, "valid")
    _, _, log_o = crit_online(model, sample)
    _, _, log_c = crit_cached(model, first_batch(cached, "valid"))
    assert log_c["kd_loss"].item() == pytest.approx(log_o["kd_loss"].item(), rel=2e-3)


EPOCH_LINE = re.compile(r"\| (train|valid) \| epoch (\d+) \|(?: valid on '\w+' subset \|)? "
                        r"loss ([\d.]+) \| nll_loss ([\d.]+) \| kd_loss ([\d.]+)")


def test_fairseq_train_with_cache_matches_online_teacher(tiny_data, tiny_teacher, cache32, tmp_path):
    """fairseq-train shuffles and batches (--max-tokens 2000, not the build's 1000) on
    its own, over two epochs with validation; with dropout in the student only, the
    run from the cache must follow the online top-8 run."""
    args = [*STUDENT_ARCH, "--task", "translation_kd", *WORD_KD, "--kd-topk", "8",
            "--kd-temperature", "2", "--max-epoch", "2", "--no-save"]
    logs = {}
    for name, teacher in (("online", ["--teacher-path", tiny_teacher]),
                          ("cached", ["--teacher-cache", cache32[0]])):
        proc = fairseq_train(tiny_data / "bin", tmp_path / name, *args, *teacher)
        logs[name] = proc.stdout + proc.stderr
    assert "loaded teacher" in logs["online"] and "loaded teacher" not in logs["cached"]
    lines = {name: [(kind, int(epoch), *map(float, losses)) for kind, epoch, *losses
                    in EPOCH_LINE.findall(log)] for name, log in logs.items()}
    assert [l[:2] for l in lines["online"]] == [("valid", 1), ("train", 1), ("valid", 2),
                                                 ("train", 2)], logs["online"][-2000:]
    assert [l[:2] for l in lines["cached"]] == [l[:2] for l in lines["online"]], logs["cached"][-2000:]
    for a, b in zip(lines["online"], lines["cached"]):
        assert b[2:] == pytest.approx(a[2:], abs=2e-3)


def linked_copy(src, dest, replace=None):
    """dest/ with every file of src/ symlinked, except ``replace`` {name: source file}."""
    dest.mkdir(parents=True)
    replace = replace or {}
    for f in os.listdir(src):
        os.symlink(replace.get(f, src / f), dest / f)
    return dest


def test_reordered_data_is_a_one_line_error(tiny_data, tiny_teacher, cache32, tmp_path):
    """Same dictionary, same number of sentences and tokens, other order: caught on the
    first batch instead of training on shifted distributions."""
    pieces = tiny_data / "pieces"
    for lang in ("es", "en"):
        lines = (pieces / f"train.sp.{lang}").read_text(encoding="utf-8").splitlines()
        (tmp_path / f"train.sp.{lang}").write_text("\n".join(lines[::-1]) + "\n", encoding="utf-8")
    run([tool("fairseq-preprocess"), "-s", "es", "-t", "en", "--trainpref", tmp_path / "train.sp",
         "--srcdict", tiny_data / "bin/dict.es.txt", "--tgtdict", tiny_data / "bin/dict.en.txt",
         "--destdir", tmp_path / "rev", "--workers", "1"])
    data = tmp_path / "data"
    linked_copy(tiny_data / "bin", data, {f: tmp_path / "rev" / f for f in os.listdir(tmp_path / "rev")
                                          if f.startswith("train.")})
    proc = fairseq_train(data, tmp_path / "ck", *STUDENT_ARCH, "--task", "translation_kd",
                         "--teacher-cache", cache32[0], *WORD_KD, "--kd-topk", "8",
                         "--max-epoch", "1", check=False)
    msg = helpers.one_line_error(proc)
    assert "does not match this batch" in msg and "differ from the cached ones" in msg


def test_other_split_size_or_dictionary_is_an_error(tiny_data, cache32, tmp_path):
    bin_ = tiny_data / "bin"
    # train files replaced by the 60-sentence valid split
    small = linked_copy(bin_, tmp_path / "small", {
        f: bin_ / f.replace("train.", "valid.") for f in os.listdir(bin_) if f.startswith("train.")})
    _, task, _, _ = build_training(small, "--task", "translation_kd", "--teacher-cache", cache32[0],
                                   *STUDENT_ARCH, *WORD_KD, "--kd-topk", "8")
    with pytest.raises(KDError, match=r"built from the 'train' split of \S+ \(600 sentences "
                                      r".* the data has 60 /"):
        task.load_dataset("train")
    # same size, two symbols swapped
    lines = (bin_ / "dict.en.txt").read_text(encoding="utf-8").splitlines()
    lines[5], lines[6] = lines[6], lines[5]
    (tmp_path / "dict.en.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    swapped = linked_copy(bin_, tmp_path / "swapped", {"dict.en.txt": tmp_path / "dict.en.txt"})
    with pytest.raises(KDError, match="built with another target dictionary"):
        build_training(swapped, "--task", "translation_kd", "--teacher-cache", cache32[0],
                       *STUDENT_ARCH, *WORD_KD, "--kd-topk", "8")


def cached_training(tiny_data, cache, *args):
    return build_training(tiny_data / "bin", "--task", "translation_kd", "--teacher-cache", cache,
                          *STUDENT_ARCH, *args)


@pytest.mark.parametrize("topk,message", [
    ("0", r"--kd-topk 0 asks for the teacher's full distribution.*pass --kd-topk 8"),
    ("9", r"--kd-topk 9 is larger than the teacher cache's k = 8"),
])
def test_topk_the_cache_cannot_serve_is_an_error(tiny_data, cache32, topk, message):
    """When the criterion is built (before any data is read), and when a batch asks."""
    with pytest.raises(KDError, match=message):
        cached_training(tiny_data, cache32[0], *WORD_KD, "--kd-topk", topk)
    _, task, model, _ = cached_training(tiny_data, cache32[0], *WORD_KD, "--kd-topk", "8")
    with pytest.raises(KDError, match=message):
        task.teacher.distribution(first_batch(task), int(topk), like=model)


@pytest.mark.parametrize("criterion,kd_term", [
    (["--criterion", "ckd", "--ckd-beta", "0"], "word_loss"),
    (["--criterion", "a2d", "--a2d-beta", "0"], "kd_loss"),
])
def test_criterions_without_their_extra_term_read_the_cache(tiny_data, tiny_teacher, cache32,
                                                            criterion, kd_term):
    """ckd --ckd-beta 0 and a2d --a2d-beta 0 (= word_kd) need only distributions: the
    cache serves them."""
    args = ["--kd-alpha", "0.5", "--label-smoothing", "0.1", "--kd-topk", "8"]
    online, cached, model, word_online, _ = online_and_cached(
        tiny_data, tiny_teacher, cache32[0], "--criterion", "word_kd", *args)
    _, cached, _, kd_cached = cached_training(tiny_data, cache32[0], *criterion, *args)
    loss_o, _, log_o = word_online(model, first_batch(online))
    loss_c, _, log_c = kd_cached(model, first_batch(cached))
    assert log_o["kd_loss"] > 0
    assert loss_c.item() == pytest.approx(loss_o.item(), rel=1e-5)
    assert log_c[kd_term].item() == pytest.approx(log_o["kd_loss"].item(), rel=1e-5)
    assert isinstance(cached.teacher, TeacherCache)


def test_criterions_needing_the_teacher_model_are_errors(tiny_data, tiny_teacher, cache32):
    needs_model = "needs the teacher model itself .* pass --teacher-path instead"
    with pytest.raises(KDError, match=needs_model):
        cached_training(tiny_data, cache32[0], "--criterion", "ckd", "--kd-topk", "8")
    with pytest.raises(KDError, match=needs_model):
        cached_training(tiny_data, cache32[0], "--criterion", "a2d", "--kd-topk", "8")
    with pytest.raises(KDError, match="--teacher-path or --teacher-cache, not both"):
        cached_training(tiny_data, cache32[0], "--teacher-path", tiny_teacher, *WORD_KD)


def test_missing_cache_dir_is_a_one_line_error(tiny_data, tmp_path):
    proc = fairseq_train(tiny_data / "bin", tmp_path / "ck", *STUDENT_ARCH, "--task", "translation_kd",
                         "--teacher-cache", tmp_path / "nope", *WORD_KD, "--max-epoch", "1",
                         check=False)
    assert "--teacher-cache: no such directory" in helpers.one_line_error(proc)


def build_batches(tiny_data, teacher, split="train"):
    """The build's batches (lists of dataset indices), as cache-teacher computes them."""
    from fairseq_kd.teacher import Teacher
    from fairseq_kd.teacher_cache_build import BuildSpec, data_task, split_batches

    task = data_task(BuildSpec(data=str(tiny_data / "bin"), teacher_path=str(teacher), out="",
                               splits=[split]))
    task.load_dataset(split, combine=True)
    return split_batches(task, Teacher([str(teacher)], task), split, 1000, None)


def test_interrupted_build_resumes_to_a_byte_identical_cache(tiny_data, tiny_teacher, cache32, tmp_path):
    out = tmp_path / "resumed"
    proc = cache_teacher(tiny_data / "bin", tiny_teacher, out, "--dtype", "float32",
                         "--max-batches", "20")
    assert "INCOMPLETE" in proc.stdout and "train: 600 sentences" in proc.stdout
    _, task, _, _ = cached_training(tiny_data, out, *WORD_KD, "--kd-topk", "8")
    with pytest.raises(KDError, match=r"split 'train' is incomplete \(20/\d+ batches done\)"):
        task.load_dataset("train")
    # Model a crash: the last batch was written but not marked done, and the rows of
    # every batch not done hold garbage (half-written data).  Only "done" is trusted.
    files = split_files(out, "train")
    done = np.load(files["done"], mmap_mode="r+")
    assert int(done.sum()) == 20
    done[np.flatnonzero(done)[-1]] = 0
    done.flush()
    batches = build_batches(tiny_data, tiny_teacher)
    offsets = np.load(files["offsets"])
    trusted = np.zeros(offsets[-1], dtype=bool)
    trusted_ids = np.concatenate([batches[b] for b in np.flatnonzero(done)])
    for i in trusted_ids:
        trusted[offsets[i]:offsets[i + 1]] = True
    for name in ("index", "logprobs", "fingerprints"):
        a = np.load(files[name], mmap_mode="r+")
        keep = trusted if name != "fingerprints" else np.isin(np.arange(len(a)), trusted_ids)
        a[~keep] = 7
        a.flush()
        del a
    cache_teacher(tiny_data / "bin", tiny_teacher, out, "--dtype", "float32", "--workers", "2")
    names = sorted(f for f in os.listdir(cache32[0]) if not f.startswith("."))
    assert names == sorted(f for f in os.listdir(out) if not f.startswith("."))
    assert len(names) == 11  # meta.json + 5 arrays for each of 2 splits
    match, mismatch, errors = filecmp.cmpfiles(cache32[0], out, names, shallow=False)
    assert not mismatch and not errors, mismatch


def test_resume_with_other_settings_is_an_error(tiny_data, tiny_teacher, cache32, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(cache32[0], out)
    proc = run([tool("fairseq-kd"), "cache-teacher", tiny_data / "bin", "--teacher-path", tiny_teacher,
                "--out", out, *BUILD, "--dtype", "float16"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds a cache built with other settings (score_dtype" in proc.stderr
