"""Print the systems of a results file (from fairseq-kd evaluate) as a Markdown table with sacreBLEU signatures."""
from fairseq_kd.results import markdown_table, read_results

USES_FAIRSEQ = False  # fairseq-kd does not import fairseq for this command (fairseq_kd.cli)


def add_arguments(p):
    p.add_argument("results", help="results JSON from fairseq-kd evaluate")
    p.add_argument("--baseline", default=None,
                   help="system whose BLEU the others are compared with (adds two 'vs NAME' columns)")


def run(args):
    print(markdown_table(read_results(args.results), args.baseline), end="")
