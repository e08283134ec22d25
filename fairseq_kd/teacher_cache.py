"""Offline teacher cache: the teacher's top-k distributions, computed once.

``fairseq-kd cache-teacher`` (:mod:`fairseq_kd.teacher_cache_build`) runs
the teacher (or ensemble) over binarized splits on the prefixes of their
targets (teacher forcing) and stores, for every target token, its k most
probable token ids and their **T=1 log-probabilities** (log of the
ensemble's averaged probabilities), sorted best first.  ``translation_kd
--teacher-cache DIR`` then serves ``TeacherDistribution(scores=log-probs,
index=ids)`` for each batch; the loss applies the temperature as
``softmax(scores / T)`` over the k tokens, which equals the online top-k
teacher at temperature T exactly (softmax is invariant to the shift by
log Z), so one cache serves every T and every ``--kd-topk`` up to k (the
top of the cached k).

The cache holds the teacher on the prefixes of the *targets of the folder it
was built over*, and serves ``sample["target"]`` of the batches of that
folder.  Hence which folder to build it over depends on the criterion:

* ``word_kd``, ``hybrid_kd`` (its ``L_tok`` and ``--gate-complexity
  teacher_entropy``), ``ckd``/``a2d`` without their extra terms: the gold
  training folder DATA (``hybrid_kd``'s ``sample["distilled"]`` never reaches
  the cache: it reads the teacher on the gold prefixes only);
* ``seq_kd --word-kd-alpha a`` (Seq-KD + Word-KD), trained on the distilled
  folder of ``fairseq-kd corpus``: that folder, whose training targets are
  the teacher's translations, so the cache holds the teacher on its own
  output prefixes.

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
import hashlib
import json
import os

import numpy as np
import torch

from fairseq_kd.errors import require
from fairseq_kd.losses import TeacherDistribution
from fairseq_kd.teacher import TeacherSource


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


def index_dtype(vocab_size):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def split_files(directory, split):
    return {name: os.path.join(directory, f"{split}.{name}.npy") for name in ARRAYS}


def read_meta(directory):
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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


_NEEDS_MODEL = ("this criterion needs the teacher model itself (its hidden states or "
                "attention maps, or its outputs on other prefixes), but --teacher-cache "
                "holds only its top-k distributions on gold prefixes: pass --teacher-path "
                "instead")


class TeacherCache(TeacherSource):
    """Read side of a cache directory: ``translation_kd --teacher-cache``'s teacher.

    Serves :meth:`distribution` as the online teacher does, on the prefixes of
    the batch's own targets only (those of the folder the cache was built
    over); :meth:`forward` and :meth:`model` are one-line errors.
    """

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
        self._pads = None  # (source, target) padding indices, from check_dictionaries

    @property
    def splits(self):
        return sorted(self.meta["splits"])

    @property
    def built_from(self):
        """The data folder the cache was built over (absolute, as at build time)."""
        return self.meta.get("data", "?")

    def check_topk(self, topk):
        """``--kd-topk`` must be one the cache can serve: 1..k (criterions check at build time)."""
        require(topk > 0, f"--kd-topk 0 asks for the teacher's full distribution, but the "
                f"teacher cache holds its top {self.k}: pass --kd-topk {self.k} (or less)")
        require(topk <= self.k, f"--kd-topk {topk} is larger than the teacher cache's k = "
                f"{self.k}: pass --kd-topk {self.k} or less, or rebuild the cache with --topk {topk}")

    def check_dictionaries(self, src_dict, tgt_dict):
        self._pads = (src_dict.pad(), tgt_dict.pad())
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
                f"teacher cache {self.directory} was built from the '{split}' split of "
                f"{self.built_from} ({info['sentences']:,} sentences / {info['tokens']:,} target "
                f"tokens), the data has {n:,} / {tokens:,}: build the cache over the folder "
                f"training reads (hybrid_kd, word_kd: the gold DATA; seq_kd --word-kd-alpha: "
                f"the distilled corpus)")
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
                f"{'; '.join(reasons)}. The cache was built from other data ({self.built_from}) "
                f"or other data options (--truncate-source, ...): rebuild it")

    def forward(self, net_input, like=None, capture=None):
        require(False, _NEEDS_MODEL)

    def model(self, criterion, what):
        require(False, _NEEDS_MODEL)

    def distribution(self, sample, topk=0, net_input=None, like=None) -> TeacherDistribution:
        """The cached top-``topk`` teacher distribution for every target position
        of ``sample`` (rows follow ``target.view(-1)``), on the target's device, in
        float32: ``scores`` are the teacher's T=1 log-probs of its top ``topk``
        (``like`` is not used)."""
        require(net_input is None or net_input is sample["net_input"],
                "--teacher-cache holds the teacher on the prefixes of the training data's "
                "targets only; this criterion runs the teacher on other inputs: pass "
                "--teacher-path instead")
        require(self._pads is not None, "TeacherCache.check_dictionaries must run first")
        src_pad, tgt_pad = self._pads
        self.check_topk(topk)
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
