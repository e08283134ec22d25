"""Score detokenized system outputs with sacreBLEU (BLEU and chrF) and print a table with signatures.

    fairseq-kd score --ref test.en teacher=hyp.teacher student=hyp.student

Each SYSTEM=FILE is a detokenized hypothesis file, line-aligned with --ref.
"""
import json

from fairseq_kd.errors import require


def add_arguments(p):
    p.add_argument("--ref", required=True, help="detokenized reference file")
    p.add_argument("systems", nargs="+", metavar="NAME=FILE", help="system name and hypothesis file")
    p.add_argument("--json", help="also write the scores to this JSON file")


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def score_files(ref_path, systems):
    """[(name, bleu, chrf)] plus the two sacreBLEU signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    refs = read_lines(ref_path)
    bleu, chrf = BLEU(), CHRF()
    rows = []
    for name, path in systems:
        hyps = read_lines(path)
        require(len(hyps) == len(refs),
                f"{path} has {len(hyps)} lines but the reference {ref_path} has {len(refs)}")
        rows.append((name, bleu.corpus_score(hyps, [refs]).score, chrf.corpus_score(hyps, [refs]).score))
    return rows, str(bleu.get_signature()), str(chrf.get_signature())


def run(args):
    systems = []
    for spec in args.systems:
        require("=" in spec, f"expected NAME=FILE, got {spec!r}")
        name, path = spec.split("=", 1)
        systems.append((name, path))
    rows, bleu_sig, chrf_sig = score_files(args.ref, systems)
    width = max(len(n) for n, _, _ in rows)
    print(f"| {'system':<{width}} | BLEU  | chrF  |")
    print(f"|{'-' * (width + 2)}|-------|-------|")
    for name, b, c in rows:
        print(f"| {name:<{width}} | {b:5.1f} | {c:5.1f} |")
    print(f"BLEU signature: {bleu_sig}")
    print(f"chrF signature: {chrf_sig}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bleu_signature": bleu_sig, "chrf_signature": chrf_sig,
                       "systems": [{"name": n, "bleu": b, "chrf": c} for n, b, c in rows]}, f, indent=2)
