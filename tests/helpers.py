"""Utilities for the test suite: tiny Bible data, tiny models, running fairseq tools."""
import os
import subprocess
import sys
import tarfile
from itertools import pairwise
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIBLE_ARCHIVE = REPO / "examples" / "data" / "bible.es-en.tar.xz"
BIN = Path(sys.executable).parent
USER_DIR = str(REPO / "fairseq_kd")

# Small enough to train in seconds on 2 CPU cores, deep enough for layer maps.
TEACHER_ARCH = [
    "--arch", "transformer", "--share-all-embeddings",
    "--encoder-layers", "4", "--decoder-layers", "4",
    "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
    "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
]
STUDENT_ARCH = [
    "--arch", "transformer", "--share-all-embeddings",
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]
TRAIN_COMMON = [
    "--cpu", "--optimizer", "adam", "--lr", "0.002", "--lr-scheduler", "inverse_sqrt",
    "--warmup-updates", "10", "--max-tokens", "2000", "--no-progress-bar",
    "--log-format", "simple", "--log-interval", "1", "--seed", "1",
    "--num-workers", "0", "--dropout", "0.1",
]


def env():
    """Environment for subprocesses: the repo importable, fairseq quiet and single-threaded."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONWARNINGS"] = "ignore"
    return e


def tool(name):
    """Path of a console script of this environment (fairseq-train, fairseq-kd, ...)."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found next to {sys.executable}")
    return str(path)


def run(cmd, check=True, cwd=None, timeout=900):
    """Run a command; on failure, fail with the end of its output."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          env=env(), cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
            f"--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-5000:]}"
        )
    return proc


def fairseq_train(data_bin, save_dir, *args, check=True):
    return run([tool("fairseq-train"), data_bin, "--user-dir", USER_DIR,
                "--save-dir", save_dir, *TRAIN_COMMON, *args], check=check)


def one_line_error(proc):
    """The single ``fairseq_kd: error:`` line of a failed run (and no traceback)."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fairseq_kd: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def assert_generate_loads_student(data_root, checkpoint):
    """Stock fairseq-generate (plugin loaded, task translation_kd) translates the
    whole test split with a trained student, without ever loading its teacher."""
    proc = run([tool("fairseq-generate"), Path(data_root) / "bin", "--user-dir", USER_DIR,
                "--task", "translation_kd", "--path", checkpoint, "--cpu", "--beam", "2",
                "--batch-size", "16", "--required-batch-size-multiple", "1", "--gen-subset", "test"])
    hyps = [line for line in proc.stdout.splitlines() if line.startswith("H-")]
    n_test = len((Path(data_root) / "raw" / "test.en").read_text().splitlines())
    assert len(hyps) == n_test
    assert "loaded teacher" not in proc.stderr
    return proc


def bible_slice(dest, sizes, src="es", tgt="en"):
    """Write the first sizes[split] lines of each split of the shipped corpus to dest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(BIBLE_ARCHIVE) as tar:
        for split, n in sizes.items():
            for lang in (src, tgt):
                f = tar.extractfile(f"bible.es-en/{split}.{lang}")
                lines = f.read().decode("utf-8").splitlines()[:n]
                (dest / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def prepare_tiny_data(root, sizes=None, vocab_size=400):
    """Bible slice -> SentencePiece pieces -> fairseq binary data (joined dictionary)."""
    root = Path(root)
    sizes = sizes or {"train": 600, "valid": 60, "test": 40}
    raw = bible_slice(root / "raw", sizes)
    pieces = root / "pieces"
    run([tool("fairseq-kd"), "spm", "--input-dir", raw, "--src", "es", "--tgt", "en",
         "--splits", ",".join(sizes), "--vocab-size", vocab_size, "--out", pieces])
    prefixes = []
    for split, flag in (("train", "--trainpref"), ("valid", "--validpref"), ("test", "--testpref")):
        if split in sizes:
            prefixes += [flag, pieces / f"{split}.sp"]
    run([tool("fairseq-preprocess"), "-s", "es", "-t", "en", *prefixes,
         "--destdir", root / "bin", "--joined-dictionary", "--workers", "1"])
    return root


def build_training(data_bin, *args):
    """(cfg, task, model, criterion) built in-process exactly as fairseq-train would."""
    from fairseq_kd.inprocess import build_training as build  # imports fairseq: only when used

    return build(data_bin, *args)


def first_batch(task, split="valid", max_tokens=1000):
    """The first batch of a split, in fairseq's own batching and order."""
    task.load_dataset(split)
    itr = task.get_batch_iterator(dataset=task.dataset(split), max_tokens=max_tokens, seed=1)
    return next(iter(itr.next_epoch_itr(shuffle=False)))


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_gloo(step, world_size, *args):
    """Run ``step(rank, world_size, *args)`` on ``world_size`` CPU processes joined in a
    gloo process group (torch.multiprocessing.spawn; an error in a rank is raised here)."""
    import torch.multiprocessing as mp

    mp.spawn(gloo_rank, args=(world_size, free_port(), step, args), nprocs=world_size, join=True)


