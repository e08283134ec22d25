"""Plot BLEU against translation speed (or parameters) for the systems of a results file.

Reads the JSON written by ``fairseq-kd evaluate`` and writes a PNG
(``fairseq-kd table`` prints the same results as a Markdown table).
"""
import os

USES_FAIRSEQ = False  # fairseq-kd does not import fairseq for this command (fairseq_kd.cli)


def add_arguments(p):
    p.add_argument("results", help="results JSON from fairseq-kd evaluate")
    p.add_argument("--out", required=True, help="PNG to write (its folder is created if missing)")
    p.add_argument("--x", choices=["speed", "params"], default="speed",
                   help="x axis: sentences/s of the decoding, or parameters")
    p.add_argument("--decoding", choices=["greedy", "beam"], default="greedy")
    p.add_argument("--title", default=None)


def run(args):
    from fairseq_kd.cli.table import read_results

    results = read_results(args.results)
    systems = results["systems"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for s in systems:
        d = s[args.decoding]
        x = d["sentences_per_s"] if args.x == "speed" else s["params"] / 1e6
        marker = "s" if s["name"].startswith("teacher") else "o"
        ax.scatter([x], [d["bleu"]], marker=marker)
        ax.annotate(s["name"], (x, d["bleu"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"{args.decoding} translation speed (sentences/s, {results.get('device')})"
                  if args.x == "speed" else "parameters (millions)")
    ax.set_ylabel(f"sacreBLEU ({args.decoding})")
    ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.set_title(args.title or f"BLEU vs {'speed' if args.x == 'speed' else 'size'}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
