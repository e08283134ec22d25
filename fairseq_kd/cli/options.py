"""List the training options of a fairseq_kd criterion or of the translation_kd task, with defaults.

fairseq-train adds the options of the task and the criterion to its parser in
a second stage, after --help has already been answered, so
``fairseq-train --help`` never lists them (not even with ``--user-dir
fairseq_kd --task translation_kd --criterion word_kd``).  This command builds
them the way fairseq-train does, from the same dataclass
(fairseq.dataclass.utils.gen_parser_from_dataclass), and prints each option's
flag, default and help: first those fairseq_kd adds, then those the class
inherits from fairseq's own criterion or task.

  fairseq-kd options word_kd           # a criterion: word_kd, seq_kd, hybrid_kd, ckd, a2d
  fairseq-kd options translation_kd    # the task
"""
import argparse
import dataclasses
import textwrap

from fairseq_kd.errors import KDError

PLUGIN_MODULE = "fairseq_kd"
WIDTH = 88


@dataclasses.dataclass(frozen=True)
class Option:
    """One command-line option of a config dataclass, as fairseq-train adds it."""

    flags: tuple  # e.g. ("--source-lang", "-s"), or ("data",) for the positional argument
    default: object
    help: str
    kind: str  # "FLOAT", "{a,b}", "flag (sets True)", ...
    owner: type  # the dataclass whose declaration of the field applies


def add_arguments(p):
    p.add_argument("name", help="a fairseq_kd criterion (the --criterion value, e.g. word_kd) or the "
                   "task translation_kd; an unknown name lists the known ones")


def known_configs():
    """``{name: (what, config dataclass)}`` of every criterion and task fairseq_kd registers."""
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY, CRITERION_REGISTRY
    from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY

    found = {}
    for what, classes, configs in (("criterion", CRITERION_REGISTRY, CRITERION_DATACLASS_REGISTRY),
                                   ("task", TASK_REGISTRY, TASK_DATACLASS_REGISTRY)):
        for name in sorted(classes):
            if classes[name].__module__.split(".")[0] == PLUGIN_MODULE and name in configs:
                found[name] = (what, configs[name])
    return found


def config_of(name):
    """``(what, dataclass)`` of ``name``; a one-line error naming the known ones otherwise."""
    known = known_configs()
    if name not in known:
        listing = "; ".join(f"{what}s: " + ", ".join(n for n, (w, _) in known.items() if w == what)
                            for what in ("criterion", "task"))
        raise KDError(f"unknown criterion or task {name!r} ({listing})")
    return known[name]


def declaring_class(config, field_name):
    """The most derived class of ``config``'s hierarchy that declares ``field_name``: its default applies."""
    for cls in config.__mro__:
        if field_name in vars(cls).get("__annotations__", {}):
            return cls
    return config


def kind_of(action):
    """How an option takes its value: a type name, its choices, or a flag."""
    if isinstance(action, argparse._StoreTrueAction):
        return "flag (sets True)"
    if isinstance(action, argparse._StoreFalseAction):
        return "flag (sets False)"
    if action.choices:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    name = getattr(action.type, "__name__", "")
    return name.upper() if name and name != "<lambda>" else "VALUE"


def options_of(config):
    """The options fairseq-train adds for ``config``, in its field order."""
    from fairseq.dataclass.utils import gen_parser_from_dataclass

    parser = argparse.ArgumentParser(add_help=False)
    gen_parser_from_dataclass(parser, config())
    return [Option(flags=tuple(a.option_strings) or (a.dest,), default=a.default, help=a.help or "",
                   kind=kind_of(a), owner=declaring_class(config, a.dest))
            for a in parser._actions]


def is_plugin_class(cls):
    return cls.__module__.split(".")[0] == PLUGIN_MODULE


def option_lines(option):
    """An option as help text: flags, how it takes a value and its default, then its help."""
    head = f"  {', '.join(option.flags)}  {option.kind}  (default: {option.default})"
    body = textwrap.fill(option.help, WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6,
                         break_long_words=False, break_on_hyphens=False)  # words stay whole
    return [head] + ([body] if option.help else [])


def listing(name):
    """The whole listing of ``name``'s options, as printed."""
    what, config = config_of(name)
    flag = "--task" if what == "task" else "--criterion"
    options = options_of(config)
    lines = [f"fairseq-train --user-dir fairseq_kd {flag} {name}: options of "
             f"{config.__module__}.{config.__name__}"]
    own = [o for o in options if is_plugin_class(o.owner)]
    inherited = [o for o in options if not is_plugin_class(o.owner)]
    if own:
        lines += ["", "added by fairseq_kd:"] + [line for o in own for line in option_lines(o)]
    if inherited:
        parents = ", ".join(dict.fromkeys(f"{o.owner.__module__}.{o.owner.__name__}" for o in inherited))
        lines += ["", f"inherited from fairseq ({parents}):"]
        lines += [line for o in inherited for line in option_lines(o)]
    return lines


def run(args):
    print("\n".join(listing(args.name)))
