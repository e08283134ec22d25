"""Offline teacher cache: the teacher's top-k distributions, computed once.

``fairseq-kd cache-teacher`` runs the teacher (or ensemble) over binarized
splits on gold prefixes and stores, for every target token, its k most
probable token ids and their **T=1 log-probabilities** (log of the ensemble's
averaged probabilities), sorted best first.  ``translation_kd --teacher-cache
DIR`` then serves ``TeacherDistribution(scores=log-probs, index=ids)`` for each
batch; the loss applies the temperature as ``softmax(scores / T)`` over the k
tokens, which equals the online top-k teacher at temperature T exactly
(softmax is invariant to the shift by log Z), so one cache serves every T
and every ``--kd-topk`` up to k (the top of the cached k).

Layout of a cache directory (one set of ``.npy`` files per split, memory-mapped):

* ``meta.json``: format version, k, dtypes, what the cache was built from
  (teacher paths and sha256, dictionary checksums, batching) and, per
  split, the number of sentences, target tokens and build batches;
* ``SPLIT.offsets.npy`` (n+1, int64): sentence i's target tokens (EOS
  included, as fairseq's targets) are rows ``offsets[i]:offsets[i+1]``;
  i is the fairseq dataset index, ``sample["id"]``;
* ``SPLIT.fingerprints.npy`` (n, 2, int64): hashes of sentence i's source
  and target tokens (-1: not cached, e.g. longer than the teacher allows);
* ``SPLIT.index.npy`` (rows, k): token ids, uint16 when the vocabulary fits;
* ``SPLIT.logprobs.npy`` (rows, k): T=1 log-probabilities, float16 or float32;
* ``SPLIT.done.npy`` (batches, uint8): build batches written and flushed.

Alignment is checked twice: when a split is loaded (sentence and token
counts, dictionaries) and on every batch (each sentence's source and target
fingerprints and length at its dataset index), so a cache built from other
data is an error, never a silently shifted alignment.

The build is resumable and shardable: batches are fixed by the data and
``--max-tokens``/``--batch-size`` (fairseq's own size-sorted batching, no
shuffling), shard s of S computes the batches b with ``b % S == s``, writes
their rows, flushes, then marks them done; a rerun skips done batches.  Each
batch is computed with the same composition whatever the sharding, so a
resumed build is byte-identical to an uninterrupted one (same device, dtype
and thread count).
"""
import contextlib
import fcntl
import hashlib
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from fairseq_kd.atomic_io import write_atomic
from fairseq_kd.errors import require
from fairseq_kd.losses import TeacherDistribution, ensemble_scores


FORMAT_VERSION = 1
META = "meta.json"
ARRAYS = ("offsets", "fingerprints", "index", "logprobs", "done")
SCORE_DTYPES = {"float16": np.float16, "float32": np.float32}

# Polynomial hash of a token sequence modulo a Mersenne prime: every product
# stays below 2^62 and every sum of up to 2^31 terms below 2^63 (no overflow).
_HASH_MOD = 2**31 - 1
_HASH_BASE = 1_000_003
_powers = torch.ones(1, dtype=torch.long)


def _hash_powers(length):
    global _powers
    if _powers.numel() < length:
        p = [1]
        for _ in range(length - 1):
            p.append(p[-1] * _HASH_BASE % _HASH_MOD)
        _powers = torch.tensor(p, dtype=torch.long)
    return _powers[:length]


def token_fingerprints(tokens, pad):
    """(B,) int64 hash of each row's non-padding tokens in order, padding side ignored."""
    tokens = tokens.detach().cpu().long()
    mask = tokens.ne(pad)
    pos = (mask.long().cumsum(1) - 1).clamp_min(0)
    terms = ((tokens + 1) % _HASH_MOD) * _hash_powers(tokens.size(1))[pos] % _HASH_MOD
    return (terms * mask).sum(1) % _HASH_MOD


def batch_fingerprints(sample, src_pad, tgt_pad):
    """(B, 2) source and target fingerprints of a collated batch, in its row order."""
    return torch.stack([token_fingerprints(sample["net_input"]["src_tokens"], src_pad),
                        token_fingerprints(sample["target"], tgt_pad)], 1).numpy()


def target_rows(first_rows, mask):
    """Cache row of every target position: (B, L) int64 from (B,) first rows and the
    (B, L) non-padding mask.  Padding positions get their sentence's first row
    (a finite distribution; the loss masks them)."""
    pos = np.maximum(mask.cumsum(1) - 1, 0)
    return first_rows[:, None] + np.where(mask, pos, 0)


def dictionary_checksum(d):
    return hashlib.sha256("\n".join(d.symbols).encode("utf-8")).hexdigest()