def gloo_rank(rank, world_size, port, step, args):
    """One rank of :func:`spawn_gloo`: the process group around ``step``, torn down cleanly.

    ``step`` runs in a frame of its own, so what it built (models, DDP wrappers, the
    teacher) is unreachable once it returns and is collected here, while the group still
    exists; the barrier keeps a rank from destroying the group while another still uses
    it.  Without them a rank sometimes died of SIGABRT ("terminate called without an
    active exception") in the interpreter's exit, after both ranks had returned: 6 of 94
    runs of the hybrid_kd DDP step on a 2-core VM; with them, 0 of 70.
    """
    import gc

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        step(rank, world_size, *args)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def ddp_gradients(rank, world_size, build_args, out_dir):
    """One gloo rank: student (and criterion, if it has parameters) in torch DDP.

    Builds everything from ``build_args`` exactly like fairseq-train, takes
    batch number ``rank`` of the valid split, runs forward/backward through
    the DDP wrappers and saves every gradient to ``out_dir/rank{rank}.pt``.
    Run with :func:`spawn_gloo`; compare with :func:`local_gradients`.
    """
    import torch

    torch.manual_seed(0)
    _, task, model, criterion = build_training(*build_args)
    sample = batches(task, world_size)[rank]
    wrapped, crit = trainer_ddp_wrap(model, criterion)
    loss, _, _ = crit(wrapped, sample)
    loss.backward()
    torch.save(named_grads(model, criterion), Path(out_dir) / f"rank{rank}.pt")


def fairseq_ddp_wrap(module):
    """Wrap a module as fairseq's --ddp-backend pytorch_ddp does (defaults: no
    unused-parameter search, no buffer broadcast; attribute access proxied)."""
    from fairseq.distributed import ModuleProxyWrapper
    from torch.nn.parallel import DistributedDataParallel

    return ModuleProxyWrapper(DistributedDataParallel(
        module, broadcast_buffers=False, find_unused_parameters=False))


def trainer_ddp_wrap(model, criterion):
    """(model, criterion) as fairseq's Trainer holds them under DDP (its ``model``
    and ``criterion`` properties): the model always wrapped, the criterion only
    when it has parameters (``fairseq.utils.has_parameters``)."""
    from fairseq import utils

    wrapped_criterion = fairseq_ddp_wrap(criterion) if utils.has_parameters(criterion) else criterion
    return fairseq_ddp_wrap(model), wrapped_criterion


