"""Print the systems of a results file (from fairseq-kd evaluate) as a Markdown table with sacreBLEU signatures."""
import json


def add_arguments(p):
    p.add_argument("results", help="results JSON from fairseq-kd evaluate")


def markdown_table(results):
    lines = ["| system | params | BLEU greedy | chrF greedy | sent/s greedy | BLEU beam | chrF beam | sent/s beam |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in results["systems"]:
        g, b = s["greedy"], s["beam"]
        lines.append(f"| {s['name']} | {s['params'] / 1e6:.1f}M | {g['bleu']:.1f} | {g['chrf']:.1f} | "
                     f"{g['sentences_per_s']:.0f} | {b['bleu']:.1f} | {b['chrf']:.1f} | {b['sentences_per_s']:.0f} |")
    lines.append("")
    lines.append(f"BLEU signature: `{results.get('bleu_signature', '')}`  ")
    lines.append(f"chrF signature: `{results.get('chrf_signature', '')}`  ")
    lines.append(f"beam search: beam {results['systems'][0]['beam']['beam']}; device: {results.get('device')}")
    return "\n".join(lines) + "\n"


def run(args):
    with open(args.results) as f:
        print(markdown_table(json.load(f)), end="")
