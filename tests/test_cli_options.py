"""fairseq-kd options NAME: the training options fairseq-train --help does not show, from their dataclasses."""
import dataclasses
import re

import pytest

from fairseq_kd import cli
from fairseq_kd.criterions.a2d import A2DConfig
from fairseq_kd.criterions.ckd import CKDConfig
from fairseq_kd.criterions.hybrid_kd import HybridKDConfig
from fairseq_kd.criterions.seq_kd import SeqKDConfig
from fairseq_kd.criterions.word_kd import WordKDConfig
from fairseq_kd.tasks.translation_kd import TranslationKDConfig
from helpers import USER_DIR, run, tool

CONFIGS = {"word_kd": WordKDConfig, "seq_kd": SeqKDConfig, "hybrid_kd": HybridKDConfig,
           "ckd": CKDConfig, "a2d": A2DConfig, "translation_kd": TranslationKDConfig}


def listing(capsys, name):
    assert cli.main(["options", name]) == 0
    return capsys.readouterr().out


def listed_options(text):
    """``{flag: (default as printed, help on one line, section)}`` of an options listing."""
    options, section, flag = {}, None, None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            section = line
        head = re.match(r"  (\S+?)(?:, -\w)?  .*\(default: (.*)\)$", line)
        if head:
            flag = head.group(1)
            options[flag] = (head.group(2), "", section)
        elif line.startswith("      ") and flag:
            default, help_text, sec = options[flag]
            options[flag] = (default, (help_text + " " + line.strip()).strip(), sec)
    return options


def command_line_fields(config):
    """The fields fairseq-train turns into options: all but _name and those set from another group."""
    return [f for f in dataclasses.fields(config) if f.name != "_name"
            and not (isinstance(f.default, str) and f.default.startswith("${"))]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lists_every_field_with_its_default_and_help(capsys, name):
    options = listed_options(listing(capsys, name))
    fields = command_line_fields(CONFIGS[name])
    flags = ["data" if f.name == "data" else "--" + f.name.replace("_", "-") for f in fields]
    assert sorted(options) == sorted(flags)
    for field, flag in zip(fields, flags):
        default, help_text, _ = options[flag]
        assert default == str(field.default), flag
        assert help_text == " ".join(field.metadata.get("help", "").split()), flag


@pytest.mark.parametrize("name, own, inherited", [
    ("word_kd", "--kd-alpha", "--label-smoothing"),
    ("a2d", "--a2d-beta", "--label-smoothing"),
    ("translation_kd", "--teacher-path", "--source-lang"),
])
def test_plugin_options_come_before_fairseqs(capsys, name, own, inherited):
    options = listed_options(listing(capsys, name))
    assert options[own][2] == "added by fairseq_kd:"
    assert options[inherited][2].startswith("inherited from fairseq (")


def test_a_default_fairseq_kd_overrides_counts_as_its_own(capsys):
    options = listed_options(listing(capsys, "hybrid_kd"))
    assert options["--kd-alpha"][:1] == ("1.0",) and options["--kd-alpha"][2] == "added by fairseq_kd:"
    assert options["--gate"][0] == "complexity"


def test_unknown_name_is_one_line_listing_the_known_ones(capsys):
    assert cli.main(["options", "label_smoothed_cross_entropy"]) == 2  # fairseq's, not fairseq_kd's
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    head, criterions, tasks = re.fullmatch(
        r"(fairseq-kd options: error: unknown criterion or task 'label_smoothed_cross_entropy') "
        r"\(criterions: (.*); tasks: (.*)\)", err[0]).groups()
    assert set(criterions.split(", ")) >= set(CONFIGS) - {"translation_kd"}
    assert tasks == "translation_kd"


def test_names_are_read_from_fairseqs_registries():
    from fairseq_kd.cli.options import known_configs

    known = known_configs()
    assert {name: known[name] for name in CONFIGS} == {
        name: ("task" if name == "translation_kd" else "criterion", config) for name, config in CONFIGS.items()}


def test_fairseq_train_help_does_not_list_them_but_the_command_does():
    """Why the command exists: fairseq-train answers --help before it adds the criterion's options."""
    train = run([tool("fairseq-train"), "--user-dir", USER_DIR, "--task", "translation_kd",
                 "--criterion", "ckd", "--help"])
    assert "--ckd-beta" not in train.stdout and "--teacher-path" not in train.stdout
    options = run([tool("fairseq-kd"), "options", "ckd"])
    assert "  --ckd-beta  FLOAT  (default: 0.2)" in options.stdout.splitlines()
