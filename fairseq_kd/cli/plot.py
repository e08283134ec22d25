"""Plot BLEU against translation speed (or parameters) for the systems of a results file.

Reads the JSON written by ``fairseq-kd evaluate`` and writes a PNG
(``fairseq-kd table`` prints the same results as a Markdown table).
"""
from fairseq_kd.plots import plot_results
from fairseq_kd.results import read_results

USES_FAIRSEQ = False  # fairseq-kd does not import fairseq for this command (fairseq_kd.cli)


def add_arguments(p):
    p.add_argument("results", help="results JSON from fairseq-kd evaluate")
    p.add_argument("--out", required=True, help="PNG to write (its folder is created if missing)")
    p.add_argument("--x", choices=["speed", "params"], default="speed",
                   help="x axis: sentences/s of the decoding, or parameters")
    p.add_argument("--decoding", choices=["greedy", "beam"], default="greedy")
    p.add_argument("--title", default=None)


def run(args):
    plot_results(read_results(args.results), args.out, args.x, args.decoding, args.title)
    print(f"wrote {args.out}")
