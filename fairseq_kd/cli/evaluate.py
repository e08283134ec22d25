"""Translate a test split with one checkpoint (greedy and beam), score it and record it in a results file.

For each decoding (beam 1 and --beam K) runs ``fairseq-generate`` on the
binarized split, takes the detokenized hypotheses in input order, scores them
with sacreBLEU (BLEU, chrF; signatures recorded) against --ref and records
fairseq-generate's own translation speed (sentences/s of generation, loading
excluded).  The entry NAME in the JSON file --results is created or replaced,
so a recipe can evaluate its systems one by one and skip finished ones.

The device the speeds were measured on (the GPU's name, or the CPU's cores
and OMP_NUM_THREADS; fp16 noted) is recorded with every system and in the
file's "device" field.  Speeds from different devices do not compare, so one
results file holds one device: evaluating on another one is refused (use
another --results file, or delete this one to evaluate every system again).

--backend ctranslate2 evaluates the model a user would ship: the checkpoint
converted to CTranslate2 with --quantization (cached, like fairseq-kd corpus's
teacher), translating the same binarized split with the same settings on the
same cores (OMP_NUM_THREADS, else every core: as many batches at once, one
thread each).  Its row is NAME (ct2 QUANTIZATION), next to NAME's.
"""
import glob
import json
import os
import re
import subprocess
import sys

from fairseq_kd.deploy.ct2 import QUANTIZATIONS
from fairseq_kd.errors import require

SPEED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s \(([\d.]+) sentences/s")
# The line naming the exception at the end of a Python traceback, e.g. "RuntimeError: ...".
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")
FAILURE_LINES = 3
FP16_NOTE = " in fp16"


def add_arguments(p):
    p.add_argument("--data", required=True, help="fairseq binary data folder")
    p.add_argument("--checkpoint", required=True, help="model checkpoint to evaluate")
    p.add_argument("--name", required=True, help="system name in the results file")
    p.add_argument("--ref", required=True, help="detokenized reference of the split")
    p.add_argument("--results", required=True, help="JSON file to update")
    p.add_argument("--gen-subset", default="test")
    p.add_argument("--beam", type=int, default=5, help="beam size of the beam-search run")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-len-a", type=float, default=1.5)
    p.add_argument("--max-len-b", type=int, default=10)
    p.add_argument("--post-process", default="sentencepiece",
                   help="fairseq --post-process to detokenize hypotheses")
    p.add_argument("--cpu", action="store_true", help="decode on CPU")
    p.add_argument("--fp16", action="store_true", help="decode in fp16 (GPU)")
    p.add_argument("--no-user-dir", action="store_true",
                   help="run stock fairseq-generate without the plugin (exported checkpoints)")
    p.add_argument("--backend", choices=["fairseq", "ctranslate2"], default="fairseq",
                   help="fairseq-generate (default), or the checkpoint converted to CTranslate2")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="int8",
                   help="--backend ctranslate2: the model's weights (default: int8)")


def system_name(args):
    """The results row: NAME, or NAME (ct2 QUANTIZATION) for the CTranslate2 model."""
    return f"{args.name} (ct2 {args.quantization})" if args.backend == "ctranslate2" else args.name


def hypotheses_file(results, name, label):
    """RESULTS.NAME.LABEL.txt, the row's name made a file name ("a (ct2 int8)" -> "a.ct2-int8")."""
    stem = re.sub(r"\s*\((.*)\)$", lambda m: "." + m.group(1).replace(" ", "-"), name)
    return f"{os.path.splitext(results)[0]}.{stem}.{label}.txt"


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def fairseq_tool(name):
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else name


