"""--distilled-data: gold and teacher targets of the same sentences in one batch; clear errors."""
import pytest
import torch

import helpers
from fairseq_kd.errors import KDError
from helpers import STUDENT_ARCH, build_training, fairseq_train, first_batch, gold_sources


def task_with(tiny_data, distilled, *args):
    _, task, _, _ = build_training(tiny_data / "bin", "--task", "translation_kd",
                                   "--distilled-data", distilled, *STUDENT_ARCH, *args)
    return task


def test_batches_carry_the_teacher_translation_of_each_sentence(tiny_data, tiny_distilled):
    distilled, hyps = tiny_distilled
    task = task_with(tiny_data, distilled)
    sample = first_batch(task, "train", max_tokens=2000)
    d = sample["distilled"]
    tgt_dict, pad, eos = task.tgt_dict, task.tgt_dict.pad(), task.tgt_dict.eos()
    gold_lines = (tiny_data / "pieces" / "train.sp.en").read_text(encoding="utf-8").splitlines()
    for row, i in enumerate(sample["id"].tolist()):
        hyp = d["target"][row][d["target"][row].ne(pad)]
        assert torch.equal(hyp, tgt_dict.encode_line(hyps[i], add_if_not_exist=False).long())
        gold = sample["target"][row][sample["target"][row].ne(pad)]
        assert torch.equal(gold, tgt_dict.encode_line(gold_lines[i], add_if_not_exist=False).long())
        prev = d["prev_output_tokens"][row][: len(hyp)]
        assert prev[0] == eos and torch.equal(prev[1:], hyp[:-1])  # teacher forcing on y_hat
    assert d["ntokens"] == int(d["target"].ne(pad).sum())
    # batching counts the longer of the two targets
    dataset = task.dataset("train")
    for i in range(50):
        expected = max(dataset.dataset.src_sizes[i], dataset.dataset.tgt_sizes[i], len(hyps[i].split()) + 1)
        assert dataset.num_tokens(i) == expected
    itr = task.get_batch_iterator(dataset=dataset, max_tokens=600, seed=1,
                               disable_iterator_cache=True).next_epoch_itr(shuffle=True)
    for b in itr:
        longest = max(b["net_input"]["src_tokens"].size(1), b["target"].size(1),
                      b["distilled"]["target"].size(1))
        assert b["target"].size(0) * longest <= 600
    # splits the distilled folder lacks keep their gold targets only
    assert "distilled" not in first_batch(task, "valid")


def test_count_mismatch_is_a_clear_error(tiny_data, tiny_distilled, tiny_teacher, tmp_path):
    _, hyps = tiny_distilled
    short = helpers.make_distilled_data(tiny_data, tmp_path / "short", gold_sources(tiny_data)[:-1], hyps[:-1])
    with pytest.raises(KDError, match="has 599 sentence pairs but .* has 600"):
        task_with(tiny_data, short).load_dataset("train")
    proc = fairseq_train(tiny_data / "bin", tmp_path / "ck", *STUDENT_ARCH, "--task", "translation_kd",
                         "--teacher-path", tiny_teacher, "--distilled-data", short,
                         "--criterion", "hybrid_kd", "--max-epoch", "1", check=False)
    assert "has 599 sentence pairs" in helpers.one_line_error(proc)


def test_source_mismatch_is_a_clear_error(tiny_data, tiny_distilled, tmp_path):
    _, hyps = tiny_distilled
    sources = gold_sources(tiny_data)
    sources[7] = " ".join(reversed(sources[7].split()))  # same length, other tokens
    bad = helpers.make_distilled_data(tiny_data, tmp_path / "bad", sources, hyps)
    with pytest.raises(KDError, match=r"source sentence 7 \(0-based\) differs"):
        task_with(tiny_data, bad).load_dataset("train")
    with pytest.raises(KDError, match="folder not found"):
        task_with(tiny_data, tmp_path / "nowhere")
