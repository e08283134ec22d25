"""Print the systems of a results file (from fairseq-kd evaluate) as a Markdown table with sacreBLEU signatures."""
from fairseq_kd.errors import require
from fairseq_kd.results import find_system, markdown_table, read_results

USES_FAIRSEQ = False  # fairseq-kd does not import fairseq for this command (fairseq_kd.cli)


def add_arguments(p):
    from fairseq_kd.published import KIM_RUSH_2016
    from fairseq_kd.study import BOOTSTRAP_SAMPLES

    p.add_argument("results", help="results JSON from fairseq-kd evaluate")
    p.add_argument("--baseline", default=None,
                   help="system whose BLEU the others are compared with (adds two 'vs NAME' columns)")
    p.add_argument("--teacher", default=None,
                   help="system whose beam BLEU the others are compared with (adds two 'vs NAME beam' "
                        "columns: each decoding's BLEU minus the teacher's beam BLEU)")
    p.add_argument("--significance", default=None, metavar="REF",
                   help="the test reference: adds sacreBLEU's paired bootstrap p-value of each BLEU "
                        "difference from --baseline and each BLEU's 95%% interval, from the hypotheses "
                        "fairseq-kd evaluate wrote beside RESULTS (seed: SACREBLEU_SEED, default 12345)")
    p.add_argument("--systems", nargs="+", default=None, metavar="NAME",
                   help="only these rows, in this order (default: every row); --baseline and --teacher "
                        "must be among them")
    p.add_argument("--bootstrap-samples", type=int, default=BOOTSTRAP_SAMPLES,
                   help="resamples of the paired bootstrap test")
    p.add_argument("--kim-rush", action="store_true",
                   help="print instead Kim & Rush (2016)'s WMT14 En-De rows beside this study's systems that "
                        "do the same (teacher, baseline, word_kd, seq_kd, seq_word_kd, --kim-rush-pruned): BLEU "
                        "against each one's teacher beam score and no-KD student (--teacher, --baseline: "
                        "ours, default teacher and baseline)")
    p.add_argument("--kim-rush-pruned", default=KIM_RUSH_2016[-1].ours, metavar="NAME",
                   help="with --kim-rush: our student pruned to 80%% of its weights, set beside Kim & Rush's "
                        "pruned Seq-KD student")
    p.add_argument("--no-speed", action="store_true",
                   help="leave out the sentences/s columns (for systems scored while other jobs ran, "
                        "whose speeds mean nothing)")


def run(args):
    results = read_results(args.results)
    if args.kim_rush:
        from fairseq_kd.published import kim_rush_rows, kim_rush_table

        print(kim_rush_table(results, args.teacher or "teacher", args.baseline or "baseline",
                             kim_rush_rows(args.kim_rush_pruned)), end="")
        return
    if args.systems is not None:
        for option, name in (("--baseline", args.baseline), ("--teacher", args.teacher)):
            require(name is None or name in args.systems, f"{option} {name}: not one of --systems")
        results = {**results, "systems": [find_system(results, n, "--systems") for n in args.systems]}
    significance = None
    if args.significance is not None:
        from fairseq_kd.study import paired_significance

        require(args.baseline is not None, "--significance compares with --baseline: name one")
        significance = paired_significance(args.results, results, args.significance, args.baseline,
                                           args.bootstrap_samples)
    print(markdown_table(results, args.baseline, args.teacher, significance, speed=not args.no_speed), end="")