def check_inputs(args):
    """Everything fairseq-generate would otherwise fail on late, or with a traceback."""
    require(args.beam >= 1, f"--beam must be >= 1, got {args.beam}")
    require(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    require(os.path.isfile(args.ref), f"--ref: reference file not found: {args.ref}")
    require(os.path.isdir(args.data), f"--data: data folder not found: {args.data}")
    require(glob.glob(os.path.join(glob.escape(args.data), f"{args.gen_subset}.*-*.*.idx")),
            f"--data: no binarized '{args.gen_subset}' split in {args.data} "
            f"(expected {args.gen_subset}.SRC-TGT.SRC.idx/.bin from fairseq-preprocess)")


def decoding_device(args):
    """What fairseq-generate decodes on (a GPU whenever it sees one, unless --cpu)."""
    import torch

    if args.cpu or not torch.cuda.is_available():
        require(not args.fp16, "--fp16 needs a GPU (no --cpu, and CUDA available)")
        from fairseq_kd.processes import usable_cores

        cores = usable_cores()
        threads = os.environ.get("OMP_NUM_THREADS")
        return f"CPU ({cores} cores" + (f", OMP_NUM_THREADS={threads})" if threads else ")")
    return torch.cuda.get_device_name() + (FP16_NOTE if args.fp16 else "")


def read_results(path):
    """The results file to update (empty when it does not exist yet)."""
    from fairseq_kd.cli.table import read_results as read_existing

    return read_existing(path, allow_empty=True) if os.path.exists(path) else {"systems": []}


def check_same_device(results, args, device):
    """Speeds measured on different devices must not share a table or a plot.

    Systems without their own "device" entry come from files written before
    it existed, whose file-level field could be wrong: they are not compared.
    """
    # fp16 is how a PyTorch system decodes, not another device: its CTranslate2 row runs beside it
    others = {s["device"].removesuffix(FP16_NOTE) for s in results["systems"]
              if s["name"] != system_name(args) and "device" in s}
    require(others <= {device.removesuffix(FP16_NOTE)},
            f"{args.results} holds systems timed on {', '.join(sorted(others))}, this run decodes on "
            f"{device}: their speeds would not be comparable; use another --results file, or "
            f"delete this one to evaluate every system on this device")


def failure_lines(stderr):
    """Why a child failed, from its stderr: the plugin's one-line error, else the
    line naming its last exception (and the next few), else its last lines."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    plugin = [line for line in lines if line.startswith("fairseq_kd: error:")]
    if plugin:
        return plugin[-1:]
    starts = [i for i, line in enumerate(lines) if EXCEPTION_LINE.match(line)]
    first = starts[-1] if starts else max(len(lines) - FAILURE_LINES, 0)
    return lines[first:first + FAILURE_LINES]


def generate(args, beam, hyp_path):
    """Run fairseq-generate; write hypotheses in input order; return sentences/s."""
    cmd = [fairseq_tool("fairseq-generate"), args.data, "--path", args.checkpoint,
           "--gen-subset", args.gen_subset, "--beam", str(beam), "--nbest", "1",
           "--batch-size", str(args.batch_size),
           # otherwise fairseq-generate drops the last partial batch silently
           "--required-batch-size-multiple", "1",
           "--max-len-a", str(args.max_len_a), "--max-len-b", str(args.max_len_b),
           "--post-process", args.post_process]
    if not args.no_user_dir:
        cmd += ["--user-dir", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    cmd += ["--cpu"] if args.cpu else []
    cmd += ["--fp16"] if args.fp16 else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    require(proc.returncode == 0,
            f"fairseq-generate failed on {args.checkpoint} (exit status {proc.returncode}):\n  "
            + "\n  ".join(failure_lines(proc.stderr)))
    hyps = {}
    for line in proc.stdout.splitlines():
        if line.startswith("H-"):
            idx, _, text = (line[2:].split("\t") + [""])[:3]
            hyps[int(idx)] = text
    speed = SPEED.search(proc.stdout + proc.stderr)
    require(speed is not None, "fairseq-generate printed no speed line")
    with open(hyp_path, "w", encoding="utf-8") as f:
        f.write("".join(hyps[i] + "\n" for i in sorted(hyps)))
    return len(hyps), float(speed.group(4))


def ct2_translator(args):
    """(translator, source, target) of the checkpoint converted to CTranslate2, on the evaluation's cores."""
    from fairseq.data import data_utils

    from fairseq_kd.deploy.ct2 import cached_model, load_translator
    from fairseq_kd.processes import usable_cores

    src, tgt = data_utils.infer_language_pair(args.data)
    require(src and tgt, f"--data: cannot tell the languages from the file names in {args.data}")
    model = cached_model(args.checkpoint, args.data, src, tgt, args.quantization)
    if args.cpu or not cuda_available_to_ct2():
        threads = int(os.environ.get("OMP_NUM_THREADS") or usable_cores())
        return load_translator(model, "cpu", threads=1, parallel=threads), src, tgt
    return load_translator(model, "cuda"), src, tgt


def cuda_available_to_ct2():
    import ctranslate2

    return ctranslate2.get_cuda_device_count() > 0


def generate_ct2(args, translator, langs, beam, hyp_path):
    """CTranslate2's translation of the split, as :func:`generate`: (sentences, sentences/s)."""
    from fairseq_kd.deploy.ct2 import translate_binarized

    hyps, speed = translate_binarized(translator, args.data, args.gen_subset, *langs, args.batch_size,
                                      args.post_process, beam=beam, max_len_a=args.max_len_a,
                                      max_len_b=args.max_len_b)
    with open(hyp_path, "w", encoding="utf-8") as f:
        f.write("".join(h + "\n" for h in hyps))
    return len(hyps), round(speed, 2)


def count_parameters(checkpoint):
    """Unique parameters of the model in a checkpoint (shared embeddings counted once)."""
    from fairseq_kd.checkpoint import load_checkpoint_state

    state = load_checkpoint_state(checkpoint)
    seen = {}
    for key, value in state["model"].items():
        if not key.endswith(("version", "_float_tensor")):
            seen[value.data_ptr()] = value.numel()
    return sum(seen.values())


def run(args):
    from sacrebleu.metrics import BLEU, CHRF

    check_inputs(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    device = decoding_device(args)
    results = read_results(args.results)
    name = system_name(args)
    check_same_device(results, args, device)
    refs = read_lines(args.ref)
    entry = {"name": name, "checkpoint": args.checkpoint, "params": count_parameters(args.checkpoint),
             "device": device}
    if args.backend == "ctranslate2":
        entry.update(backend="ctranslate2", quantization=args.quantization)
        translator, *langs = ct2_translator(args)
    bleu, chrf = BLEU(), CHRF()
    for label, beam in (("greedy", 1), ("beam", args.beam)):
        hyp_path = hypotheses_file(args.results, name, label)
        if args.backend == "ctranslate2":
            n, speed = generate_ct2(args, translator, langs, beam, hyp_path)
        else:
            n, speed = generate(args, beam, hyp_path)
        require(n == len(refs), f"{name}: {n} hypotheses for {len(refs)} references")
        hyps = read_lines(hyp_path)
        entry[label] = {"beam": beam, "bleu": round(bleu.corpus_score(hyps, [refs]).score, 2),
                        "chrf": round(chrf.corpus_score(hyps, [refs]).score, 2),
                        "sentences_per_s": speed}
        print(f"{name} {label}: BLEU {entry[label]['bleu']}, chrF {entry[label]['chrf']}, "
              f"{speed} sentences/s")
    results["bleu_signature"] = str(bleu.get_signature())
    results["chrf_signature"] = str(chrf.get_signature())
    results["device"] = device
    results["systems"] = [s for s in results["systems"] if s["name"] != name] + [entry]
    with open(args.results, "w") as f:
        json.dump(results, f, indent=2)
