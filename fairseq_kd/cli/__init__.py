"""``fairseq-kd``: the package's command-line tools, one subcommand per module.

Each module in ``SUBCOMMANDS`` defines ``add_arguments(parser)`` and
``run(args)``; its docstring's first line is the subcommand's summary (also
written in ``SUBCOMMANDS``, a test keeps the two equal).  A module is
imported only when its subcommand is named, and fairseq (seconds to import)
only when a subcommand that uses it runs (a module without fairseq sets
``USES_FAIRSEQ = False``), so ``fairseq-kd --help``, ``fairseq-kd table``,
``fairseq-kd plot`` and ``fairseq-kd curves`` are quick.
"""
import argparse
import importlib
import logging
import sys

from fairseq_kd.errors import KDError

SUBCOMMANDS = {
    "spm": ("fairseq_kd.cli.spm",
            "Train a joint SentencePiece model on parallel text and encode every split into pieces."),
    "corpus": ("fairseq_kd.cli.corpus",
               "Translate a training split with the teacher into a distilled corpus "
               "(Seq-KD, Seq-Inter, MBR, n-best, filtered)."),
    "prune": ("fairseq_kd.cli.prune",
              "Magnitude-prune a student checkpoint's linear (and optionally embedding) weights to a ratio."),
    "average": ("fairseq_kd.cli.average",
                "Average the weights of several checkpoints of one training run into one checkpoint."),
    "export": ("fairseq_kd.cli.export",
               "Write a student checkpoint that stock fairseq loads without --user-dir "
               "(no training-only state)."),
    "translate": ("fairseq_kd.cli.translate",
                  "Translate raw text with a model folder of fairseq-kd export --format ctranslate2."),
    "evaluate": ("fairseq_kd.cli.evaluate",
                 "Translate a test split with one checkpoint (greedy and beam), score it and record it "
                 "in a results file."),
    "table": ("fairseq_kd.cli.table",
              "Print the systems of a results file (from fairseq-kd evaluate) as a Markdown table with "
              "sacreBLEU signatures."),
    "plot": ("fairseq_kd.cli.plot",
             "Plot BLEU against translation speed (or parameters) for the systems of a results file."),
    "curves": ("fairseq_kd.cli.curves",
               "Plot validation scores against updates from fairseq-train logs and print how each run "
               "converged."),
    "hypotheses": ("fairseq_kd.cli.hypotheses",
                   "Write every system's test hypotheses (greedy and beam) xz-compressed into a folder, "
                   "to ship with the results."),
    "side-by-side": ("fairseq_kd.cli.side_by_side",
                     "Print a few test sentences side by side: source, reference and each system's "
                     "translation."),
    "cache-teacher": ("fairseq_kd.cli.cache_teacher",
                      "Run a teacher once over binarized splits and cache its top-k distributions for "
                      "word-level KD."),
    "options": ("fairseq_kd.cli.options",
                "List the training options of a fairseq_kd criterion or of the translation_kd task, "
                "with defaults."),
}

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"
# Loggers that talk at INFO/DEBUG about things irrelevant to these commands:
# fairseq's speech tasks advertise tensorboardX when fairseq is imported,
# matplotlib lists its font search, sacreBLEU narrates each paired test.
QUIET_LOGGERS = ("fairseq.tasks.text_to_speech", "matplotlib", "PIL", "sacrebleu")


def build_parser(commands=tuple(SUBCOMMANDS)):
    """The ``fairseq-kd`` parser; only the modules of ``commands`` are imported
    (for their options), the other subcommands are listed with their summaries."""
    parser = argparse.ArgumentParser(prog="fairseq-kd", description="fairseq_kd command-line tools: distilled corpora, pruning, export and more.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, summary) in SUBCOMMANDS.items():
        if name not in commands:
            sub.add_parser(name, help=summary)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=summary, description=(module.__doc__ or "").strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def requested_command(argv):
    """The subcommand named in ``argv`` (the top-level parser has no option taking a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def configure_logging():
    """INFO to stderr, set before fairseq is imported.

    Importing fairseq runs ``logging.basicConfig(level=DEBUG)`` (in a wav2vec
    module); with a handler already on the root logger that call does nothing.
    The root level is set too, for when fairseq was imported before ``main``.
    """
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S",
                        stream=sys.stderr)
    logging.getLogger().setLevel(logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    configure_logging()
    args = build_parser([requested_command(argv)]).parse_args(argv)
    try:
        if getattr(args._module, "USES_FAIRSEQ", True):
            import fairseq_kd

            fairseq_kd.register()
        return args._module.run(args) or 0
    except KDError as e:
        print(f"fairseq-kd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
