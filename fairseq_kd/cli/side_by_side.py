"""Print a few test sentences side by side: source, reference and each system's translation.

Reads the hypotheses ``fairseq-kd evaluate`` left beside a results file (each
checked to score the BLEU the file records) and prints --lines test sentences
spread evenly over the test set, skipping pairs longer than --max-chars so that
each fits a terminal line or two; the demo (examples/quickstart.sh) ends with it:

  fairseq-kd side-by-side results.json --src raw/test.es --ref raw/test.en \\
      --systems teacher "baseline (shipped)" "seq_kd (shipped)"
"""
from fairseq_kd.results import DECODINGS, read_results
from fairseq_kd.study import side_by_side

USES_FAIRSEQ = False  # fairseq-kd does not import fairseq for this command (fairseq_kd.cli)


def add_arguments(p):
    p.add_argument("results", help="results JSON from fairseq-kd evaluate (its hypotheses files beside it)")
    p.add_argument("--src", required=True, help="the detokenized source side of the test split")
    p.add_argument("--ref", required=True, help="the detokenized reference the systems were scored against")
    p.add_argument("--systems", nargs="+", required=True, metavar="NAME",
                   help="rows of the results file whose translations are shown, in this order")
    p.add_argument("--lines", type=int, default=3, help="test sentences shown (default: %(default)s)")
    p.add_argument("--decoding", choices=DECODINGS, default="beam",
                   help="which of each row's translations (default: %(default)s)")
    p.add_argument("--max-chars", type=int, default=160,
                   help="only pairs whose source and reference are at most this long (default: %(default)s)")


def run(args):
    print(side_by_side(args.results, read_results(args.results), args.src, args.ref, args.systems,
                       args.lines, args.decoding, args.max_chars), end="")
