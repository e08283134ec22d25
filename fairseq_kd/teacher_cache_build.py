"""Building a teacher cache: run the teacher over binarized splits, write the files.

The library behind ``fairseq-kd cache-teacher`` (:mod:`fairseq_kd.cli.cache_teacher`
parses the arguments and calls :func:`prepare`, :func:`build_shard` and
:func:`report_lines`).  The layout written, and how a cache is read, is
:mod:`fairseq_kd.teacher_cache`.  The teacher is a
:class:`fairseq_kd.teacher.Teacher` placed once on the build's device and dtype.
"""
import contextlib
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from fairseq import utils

from fairseq_kd.atomic_io import write_atomic
from fairseq_kd.checksum import file_sha256
from fairseq_kd.errors import require
from fairseq_kd.losses import ensemble_scores
from fairseq_kd.teacher import Teacher, teacher_paths
from fairseq_kd.teacher_cache import (
    FORMAT_VERSION,
    META,
    SCORE_DTYPES,
    batch_fingerprints,
    dictionary_checksum,
    index_dtype,
    read_meta,
    split_files,
    target_rows,
)


@dataclass
class BuildSpec:
    """What to cache: the teacher on which splits of which data, how, and where."""

    data: str
    teacher_path: str
    out: str
    splits: List[str]
    k: int = 8
    score_dtype: str = "float16"
    max_tokens: int = 4096
    batch_size: Optional[int] = None
    source_lang: Optional[str] = None
    target_lang: Optional[str] = None


@dataclass
class Build:
    """A prepared build: the data task, the placed teacher, each split's batches."""

    spec: BuildSpec
    task: object
    teacher: Teacher
    plan: Dict[str, List[np.ndarray]] = field(default_factory=dict)


def data_task(spec: BuildSpec):
    """A fairseq translation task on the build's data, read as fairseq-train reads it."""
    from fairseq.tasks.translation import TranslationConfig, TranslationTask
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(TranslationConfig(
        data=spec.data, source_lang=spec.source_lang, target_lang=spec.target_lang,
        train_subset="train", dataset_impl=None, required_seq_len_multiple=1,
    ))
    return TranslationTask.setup_task(cfg)


def prepare(spec: BuildSpec, device=None, dtype=None) -> Build:
    """Load data and teacher, fix every split's batches, create (or check) the files.

    ``device``/``dtype``: where the teacher runs (None: leave it on CPU, e.g.
    when only the files are created and child processes compute).
    """
    task = data_task(spec)
    teacher = Teacher(teacher_paths(spec.teacher_path), task).load()
    vocab = len(task.target_dictionary)
    require(spec.k <= vocab, f"--topk {spec.k} exceeds the vocabulary ({vocab})")
    if device is not None:
        teacher.place(device, dtype)
    os.makedirs(spec.out, exist_ok=True)
    signature = build_signature(task, teacher, spec.k, spec.score_dtype, spec.max_tokens,
                                spec.batch_size)
    require(spec.splits, "--splits is empty")
    build = Build(spec, task, teacher)
    for split in spec.splits:
        try:
            task.load_dataset(split, combine=split == "train")
        except FileNotFoundError as e:
            require(False, f"split '{split}' not found in {spec.data}: {e}")
        batches = split_batches(task, teacher, split, spec.max_tokens, spec.batch_size)
        init_split(spec.out, split, signature, task.dataset(split), batches, vocab)
        build.plan[split] = batches
    return build


def build_shard(build: Build, shard_id=0, num_shards=1, max_batches=None, progress=True):
    """Compute shard ``shard_id`` of ``num_shards`` of every split; {split: batches computed}."""
    return {split: build_split_shard(build.task, build.teacher, build.spec.out, split, batches,
                                     build.spec.k, shard_id, num_shards, max_batches, progress)
            for split, batches in build.plan.items()}


def report_lines(directory, splits):
    """What the cache holds, one line per split and a total line."""
    meta = read_meta(directory)
    lines, complete = [], True
    for split in splits:
        info = meta["splits"][split]
        done, total = split_progress(directory, split)
        complete &= done == total
        size = sum(os.path.getsize(f) for f in split_files(directory, split).values())
        lines.append(
            f"{split}: {info['sentences']:,} sentences, {info['tokens']:,} target tokens, "
            f"{done}/{total} batches done, {size:,} bytes "
            f"({size / max(info['tokens'], 1):.1f} bytes per target token; top-{meta['k']} "
            f"{meta['index_dtype']} ids + {meta['score_dtype']} log-probs)"
            + (f", {info['uncached_sentences']} sentences too long for the teacher, not cached"
               if info["uncached_sentences"] else ""))
    total = cache_size_bytes(directory)
    state = "complete" if complete else "INCOMPLETE: rerun the same command to resume"
    lines.append(f"teacher cache {directory}: {total:,} bytes ({total / 2**20:.1f} MiB), {state}")
    return lines


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



def teacher_topk(teacher, sample, k):
    """(B, L, k) T=1 log-probs and token ids of the teacher's k best tokens
    (the teacher runs where it was placed)."""
    scores = ensemble_scores([o.logits for o in teacher.forward(sample["net_input"])]).float()
    return F.log_softmax(scores, dim=-1).topk(k, dim=-1)


def build_signature(task, teacher, k, score_dtype, max_tokens, batch_size):
    """What a cache is built from; a resumed or extended build must match it."""
    return {
        "format": FORMAT_VERSION,
        "k": int(k),
        "score_dtype": score_dtype,
        "index_dtype": np.dtype(index_dtype(len(task.target_dictionary))).name,
        "teachers": [{"path": os.path.abspath(p), "sha256": file_sha256(p)} for p in teacher.paths],
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


def split_batches(task, teacher, split, max_tokens, batch_size):
    """fairseq's size-sorted batches (lists of dataset indices) of a split, unshuffled,
    without the sentences longer than the teacher accepts."""
    dataset = task.dataset(split)
    max_positions = utils.resolve_max_positions(task.max_positions(), teacher.max_positions())
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


def build_split_shard(task, teacher, directory, split, batches, k, shard_id=0, num_shards=1,
                      max_batches=None, progress=True):
    """Compute and store this shard's batches that are not done yet; returns how many
    batches this call computed."""
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
    device = next(teacher.models[0].parameters()).device
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
            top_lp, top_idx = teacher_topk(teacher, sample, k)
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
