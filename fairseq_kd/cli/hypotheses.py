"""Write every system's test hypotheses (greedy and beam) xz-compressed into a folder, to ship with the results.

Reads the hypotheses ``fairseq-kd evaluate`` left beside a results file, checks
that each rescores to the BLEU the results file records, and writes them as
``RESULTS.NAME.DECODING.txt.xz`` with the reference (``REF.xz``), the rows
(``results.json``, paths of the machine left out), each ``--log``'s training
record (``training.NAME.json``) and a README.md saying how to rescore them
(``xz -dc FILE | sacrebleu REF``).
"""
from fairseq_kd.cli.curves import named_logs
from fairseq_kd.results import read_results
from fairseq_kd.study import export_hypotheses

USES_FAIRSEQ = False  # fairseq-kd does not import fairseq for this command (fairseq_kd.cli)


def add_arguments(p):
    p.add_argument("results", help="results JSON from fairseq-kd evaluate (its hypotheses files beside it)")
    p.add_argument("--ref", required=True, help="the detokenized reference the systems were scored against")
    p.add_argument("--out", required=True, help="folder to write (created if missing; its old *.txt.xz replaced)")
    p.add_argument("--systems", nargs="+", default=None, metavar="NAME",
                   help="only these rows of the results file (default: every row)")
    p.add_argument("--log", action="append", default=[], metavar="NAME=LOGFILE",
                   help="a student's fairseq-train log or training record, written beside the hypotheses as "
                        "training.NAME.json (repeat for each)")


def run(args):
    written = export_hypotheses(args.results, read_results(args.results), args.ref, args.out, args.systems,
                                named_logs(args.log))
    print(f"wrote {len(written)} files to {args.out}")
