#!/usr/bin/env python3
"""What deploying a student buys: the student against the teacher, both as fairseq runs them and both in CTranslate2.

Runs ``fairseq-kd evaluate`` (greedy and beam, translation time only, model
loading excluded) on the same binarized test split, one system after the
other on the same cores: the teacher with fairseq, the student with fairseq,
the teacher converted to CTranslate2 (--teacher-quantization, int8 by
default) and the student converted to CTranslate2 for each --quantization,
all with the same decoding settings.  Every CTranslate2 row also gets its
latency at batch size 1 (median and p90 ms per sentence over --latency
sentences translated one at a time on --latency-threads threads after a
warm-up: the interactive case).

Each row's speed is printed as a multiple of the teacher's fairseq beam
search and of the quantized teacher's greedy and beam search.  The fair
comparison is the second: shipping the quantized teacher is the
alternative to shipping a student, so a student is worth shipping where it
beats the quantized teacher on quality and speed together ("beats ct2
teacher": faster than and at least as good in BLEU as one of the quantized
teacher's decodings, and neither slower nor worse than every one of them).

    python benchmarks/deploy_speed.py DATA --teacher TEACHER.pt --student STUDENT.pt \\
        --ref RAW/test.TGT [--beam 5] [--cpu] [--quantization int8 float32] [--latency 200] [--latency-threads 1]

Time only on an otherwise idle machine: another job on the cores distorts
every ratio.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DECODINGS = ("greedy", "beam")


def evaluate(args, results, name, checkpoint, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    cmd = [BIN / "fairseq-kd", "evaluate", "--data", args.data, "--checkpoint", checkpoint, "--name", name,
           "--ref", args.ref, "--results", results, "--beam", str(args.beam), *extra]
    cmd += ["--cpu"] if args.cpu else []
    subprocess.run([str(c) for c in cmd], check=True, env=env, stdout=subprocess.DEVNULL)


def ct2_options(quantization, latency, threads):
    return ["--backend", "ctranslate2", "--quantization", quantization, "--latency", str(latency),
            "--latency-threads", str(threads)]


def beats(row, teacher_rows):
    """Whether a row beats the quantized teacher on quality and speed together: faster than and at
    least as good as one of its decodings, and not both slower and worse than another
    (one at least as fast and as good, e.g. its greedy search, would be the one to ship)."""
    def at_least(a, b):  # a is at least as fast and as good as b
        return a["sentences_per_s"] >= b["sentences_per_s"] and a["bleu"] >= b["bleu"]

    return (any(at_least(row, t) and row["sentences_per_s"] > t["sentences_per_s"] for t in teacher_rows)
            and not any(at_least(t, row) for t in teacher_rows))


def latency_cells(d):
    latency = d.get("latency_ms")
    return [f"{latency['median_ms']:.1f}", f"{latency['p90_ms']:.1f}"] if latency else ["-", "-"]


def rows(results, teacher="teacher", ct2_teacher="teacher (ct2 int8)"):
    """(device, Markdown rows) of a results file: every decoding with its ratios against the teacher's
    fairseq beam search and the quantized teacher's greedy and beam searches."""
    with open(results) as f:
        data = json.load(f)
    systems = {s["name"]: s for s in data["systems"]}
    fairseq_beam = systems[teacher]["beam"]["sentences_per_s"]
    quantized = [systems[ct2_teacher][label] for label in DECODINGS]
    out = []
    for system in data["systems"]:
        for label in DECODINGS:
            d = system[label]
            speed = d["sentences_per_s"]
            verdict = "-" if system["name"] in (teacher, ct2_teacher) else (
                "yes" if beats(d, quantized) else "no")
            cells = [system["name"], f"{label} (beam {d['beam']})", f"{speed:.1f}", f"{speed / fairseq_beam:.2f}x",
                     *(f"{speed / q['sentences_per_s']:.2f}x" for q in quantized), f"{d['bleu']:.1f}",
                     *(f"{d['bleu'] - q['bleu']:+.1f}" for q in quantized), *latency_cells(d), verdict]
            out.append("| " + " | ".join(cells) + " |")
    return data["device"], out


def header(ct2_teacher):
    names = ["system", "decoding", "sentences/s", "x teacher beam",
             f"x {ct2_teacher} greedy", f"x {ct2_teacher} beam", "BLEU",
             f"BLEU vs {ct2_teacher} greedy", f"BLEU vs {ct2_teacher} beam",
             "ms/sentence median (batch 1)", "ms/sentence p90 (batch 1)", f"beats {ct2_teacher}"]
    return ["| " + " | ".join(names) + " |", "|---|---|" + "---:|" * (len(names) - 3) + "---|"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="fairseq binary data folder with the test split")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--ref", required=True, help="detokenized reference of the test split")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--quantization", nargs="*", default=["int8", "float32"], help="the student's CTranslate2 rows")
    p.add_argument("--teacher-quantization", default="int8", help="the teacher's CTranslate2 row")
    p.add_argument("--latency", type=int, default=200,
                   help="sentences translated one at a time for each CTranslate2 row's latency")
    p.add_argument("--latency-threads", type=int, default=1, help="CPU threads on the one sentence latency times")
    args = p.parse_args()
    ct2_teacher = f"teacher (ct2 {args.teacher_quantization})"
    with tempfile.TemporaryDirectory() as tmp:
        results = os.path.join(tmp, "results.json")
        evaluate(args, results, "teacher", args.teacher)
        evaluate(args, results, "student", args.student)
        latency = (args.latency, args.latency_threads)
        evaluate(args, results, "teacher", args.teacher, *ct2_options(args.teacher_quantization, *latency))
        for q in args.quantization:
            evaluate(args, results, "student", args.student, *ct2_options(q, *latency))
        device, table = rows(results, ct2_teacher=ct2_teacher)
    print(f"{device}; speed = sentences/s of translation alone (batched), x = against the teacher's fairseq "
          f"beam search and against {ct2_teacher} (the fair comparison); latency = ms per sentence "
          f"translated one at a time over {args.latency} sentences on {args.latency_threads} thread(s)\n")
    print("\n".join(header(ct2_teacher) + table))


if __name__ == "__main__":
    main()
