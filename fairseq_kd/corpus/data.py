"""The binarized split a corpus is built from, and how its lines are cut into chunks, shards and batches."""
import os

from fairseq_kd.errors import require


def chunk_ranges(n_lines, chunk_size):
    """[(start, end)] of consecutive chunks covering lines 0..n_lines-1."""
    return [(s, min(s + chunk_size, n_lines)) for s in range(0, n_lines, chunk_size)]


def shard_chunks(n_chunks, num_shards, shard_id):
    """Chunk ids of one shard: a contiguous block, sizes differing by at most one."""
    base, extra = divmod(n_chunks, num_shards)
    start = shard_id * base + min(shard_id, extra)
    return list(range(start, start + base + (shard_id < extra)))


def length_sorted_batches(indices, sizes, max_tokens, max_sentences):
    """Batches of ``indices`` sorted by length, each padded size <= max_tokens.

    Like fairseq's batching: sorting by length makes padding and the number of
    beam-search steps per batch small.
    """
    batches, current, longest = [], [], 0
    for i in sorted(indices, key=lambda i: (sizes[i], i)):
        longest_if_added = max(longest, sizes[i])
        if current and (longest_if_added * (len(current) + 1) > max_tokens
                        or len(current) >= max_sentences):
            batches.append(current)
            current, longest_if_added = [], sizes[i]
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def pair_prefix(data, split, src, tgt):
    """DATA/SPLIT.SRC-TGT or DATA/SPLIT.TGT-SRC, whichever fairseq-preprocess wrote."""
    from fairseq.data import indexed_dataset

    for a, b in ((src, tgt), (tgt, src)):
        prefix = os.path.join(data, f"{split}.{a}-{b}")
        if indexed_dataset.dataset_exists(f"{prefix}.{src}", impl=None):
            return prefix
    expected = os.path.join(data, f"{split}.{src}-{tgt}.{src}.bin")
    require(False, f"no binarized split '{split}' for {src}-{tgt} in {data} (expected {expected})")


class SplitData:
    """Source (and gold target, when present) of a binarized split, with its dictionaries."""

    def __init__(self, args):
        from fairseq.data import Dictionary, data_utils, indexed_dataset

        require(os.path.isdir(args.data), f"data folder not found: {args.data}")
        src, tgt = args.source_lang, args.target_lang
        for lang in (src, tgt):
            require(os.path.isfile(os.path.join(args.data, f"dict.{lang}.txt")),
                    f"missing dictionary {os.path.join(args.data, f'dict.{lang}.txt')}")
        self.src_dict = Dictionary.load(os.path.join(args.data, f"dict.{src}.txt"))
        self.tgt_dict = Dictionary.load(os.path.join(args.data, f"dict.{tgt}.txt"))
        self.prefix = pair_prefix(args.data, args.split, src, tgt)
        self.src = data_utils.load_indexed_dataset(f"{self.prefix}.{src}", self.src_dict)
        self.tgt = (data_utils.load_indexed_dataset(f"{self.prefix}.{tgt}", self.tgt_dict)
                    if indexed_dataset.dataset_exists(f"{self.prefix}.{tgt}", impl=None) else None)
        if self.tgt is not None:
            require(len(self.tgt) == len(self.src),
                    f"{self.prefix}: {len(self.src)} source but {len(self.tgt)} target lines")
        self.sizes = self.src.sizes

    def __len__(self):
        return len(self.src)

    def reference(self, i, post_process=None):
        require(self.tgt is not None, f"{self.prefix}.{{bin,idx}}: no gold target side, "
                "needed by --select inter (--seq-inter) and --long-inputs reference")
        return self.tgt_dict.string(self.tgt[i], post_process, escape_unk=post_process is not None)
