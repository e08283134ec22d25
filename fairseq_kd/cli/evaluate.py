"""Translate a test split with one checkpoint (greedy and beam), score it and record it in a results file.

For each decoding (beam 1 and --beam K) runs ``fairseq-generate`` on the
binarized split, takes the detokenized hypotheses in input order, scores them
with sacreBLEU (BLEU, chrF; signatures recorded) against --ref and records
fairseq-generate's own translation speed (sentences/s of generation, loading
excluded).  The entry NAME in the JSON file --results is created or replaced,
so a recipe can evaluate its systems one by one and skip finished ones.
"""
import json
import os
import re
import subprocess
import sys

from fairseq_kd.errors import require

SPEED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s \(([\d.]+) sentences/s")


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


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def fairseq_tool(name):
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else name


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
    require(proc.returncode == 0, f"fairseq-generate failed on {args.checkpoint}:\n{proc.stderr[-2000:]}")
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


def count_parameters(checkpoint):
    """Unique parameters of the model in a checkpoint (shared embeddings counted once)."""
    import torch

    import fairseq_kd  # noqa: F401  (allow-lists fairseq's classes for weights-only loading)

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    seen = {}
    for key, value in state["model"].items():
        if not key.endswith(("version", "_float_tensor")):
            seen[value.data_ptr()] = value.numel()
    return sum(seen.values())


def run(args):
    from sacrebleu.metrics import BLEU, CHRF

    require(os.path.isfile(args.checkpoint), f"checkpoint not found: {args.checkpoint}")
    refs = read_lines(args.ref)
    entry = {"name": args.name, "checkpoint": args.checkpoint, "params": count_parameters(args.checkpoint)}
    base = os.path.splitext(args.results)[0]
    bleu, chrf = BLEU(), CHRF()
    for label, beam in (("greedy", 1), ("beam", args.beam)):
        hyp_path = f"{base}.{args.name}.{label}.txt"
        n, speed = generate(args, beam, hyp_path)
        require(n == len(refs), f"{args.name}: {n} hypotheses for {len(refs)} references")
        hyps = read_lines(hyp_path)
        entry[label] = {"beam": beam, "bleu": round(bleu.corpus_score(hyps, [refs]).score, 2),
                        "chrf": round(chrf.corpus_score(hyps, [refs]).score, 2),
                        "sentences_per_s": speed}
        print(f"{args.name} {label}: BLEU {entry[label]['bleu']}, chrF {entry[label]['chrf']}, "
              f"{speed} sentences/s")
    results = {"systems": []}
    if os.path.exists(args.results):
        with open(args.results) as f:
            results = json.load(f)
    results["bleu_signature"] = str(bleu.get_signature())
    results["chrf_signature"] = str(chrf.get_signature())
    results["device"] = "cpu" if args.cpu else "cuda"
    results["systems"] = [s for s in results["systems"] if s["name"] != args.name] + [entry]
    with open(args.results, "w") as f:
        json.dump(results, f, indent=2)
