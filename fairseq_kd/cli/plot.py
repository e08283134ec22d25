"""Plot BLEU against translation speed (or parameters) for the systems of a results file.

Reads the JSON written by ``fairseq-kd evaluate`` and writes a PNG
(``fairseq-kd table`` prints the same results as a Markdown table).
"""
import json

from fairseq_kd.errors import require


def add_arguments(p):
    p.add_argument("results", help="results JSON from fairseq-kd evaluate")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--x", choices=["speed", "params"], default="speed",
                   help="x axis: sentences/s of the decoding, or parameters")
    p.add_argument("--decoding", choices=["greedy", "beam"], default="greedy")
    p.add_argument("--title", default=None)


def run(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.results) as f:
        results = json.load(f)
    systems = results.get("systems", [])
    require(systems, f"{args.results} lists no systems")
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
