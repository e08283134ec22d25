"""``fairseq-kd``: the package's command-line tools, one subcommand per module.

Each module in ``SUBCOMMANDS`` defines ``add_arguments(parser)`` and
``run(args)``, and its docstring's first line is the subcommand's summary.
Modules are imported only when their subcommand runs, so ``--help`` is quick.
"""
import argparse
import importlib
import sys

from fairseq_kd.errors import KDError

SUBCOMMANDS = {
    "spm": "fairseq_kd.cli.spm",
    "corpus": "fairseq_kd.cli.corpus",
    "prune": "fairseq_kd.cli.prune",
    "export": "fairseq_kd.cli.export",
    "evaluate": "fairseq_kd.cli.evaluate",
    "table": "fairseq_kd.cli.table",
    "plot": "fairseq_kd.cli.plot",
    "cache-teacher": "fairseq_kd.cli.cache_teacher",
}


def build_parser():
    parser = argparse.ArgumentParser(prog="fairseq-kd", description="fairseq_kd command-line tools: distilled corpora, pruning, export and more.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args._module.run(args) or 0
    except KDError as e:
        print(f"fairseq-kd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