def split_batch(task, parts, split="valid", max_tokens=1000):
    """(whole, [part, ...]): :func:`first_batch` and its sentences cut into ``parts``
    contiguous groups, each collated on its own (own padding) as a data-parallel
    rank would receive it."""
    whole = first_batch(task, split, max_tokens)
    ids = whole["id"].tolist()
    ds = task.dataset(split)
    bounds = [len(ids) * k // parts for k in range(parts + 1)]
    return whole, [ds.collater([ds[i] for i in ids[a:b]]) for a, b in pairwise(bounds)]


def ddp_split_batch_step(rank, world_size, build_args, out_dir, steps=2):
    """One gloo rank of a training step on part ``rank`` of :func:`split_batch`.

    Model and criterion are wrapped as fairseq's Trainer wraps them
    (:func:`trainer_ddp_wrap`).  The step runs ``steps`` times (gradients reset
    in between, no update): DDP without unused-parameter search reports a
    parameter that got no gradient only at the next forward.  Saves the last
    step's gradients (DDP-averaged), logging output and sample size to
    ``out_dir/rank{rank}.pt``; run with :func:`spawn_gloo`, compare with
    :func:`whole_batch_step`.
    """
    import torch

    torch.manual_seed(0)
    _, task, model, criterion = build_training(*build_args)
    _, parts = split_batch(task, world_size)
    ddp_model, ddp_criterion = trainer_ddp_wrap(model, criterion)
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        criterion.zero_grad(set_to_none=True)
        loss, sample_size, log = ddp_criterion(ddp_model, parts[rank])
        loss.backward()
    torch.save({"grads": named_grads(model, criterion), "log": log, "sample_size": sample_size},
               Path(out_dir) / f"rank{rank}.pt")


def whole_batch_step(build_args, world_size):
    """Single-process reference of :func:`ddp_split_batch_step`: the same step on the
    whole batch; returns (gradients, logging output, sample size)."""
    import torch

    torch.manual_seed(0)
    _, task, model, criterion = build_training(*build_args)
    whole, _ = split_batch(task, world_size)
    loss, sample_size, log = criterion(model, whole)
    loss.backward()
    return named_grads(model, criterion), log, sample_size


def local_gradients(build_args, world_size):
    """Single-process reference: the mean over the ranks' batches of the gradients."""
    import torch

    torch.manual_seed(0)
    _, task, model, criterion = build_training(*build_args)
    for sample in batches(task, world_size):
        loss, _, _ = criterion(model, sample)
        (loss / world_size).backward()  # DDP averages gradients over ranks
    return named_grads(model, criterion)


def batches(task, n):
    task.load_dataset("valid")
    itr = task.get_batch_iterator(dataset=task.dataset("valid"), max_tokens=600, seed=1)
    return list(itr.next_epoch_itr(shuffle=False))[:n]


def named_grads(model, criterion):
    grads = {f"model.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"criterion.{n}": p.grad.clone() for n, p in criterion.named_parameters()
                  if p.grad is not None})
    return grads


def teacher_translations(data_root, teacher, split="train"):
    """The teacher's greedy translation of every sentence of a split, in corpus order."""
    proc = run([tool("fairseq-generate"), Path(data_root) / "bin", "--user-dir", USER_DIR,
                "--path", teacher, "--gen-subset", split, "--cpu", "--beam", "1",
                "--batch-size", "128", "--required-batch-size-multiple", "1",
                "--max-len-a", "1", "--max-len-b", "5"])
    hyps = {}
    for line in proc.stdout.splitlines():
        if line.startswith("H-"):
            key, _score, *text = line.split("\t")
            hyps[int(key[2:])] = text[0] if text else ""
    return [hyps[i] for i in range(len(hyps))]  # KeyError if a sentence were missing


def make_distilled_data(data_root, dest, sources, hypotheses, split="train"):
    """Binarize (sources, teacher hypotheses) with the gold data's dictionaries.

    The folder fairseq-kd corpus writes: DEST/bin, aligned line by line with
    the gold split when ``sources`` are that split's sources.
    """
    data_root, dest = Path(data_root), Path(dest)
    (dest / "text").mkdir(parents=True, exist_ok=True)
    (dest / "text" / f"{split}.es").write_text("\n".join(sources) + "\n", encoding="utf-8")
    (dest / "text" / f"{split}.en").write_text("\n".join(hypotheses) + "\n", encoding="utf-8")
    run([tool("fairseq-preprocess"), "-s", "es", "-t", "en", f"--{split}pref", dest / "text" / split,
         "--srcdict", data_root / "bin" / "dict.es.txt", "--tgtdict", data_root / "bin" / "dict.en.txt",
         "--destdir", dest / "bin", "--workers", "1"])
    return dest / "bin"


def gold_sources(data_root, split="train"):
    return (Path(data_root) / "pieces" / f"{split}.sp.es").read_text(encoding="utf-8").splitlines()


