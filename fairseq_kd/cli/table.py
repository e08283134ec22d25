"""Print the systems of a results file (from fairseq-kd evaluate) as a Markdown table with sacreBLEU signatures."""
import json
import os

from fairseq_kd.errors import KDError, require

USES_FAIRSEQ = False  # fairseq-kd does not import fairseq for this command (fairseq_kd.cli)

DECODING_KEYS = ("beam", "bleu", "chrf", "sentences_per_s")


def add_arguments(p):
    p.add_argument("results", help="results JSON from fairseq-kd evaluate")
    p.add_argument("--baseline", default=None,
                   help="system whose BLEU the others are compared with (adds two 'vs NAME' columns)")


def read_results(path, allow_empty=False):
    """A results file written by ``fairseq-kd evaluate``, checked (for table, plot, evaluate)."""
    require(os.path.isfile(path), f"results file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KDError(f"{path} is not a JSON file ({e})") from None
    require(isinstance(results, dict) and isinstance(results.get("systems"), list),
            f"{path} is not a results file of fairseq-kd evaluate (no 'systems' list)")
    require(allow_empty or results["systems"], f"{path} lists no systems")
    for system in results["systems"]:
        check_system(system, path)
    return results


def check_system(system, path):
    name = system.get("name") if isinstance(system, dict) else None
    require(isinstance(name, str), f"{path}: a system without a name")
    missing = [k for k in ("params", "greedy", "beam") if k not in system]
    missing += [f"{d}.{k}" for d in ("greedy", "beam") if isinstance(system.get(d), dict)
                for k in DECODING_KEYS if k not in system[d]]
    require(not missing, f"{path}: system '{name}' lacks {', '.join(missing)}")


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
    print(markdown_table(read_results(args.results), args.baseline), end="")
