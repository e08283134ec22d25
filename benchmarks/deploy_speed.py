#!/usr/bin/env python3
"""What deploying a student buys: sentences/s of the student against the teacher, side by side.

Runs ``fairseq-kd evaluate`` (greedy and beam, translation time only, model
loading excluded) on the same binarized test split, one system after the
other on the same cores: the teacher with fairseq, the student with fairseq,
and the student converted to CTranslate2 for each --quantization.  Prints each
row's sentences/s and BLEU and its speed as a multiple of the teacher's
fairseq beam search (the issue's target: int8 student greedy >= 10x).

    python benchmarks/deploy_speed.py DATA --teacher TEACHER.pt --student STUDENT.pt \\
        --ref RAW/test.TGT [--beam 5] [--cpu] [--quantization int8 float32]

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


def evaluate(args, results, name, checkpoint, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    cmd = [BIN / "fairseq-kd", "evaluate", "--data", args.data, "--checkpoint", checkpoint, "--name", name,
           "--ref", args.ref, "--results", results, "--beam", str(args.beam), *extra]
    cmd += ["--cpu"] if args.cpu else []
    subprocess.run([str(c) for c in cmd], check=True, env=env, stdout=subprocess.DEVNULL)


def rows(results):
    with open(results) as f:
        data = json.load(f)
    teacher_beam = data["systems"][0]["beam"]["sentences_per_s"]
    out = []
    for system in data["systems"]:
        for label in ("greedy", "beam"):
            d = system[label]
            out.append(f"| {system['name']} | {label} (beam {d['beam']}) | {d['sentences_per_s']:.1f} | "
                       f"{d['sentences_per_s'] / teacher_beam:.2f}x | {d['bleu']} |")
    return data["device"], out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="fairseq binary data folder with the test split")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--ref", required=True, help="detokenized reference of the test split")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--quantization", nargs="*", default=["int8", "float32"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = os.path.join(tmp, "results.json")
        evaluate(args, results, "teacher", args.teacher)
        evaluate(args, results, "student", args.student)
        for q in args.quantization:
            evaluate(args, results, "student", args.student, "--backend", "ctranslate2", "--quantization", q)
        device, table = rows(results)
    print(f"{device}; speed = sentences/s of translation alone, x = against the teacher's fairseq beam search\n")
    print("| system | decoding | sentences/s | x teacher beam | BLEU |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