def rescore_shipped_folder(folder, model_file, name, lines, beam, tmp, batch_size=None):
    """Score ``folder``'s model (a folder of the recipes' ship or ship_students step) on the
    first ``lines`` test pairs of the corpus in examples/data, from the folder alone, as a
    user with a clean clone would: the folder's SentencePiece model and dictionary encode
    them, stock fairseq translates (``fairseq-kd evaluate --no-user-dir``).  Returns the
    results entry, as ``evaluation.check.json`` records it."""
    import json

    import sentencepiece as spm

    folder, tmp = Path(folder), Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spm.model"))
    with tarfile.open(BIBLE_ARCHIVE) as tar:
        for lang in ("es", "en"):
            text = tar.extractfile(f"bible.es-en/test.{lang}").read().decode("utf-8").splitlines()[:lines]
            (tmp / f"test.{lang}").write_text("\n".join(text) + "\n", encoding="utf-8")
            pieces = [" ".join(sp.encode(line.strip(), out_type=str)) for line in text]
            (tmp / f"test.sp.{lang}").write_text("\n".join(pieces) + "\n", encoding="utf-8")
    run([tool("fairseq-preprocess"), "-s", "es", "-t", "en", "--testpref", tmp / "test.sp",
         "--destdir", tmp / "bin", "--srcdict", folder / "dict.txt", "--joined-dictionary", "--workers", "1"])
    results = tmp / "results.json"
    run([tool("fairseq-kd"), "evaluate", "--data", tmp / "bin", "--checkpoint", folder / model_file,
         "--name", name, "--ref", tmp / "test.en", "--results", results, "--beam", str(beam), "--cpu",
         "--no-user-dir", *(["--batch-size", str(batch_size)] if batch_size else [])])
    measured, = json.loads(results.read_text())["systems"]
    return measured


# The Bible recipe's cpu_converged profile (students validated by greedy BLEU, their best
# checkpoint shipped; the shipped teacher's vocabulary) on a slice, with a student small enough
# to train in a minute: what tests/test_shipped_students.py and the demo's test ship.
TINY_ARCH = ("--arch transformer --share-all-embeddings --encoder-layers 1 --decoder-layers 1 "
             "--encoder-embed-dim 64 --decoder-embed-dim 64 --encoder-ffn-embed-dim 128 "
             "--decoder-ffn-embed-dim 128 --encoder-attention-heads 2 --decoder-attention-heads 2")
SHIP_TINY = {
    "PROFILE": "cpu_converged", "GPUS": "cpu", "TRAIN_LINES": "1000", "VALID_LINES": "30", "TEST_LINES": "40",
    "PREPROCESS_WORKERS": "1", "STUDENT_JOBS": "1", "PRUNE_FROM": "", "CT2_QUANT": "", "BEAM": "2",
    "SHIP_CHECK_LINES": "20", "MAX_TOKENS": "2000",
    "OPTIM_ARGS": "--optimizer adam --adam-betas (0.9,0.98) --lr 5e-3 --lr-scheduler inverse_sqrt --warmup-updates 30",
    "STUDENT_ARGS": TINY_ARCH, "STUDENT_TRAIN": "--max-epoch 5 --patience 5",
}
# Instead of the shipped teacher's 8k vocabulary, which a tiny student does not learn to use in
# a minute (it writes one word over and over): a 300-piece one of the recipe's, and a teacher
# trained for one epoch on it (the translation_kd task of every student needs one; the baseline
# never loads it).  Its baseline writes different translations for different test sentences.
OWN_VOCABULARY = {"TEACHER_PATH": "", "VOCAB": "300", "TEACHER_ARGS": TINY_ARCH, "TEACHER_TRAIN": "--max-epoch 1"}


def run_bible_recipe(work, *steps, check=True, **settings):
    """recipes/bible_es_en/run.sh STEPS... with SHIP_TINY and ``settings``, WORK=``work``."""
    e = env()
    e["PATH"] = f"{BIN}{os.pathsep}{e['PATH']}"
    e.update(SHIP_TINY, WORK=str(work), **settings)
    proc = subprocess.run(["bash", REPO / "recipes" / "bible_es_en" / "run.sh", *steps],
                          capture_output=True, text=True, env=e, timeout=1800)
    if check and proc.returncode != 0:
        raise AssertionError(f"run.sh {' '.join(steps)} failed ({proc.returncode})\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def ship_tiny_students(work, methods="baseline", **settings):
    """Train the students ``methods`` of a tiny cpu_converged study in ``work``, let the
    checkpoint step choose their checkpoint (the baseline's best or the mean of its last 5)
    and ship every one of them with the recipe's ship_students step into
    work/shipped_students/NAME; returns that step's run."""
    settings = {"METHODS": methods, "SHIP_STUDENTS": methods, **settings}
    steps = ["prepare", "spm", "binarize", "teacher", "students", "checkpoint"]
    if methods != "baseline":
        steps.insert(4, "corpus")  # the teacher's translations, for seq_kd
    run_bible_recipe(work, *steps, **settings)
    return run_bible_recipe(work, "ship_students", **settings)
