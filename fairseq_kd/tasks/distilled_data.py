"""Gold and distilled targets of the same source, batched together.

``translation_kd --distilled-data DIR`` reads a second fairseq-binarized
corpus whose split is line-aligned with the gold data's (same sources, same
order, target = the teacher's translation y_hat, as ``fairseq-kd corpus``
writes).  :class:`DistilledPairDataset` wraps the gold
:class:`~fairseq.data.LanguagePairDataset` so that every batch carries, for
the same sentences in the same order,

    sample["target"], sample["net_input"]["prev_output_tokens"]   (gold y)
    sample["distilled"]["target"], ["prev_output_tokens"]        (teacher's y_hat)
    sample["distilled"]["ntokens"]

Batching, ordering and ``--max-positions`` filtering use the longer of the two
targets, since a criterion runs the decoder on both.
"""
import json
import os

import numpy as np
import torch
from fairseq.data import BaseWrapperDataset, FairseqDataset, data_utils
from fairseq.data.indexed_dataset import MMapIndexedDataset

from fairseq_kd.errors import require


class DistilledPairDataset(BaseWrapperDataset):
    """A gold LanguagePairDataset plus the distilled target of each index."""

    def __init__(self, gold, distilled_tgt):
        super().__init__(gold)
        require(len(gold) == len(distilled_tgt), "internal: gold/distilled lengths differ")
        self.distilled = distilled_tgt
        self.distilled_sizes = np.asarray(distilled_tgt.sizes)
        gold_tgt = gold.tgt_sizes if gold.tgt_sizes is not None else 0
        self.max_tgt_sizes = np.maximum(gold_tgt, self.distilled_sizes)

    def __getitem__(self, index):
        item = self.dataset[index]
        hyp = self.distilled[index]
        eos = self.dataset.eos
        if hyp.numel() == 0 or hyp[-1] != eos:  # same convention as the gold target
            hyp = torch.cat([hyp, hyp.new_tensor([eos])])
        item["distilled"] = hyp
        return item

    def collater(self, samples, pad_to_length=None):
        batch = self.dataset.collater(samples, pad_to_length=pad_to_length)
        if not batch:
            return batch
        # the gold collater reorders by source length; follow its "id" order
        by_id = {s["id"]: s["distilled"] for s in samples}
        hyps = [by_id[int(i)] for i in batch["id"]]
        ds = self.dataset
        pad, eos = ds.tgt_dict.pad(), ds.eos
        merge = dict(pad_idx=pad, eos_idx=eos, left_pad=ds.left_pad_target,
                     pad_to_multiple=ds.pad_to_multiple)
        batch["distilled"] = {
            "target": data_utils.collate_tokens(hyps, **merge),
            "prev_output_tokens": data_utils.collate_tokens(hyps, move_eos_to_beginning=True, **merge),
            "ntokens": sum(len(h) for h in hyps),
        }
        return batch

    # -- batching by the longer of the two targets -----------------------
    @property
    def sizes(self):
        return np.vstack((self.dataset.src_sizes, self.max_tgt_sizes)).T

    def num_tokens(self, index):
        return max(self.dataset.src_sizes[index], self.max_tgt_sizes[index])

    def num_tokens_vec(self, indices):
        return np.maximum(self.dataset.src_sizes[indices], self.max_tgt_sizes[indices])

    def size(self, index):
        return (self.dataset.src_sizes[index], self.max_tgt_sizes[index])

    def ordered_indices(self):
        if self.dataset.shuffle:
            indices = np.random.permutation(len(self)).astype(np.int64)
        else:
            indices = np.arange(len(self), dtype=np.int64)
        indices = indices[np.argsort(self.max_tgt_sizes[indices], kind="mergesort")]
        return indices[np.argsort(self.dataset.src_sizes[indices], kind="mergesort")]

    def filter_indices_by_size(self, indices, max_sizes):
        return data_utils.filter_paired_dataset_indices_by_size(
            self.dataset.src_sizes, self.max_tgt_sizes, indices, max_sizes)

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None,
                      required_batch_size_multiple=1):
        # BaseWrapperDataset would batch by the gold sizes only
        return FairseqDataset.batch_by_size(
            self, indices, max_tokens=max_tokens, max_sentences=max_sentences,
            required_batch_size_multiple=required_batch_size_multiple)

    def prefetch(self, indices):
        self.dataset.prefetch(indices)
        self.distilled.prefetch(indices)

    @property
    def supports_prefetch(self):
        return self.dataset.supports_prefetch and getattr(self.distilled, "supports_prefetch", False)


def _first_token_mismatch(a, b):
    """Index of the first sentence whose tokens differ (sizes already equal), or None.

    Compares the whole memory-mapped token buffers at once when both sides
    are plain fairseq mmap datasets (millions of lines in seconds); falls
    back to a sentence-by-sentence loop otherwise.
    """
    if isinstance(a, MMapIndexedDataset) and isinstance(b, MMapIndexedDataset) \
            and a._index.dtype == b._index.dtype:
        ta = np.frombuffer(a._bin_buffer, dtype=a._index.dtype)
        tb = np.frombuffer(b._bin_buffer, dtype=b._index.dtype)
        if ta.shape == tb.shape:
            diff = np.flatnonzero(ta != tb)
            if diff.size == 0:
                return None
            ends = np.cumsum(a.sizes)
            return int(np.searchsorted(ends, diff[0], side="right"))
    for i in range(len(a)):
        if not torch.equal(a[i], b[i]):
            return i
    return None


def check_one_pair_per_line(distilled_dir, split, where):
    """Refuse a corpus ``fairseq-kd corpus`` wrote with --keep n or --filter (its report says so).

    Such a corpus has several pairs for a source or none: its lines no
    longer follow the gold data's, which a distilled target must (it is
    batched with the gold target of the same line).
    """
    report_file = os.path.join(distilled_dir, f"{split}.report.json")
    if not os.path.isfile(report_file):
        return
    with open(report_file) as f:
        report = json.load(f)
    pairs, sources = report.get("pairs"), report.get("sources")
    require(pairs is None or pairs == sources and not report.get("filtered"),
            f"{where} holds {pairs} pairs for {sources} sources (fairseq-kd corpus --keep "
            f"{report.get('keep', 1)} --filter {report.get('filter', 'none')}): --distilled-data needs "
            "one teacher target per gold line; write it with --keep 1 --filter none, or train on it alone")


def check_aligned(gold, distilled, split, data_dir, distilled_dir):
    """The distilled corpus must hold the gold corpus's sources, line by line."""
    where = f"--distilled-data {distilled_dir} ({split} split)"
    check_one_pair_per_line(distilled_dir, split, where)
    require(
        len(gold) == len(distilled),
        f"{where} has {len(distilled)} sentence pairs but {data_dir} has {len(gold)}: "
        f"the distilled corpus must translate exactly the training sources, in order",
    )
    size_diff = np.flatnonzero(np.asarray(gold.src_sizes) != np.asarray(distilled.src_sizes))
    bad = int(size_diff[0]) if size_diff.size else _first_token_mismatch(gold.src, distilled.src)
    require(
        bad is None,
        f"{where} does not line up with {data_dir}: source sentence {bad} (0-based) differs; "
        f"the distilled corpus must translate exactly the training sources, in order",
    )
