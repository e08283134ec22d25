"""Print the systems of a results file (from fairseq-kd evaluate) as a Markdown table with sacreBLEU signatures."""
import json

from fairseq_kd.errors import require


def add_arguments(p):
    p.add_argument("results", help="results JSON from fairseq-kd evaluate")
    p.add_argument("--baseline", default=None,
                   help="system whose BLEU the others are compared with (adds two 'vs NAME' columns)")


def markdown_table(results, baseline=None):
    head = "| system | params | BLEU greedy | chrF greedy | sent/s greedy | BLEU beam | chrF beam | sent/s beam |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    base = None
    if baseline is not None:
        found = [s for s in results["systems"] if s["name"] == baseline]
        require(found, f"--baseline {baseline}: no such system in the results")
        base = found[0]
        head += f" BLEU greedy vs {baseline} | BLEU beam vs {baseline} |"
        rule += "---:|---:|"
    lines = [head, rule]
    for s in results["systems"]:
        g, b = s["greedy"], s["beam"]
        row = (f"| {s['name']} | {s['params'] / 1e6:.1f}M | {g['bleu']:.1f} | {g['chrf']:.1f} | "
               f"{g['sentences_per_s']:.0f} | {b['bleu']:.1f} | {b['chrf']:.1f} | {b['sentences_per_s']:.0f} |")
        if base is not None:
            # from the stored scores (2 decimals), then rounded like the columns
            row += "".join(f" {round(s[d]['bleu'] - base[d]['bleu'], 1) + 0.0:+.1f} |"  # + 0.0: no "-0.0"
                           for d in ("greedy", "beam"))
        lines.append(row)
    lines.append("")
    lines.append(f"BLEU signature: `{results.get('bleu_signature', '')}`  ")
    lines.append(f"chrF signature: `{results.get('chrf_signature', '')}`  ")
    lines.append(f"beam search: beam {results['systems'][0]['beam']['beam']}; device: {results.get('device')}")
    return "\n".join(lines) + "\n"


def run(args):
    with open(args.results) as f:
        print(markdown_table(json.load(f), args.baseline), end="")