def file_sha256(path, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def index_dtype(vocab_size):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def bytes_per_token(k, vocab_size, score_dtype):
    return k * (np.dtype(index_dtype(vocab_size)).itemsize + np.dtype(SCORE_DTYPES[score_dtype]).itemsize)


def split_files(directory, split):
    return {name: os.path.join(directory, f"{split}.{name}.npy") for name in ARRAYS}


def read_meta(directory):
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_meta(directory, meta):
    """Atomic: a reader sees the old or the new file, never half of one."""
    write_atomic(os.path.join(directory, META), json.dumps(meta, indent=1, sort_keys=True))


@contextlib.contextmanager
def directory_lock(directory):
    """Exclusive lock, so that shards started together initialise the cache once."""
    with open(os.path.join(directory, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------- reading
class _CachedSplit:
    """The memory-mapped arrays of one complete split."""

    def __init__(self, directory, split, info):
        files = split_files(directory, split)
        for name, path in files.items():
            require(os.path.isfile(path), f"teacher cache {directory}: missing {os.path.basename(path)}")
        done = np.load(files["done"])
        require(bool(done.all()),
                f"teacher cache {directory}: split '{split}' is incomplete ({int(done.sum())}/"
                f"{done.size} batches done); finish it by rerunning the same fairseq-kd "
                f"cache-teacher command (it resumes)")
        self.name = split
        self.n_sentences, self.n_tokens = info["sentences"], info["tokens"]
        self.offsets = np.load(files["offsets"])
        self.fingerprints = np.load(files["fingerprints"])
        self.index = np.load(files["index"], mmap_mode="r")
        self.logprobs = np.load(files["logprobs"], mmap_mode="r")

    def mismatch(self, ids, fingerprints, lengths):
        """None if the batch's sentences are the cached ones at their ids, else why not."""
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_sentences):
            return f"sentence id {int(ids.max())} is out of range ({self.n_sentences} sentences cached)"
        cached = self.fingerprints[ids]
        bad = np.flatnonzero((cached != fingerprints).any(1)
                             | (self.offsets[ids + 1] - self.offsets[ids] != lengths))
        if bad.size == 0:
            return None
        i = int(ids[bad[0]])
        if (cached[bad[0]] == -1).all():
            return f"sentence {i} was not cached (longer than the teacher's maximum positions?)"
        return (f"{bad.size} of {ids.size} sentences differ from the cached ones "
                f"(first: sentence {i}, source or target tokens or length)")


class TeacherCache:
    """Read side of a cache directory, used by ``translation_kd --teacher-cache``."""

    def __init__(self, directory):
        require(os.path.isdir(directory), f"--teacher-cache: no such directory: {directory}")
        meta = read_meta(directory)
        require(meta is not None, f"--teacher-cache {directory}: no {META}; build the cache "
                f"with fairseq-kd cache-teacher")
        require(meta.get("format") == FORMAT_VERSION,
                f"--teacher-cache {directory}: format {meta.get('format')}, this fairseq_kd "
                f"reads format {FORMAT_VERSION}; rebuild the cache")
        self.directory, self.meta, self.k = directory, meta, int(meta["k"])
        self._splits = {}
        self._last = None  # split that matched the previous batch: tried first

    @property
    def splits(self):
        return sorted(self.meta["splits"])

    def check_dictionaries(self, src_dict, tgt_dict):
        for side, d in (("source", src_dict), ("target", tgt_dict)):
            rec = self.meta["dictionaries"][side]
            require(rec["sha256"] == dictionary_checksum(d),
                    f"teacher cache {self.directory} was built with another {side} dictionary "
                    f"({rec['size']} entries, sha256 {rec['sha256'][:12]}) than the training "
                    f"data's ({len(d)} entries, sha256 {dictionary_checksum(d)[:12]}); rebuild "
                    f"the cache on this data")

    def check_dataset(self, split, dataset):
        """A loaded split must be the one the cache was built from (sizes, completeness)."""
        require(split in self.meta["splits"],
                f"teacher cache {self.directory} has no split '{split}' (it holds: "
                f"{', '.join(self.splits)}); build it with fairseq-kd cache-teacher --splits "
                f"{','.join(self.splits + [split])}" + (" (or train with --disable-validation)"
                                                         if split != "train" else ""))
        info = self.meta["splits"][split]
        tgt_sizes = getattr(dataset, "tgt_sizes", None)
        require(tgt_sizes is not None, f"split '{split}' has no target side: nothing to distil")
        n, tokens = len(dataset), int(np.asarray(tgt_sizes, dtype=np.int64).sum())
        require(n == info["sentences"] and tokens == info["tokens"],
                f"teacher cache {self.directory} was built from a '{split}' split of "
                f"{info['sentences']:,} sentences / {info['tokens']:,} target tokens, the data "
                f"has {n:,} / {tokens:,}: rebuild the cache on this data")
        self._open(split)

    def _open(self, split):
        if split not in self._splits:
            self._splits[split] = _CachedSplit(self.directory, split, self.meta["splits"][split])
        return self._splits[split]

    def _matching_split(self, ids, fingerprints, lengths):
        order = sorted(self.meta["splits"], key=lambda s: (s != self._last, s != "train", s))
        reasons = []
        for name in order:
            why = self._open(name).mismatch(ids, fingerprints, lengths)
            if why is None:
                self._last = name
                return self._splits[name]
            reasons.append(f"split '{name}': {why}")
        require(False, f"teacher cache {self.directory} does not match this batch: "
                f"{'; '.join(reasons)}. The cache was built from other data or other "
                f"data options (--truncate-source, ...): rebuild it")

    def distribution(self, sample, topk, src_pad, tgt_pad) -> TeacherDistribution:
        """The cached top-``topk`` teacher distribution for every target position
        of ``sample`` (rows follow ``target.view(-1)``), on the target's device."""
        require(topk > 0, f"--kd-topk 0 asks for the teacher's full distribution, but the "
                f"teacher cache holds its top {self.k}: pass --kd-topk {self.k} (or less)")
        require(topk <= self.k, f"--kd-topk {topk} is larger than the teacher cache's k = "
                f"{self.k}: pass --kd-topk {self.k} or less, or rebuild the cache with --topk {topk}")
        target = sample["target"]
        mask = target.detach().ne(tgt_pad).cpu().numpy()
        ids = sample["id"].detach().cpu().numpy().astype(np.int64)
        split = self._matching_split(ids, batch_fingerprints(sample, src_pad, tgt_pad),
                                     mask.sum(1))
        rows = target_rows(split.offsets[ids], mask).reshape(-1)
        # rows are sorted best-first, so the top ``topk`` are the first columns
        index = torch.from_numpy(split.index[rows, :topk].astype(np.int64))
        scores = torch.from_numpy(split.logprobs[rows, :topk].astype(np.float32))
        return TeacherDistribution(scores.to(target.device), index.to(target.device))


# ---------------------------------------------------------------------- building
def teacher_topk(task, sample, k):
    """(B, L, k) T=1 log-probs and token ids of the teacher's k best tokens."""
    # the first teacher stands in for the student: it fixes device and dtype
    outputs = task.teacher_forward(task.teachers[0], sample["net_input"])
    scores = ensemble_scores([o.logits for o in outputs]).float()
    return F.log_softmax(scores, dim=-1).topk(k, dim=-1)


def build_signature(task, k, score_dtype, max_tokens, batch_size):
    """What a cache is built from; a resumed or extended build must match it."""
    from fairseq_kd.tasks.translation_kd import teacher_paths

    paths = teacher_paths(task.cfg.teacher_path)
    return {
        "format": FORMAT_VERSION,
        "k": int(k),
        "score_dtype": score_dtype,
        "index_dtype": np.dtype(index_dtype(len(task.target_dictionary))).name,
        "teachers": [{"path": os.path.abspath(p), "sha256": file_sha256(p)} for p in paths],
        "dictionaries": {
            side: {"lang": lang, "size": len(d), "sha256": dictionary_checksum(d)}
            for side, lang, d in (("source", task.cfg.source_lang, task.source_dictionary),
                                  ("target", task.cfg.target_lang, task.target_dictionary))
        },
        "batching": {"max_tokens": max_tokens, "batch_size": batch_size},
        "data": os.path.abspath(task.cfg.data),
    }


def check_signature(directory, old, new):
    for key in new:
        if key == "data":
            continue  # the data may have moved; its content is checked by the split sizes
        if key == "teachers":
            same = [t["sha256"] for t in old.get(key, [])] == [t["sha256"] for t in new[key]]
        else:
            same = old.get(key) == new[key]
        require(same, f"{directory} holds a cache built with other settings ({key}: "
                f"{old.get(key)} there, {new[key]} now); use another --out directory or "
                f"delete this one")


def split_batches(task, split, max_tokens, batch_size):
    """fairseq's size-sorted batches (lists of dataset indices) of a split, unshuffled."""
    from fairseq import utils

    dataset = task.dataset(split)
    max_positions = utils.resolve_max_positions(
        task.max_positions(), *[t.max_positions() for t in task.teachers])
    itr = task.get_batch_iterator(
        dataset=dataset, max_tokens=max_tokens, max_sentences=batch_size,
        max_positions=max_positions, ignore_invalid_inputs=True, seed=1,
        disable_iterator_cache=True,
    )
    return [np.asarray(b, dtype=np.int64) for b in itr.frozen_batches]


def batches_checksum(batches):
    h = hashlib.sha256()
    for b in batches:
        h.update(b.tobytes())
        h.update(b"|")
    return h.hexdigest()


def init_split(directory, split, signature, dataset, batches, vocab_size):
    """Create the split's files (or check that existing ones are this build's)."""
    k = signature["k"]
    offsets = np.zeros(len(dataset) + 1, dtype=np.int64)
    np.cumsum(np.asarray(dataset.tgt_sizes, dtype=np.int64), out=offsets[1:])
    info = {"sentences": len(dataset), "tokens": int(offsets[-1]), "batches": len(batches),
            "batches_sha256": batches_checksum(batches),
            "uncached_sentences": len(dataset) - int(sum(b.size for b in batches))}
    with directory_lock(directory):
        meta = read_meta(directory)
        if meta is not None:
            check_signature(directory, meta, signature)
            if split in meta["splits"]:
                old = meta["splits"][split]
                require(old == info, f"{directory}: split '{split}' was started on other data "
                        f"or batches ({old}) than now ({info}); use another --out directory")
                return info
        files = split_files(directory, split)
        np.save(files["offsets"], offsets)
        rows = info["tokens"]
        open_memmap = np.lib.format.open_memmap
        fp = open_memmap(files["fingerprints"], "w+", np.int64, (len(dataset), 2))
        fp[:] = -1
        fp.flush()
        for name, dtype in (("index", index_dtype(vocab_size)),
                            ("logprobs", SCORE_DTYPES[signature["score_dtype"]])):
            open_memmap(files[name], "w+", dtype, (rows, k)).flush()  # zero-filled (sparse)
        open_memmap(files["done"], "w+", np.uint8, (len(batches),)).flush()
        meta = meta or dict(signature, splits={})
        meta["splits"][split] = info
        write_meta(directory, meta)  # written last: a split in meta.json has all its files
    return info


def build_split_shard(task, directory, split, batches, k, shard_id=0, num_shards=1,
                      max_batches=None, progress=True):
    """Compute and store this shard's batches that are not done yet; returns how many
    batches this call computed."""
    from fairseq import utils
    from tqdm import tqdm

    files = split_files(directory, split)
    dataset = task.dataset(split)
    offsets = np.load(files["offsets"])
    fingerprints = np.load(files["fingerprints"], mmap_mode="r+")
    index = np.load(files["index"], mmap_mode="r+")
    logprobs = np.load(files["logprobs"], mmap_mode="r+")
    done = np.load(files["done"], mmap_mode="r+")
    mine = [b for b in range(shard_id, len(batches), num_shards)]
    todo = [b for b in mine if not done[b]]
    device = next(task.teachers[0].parameters()).device
    src_pad, tgt_pad = task.source_dictionary.pad(), task.target_dictionary.pad()
    computed = 0
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), disable=not progress,
               desc=f"{split} shard {shard_id + 1}/{num_shards}", unit="batch", position=shard_id)
    for b in todo:
        if max_batches is not None and computed >= max_batches:
            break
        sample = dataset.collater([dataset[int(i)] for i in batches[b]])
        if device.type == "cuda":
            sample = utils.move_to_cuda(sample, device=device)
        with torch.no_grad():
            top_lp, top_idx = teacher_topk(task, sample, k)
        mask = sample["target"].ne(tgt_pad).cpu().numpy()
        ids = sample["id"].cpu().numpy().astype(np.int64)
        rows = target_rows(offsets[ids], mask)[mask]
        mask_t = torch.from_numpy(mask).to(top_lp.device)
        index[rows] = top_idx[mask_t].cpu().numpy().astype(index.dtype)
        logprobs[rows] = top_lp[mask_t].cpu().numpy().astype(logprobs.dtype)
        fingerprints[ids] = batch_fingerprints(sample, src_pad, tgt_pad)
        for a in (index, logprobs, fingerprints):
            a.flush()
        done[b] = 1  # only after its rows are on disk: a crash never leaves a false "done"
        done.flush()
        computed += 1
        bar.update(1)
    bar.close()
    return computed


def split_progress(directory, split):
    done = np.load(split_files(directory, split)["done"], mmap_mode="r")
    return int(done.sum()), int(done.size)


def cache_size_bytes(directory):
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
               if f.endswith((".npy", ".json")))
