"""fairseq-kd as a command: quick start-up, only relevant output, one-line errors for bad input."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from fairseq_kd import cli
from helpers import REPO, env, run, tool

RESULTS = {
    "bleu_signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0",
    "chrf_signature": "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0",
    "device": "CPU (2 cores)",
    "systems": [{"name": n, "params": p, "device": "CPU (2 cores)",
                 "greedy": {"beam": 1, "bleu": b, "chrf": 30.0, "sentences_per_s": s},
                 "beam": {"beam": 5, "bleu": b + 1, "chrf": 31.0, "sentences_per_s": s / 3}}
                for n, p, b, s in (("teacher", 6_600_000, 20.0, 25.0), ("student", 1_400_000, 18.5, 60.0))],
}


def cli_error(capsys, *argv):
    """The one ``fairseq-kd CMD: error:`` line of a command run in this process."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fairseq-kd {argv[0]}: error: "), err
    return lines[0]


def imported_modules(stderr):
    """Top-level modules in the output of python's -X importtime."""
    return {line.rsplit("|", 1)[-1].strip().split(".")[0]
            for line in stderr.splitlines() if line.startswith("import time:")}


# ------------------------------------------------------------ start-up, output
def test_help_imports_neither_fairseq_nor_torch():
    e = dict(env(), PYTHONPROFILEIMPORTTIME="1")
    quick = [[tool("fairseq-kd"), "--help"]] + [[tool("fairseq-kd"), c, "--help"]
                                                 for c in ("table", "plot", "curves", "hypotheses", "spm", "translate")]
    for cmd in quick:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "usage: fairseq-kd" in proc.stdout
        modules = imported_modules(proc.stderr)
        assert "fairseq_kd" in modules
        assert not modules & {"fairseq", "torch", "fairseq_cli"}, sorted(modules)


def test_summaries_are_the_module_docstrings():
    for module_name, summary in cli.SUBCOMMANDS.values():
        doc = importlib.import_module(module_name).__doc__
        assert doc.strip().splitlines()[0] == summary


def test_plain_import_still_registers_the_plugin():
    proc = run([sys.executable, "-c", "import fairseq_kd, fairseq.tasks as t, fairseq.criterions as c, "
                "fairseq.models as m; print('translation_kd' in t.TASK_REGISTRY, 'word_kd' in "
                "c.CRITERION_REGISTRY, 'transformer_student_tiny' in m.ARCH_MODEL_REGISTRY)"])
    assert proc.stdout.split() == ["True", "True", "True"]


def test_fairseq_command_prints_only_its_error(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 4)
    proc = run([tool("fairseq-kd"), "export", "--path", junk, "--out", tmp_path / "x.pt"], check=False)
    # no "Please install tensorboardX" from importing fairseq, no torch advice
    assert proc.stderr.splitlines() == [
        f"fairseq-kd export: error: {junk} is not a fairseq checkpoint (torch cannot read it: UnpicklingError)"]
    assert proc.returncode == 2


def test_plot_is_quiet_and_creates_its_folder(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    out = tmp_path / "new" / "folder" / "speed.png"
    proc = run([tool("fairseq-kd"), "plot", results, "--out", out])
    assert proc.stderr == ""  # matplotlib's DEBUG font search is not shown
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------ table and plot
@pytest.mark.parametrize("content, message", [
    (None, "results file not found"),
    ("x\n", "is not a JSON file (Expecting value"),
    ("{}", "is not a results file of fairseq-kd evaluate (no 'systems' list)"),
    ('{"systems": []}', "lists no systems"),
    ('{"systems": [{"name": "a", "params": 1}]}', "system 'a' lacks greedy, beam"),
])
@pytest.mark.parametrize("command", ["table", "plot"])
def test_bad_results_file_is_one_line_error(capsys, tmp_path, command, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    extra = ["--out", tmp_path / "p.png"] if command == "plot" else []
    assert message in cli_error(capsys, command, path, *extra)


def test_table_of_a_good_file(capsys, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    assert cli.main(["table", str(path), "--baseline", "teacher"]) == 0
    out = capsys.readouterr().out
    assert "| student | 1.4M | 18.5 |" in out and "device: CPU (2 cores)" in out


def test_curves_plots_and_prints_only_the_summary(tmp_path):
    from test_curves import train_line, valid_line

    logs = []
    for name, bleus in (("baseline", (10.0, 12.5, 12.0)), ("seq_kd", (11.0, 13.0, 14.25))):
        lines = [line for k, bleu in enumerate(bleus, 1)
                 for line in (valid_line(k, 100 * k, bleu, 6.0), train_line(k, 100 * k, 360, 400 * k))]
        (tmp_path / f"{name}.log").write_text("\n".join(lines) + "\n")
        logs += ["--log", f"{name}={tmp_path / f'{name}.log'}"]
    out = tmp_path / "plots" / "curves.png"
    proc = run([tool("fairseq-kd"), "curves", *logs, "--out", out])
    assert proc.stderr == ""
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = proc.stdout.splitlines()
    assert rows[2] == "| baseline | 12.50 | 200 (2) | 300 (3) | 1 | 0.30 |"
    assert rows[3] == "| seq_kd | 14.25 | 300 (3) | 300 (3) | 0 | 0.30 |"


@pytest.mark.parametrize("spec, message", [
    ("baseline", "--log baseline: expected NAME=LOGFILE"),
    ("=x.log", "--log =x.log: expected NAME=LOGFILE"),
    ("a=missing.log", "training log not found: missing.log"),
])
def test_curves_bad_log_is_one_line_error(capsys, tmp_path, spec, message):
    assert message in cli_error(capsys, "curves", "--log", spec, "--out", tmp_path / "c.png")


def test_curves_same_name_twice_is_one_line_error(capsys, tmp_path):
    log = tmp_path / "a.log"
    log.write_text("")
    assert "--log: a name given twice" in cli_error(capsys, "curves", "--log", f"a={log}", "--log", f"a={log}",
                                                    "--out", tmp_path / "c.png")


# ---------------------------------------------------------------------- spm
@pytest.fixture
def parallel_text(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, n in (("train", 40), ("test", 5)):
        for lang in ("es", "en"):
            (raw / f"{split}.{lang}").write_text(
                "".join(f"{lang} sentence number {i} of {split}\n" for i in range(n)))
    return raw


def spm_args(raw, tmp_path, *extra):
    return ["spm", "--input-dir", raw, "--src", "es", "--tgt", "en", "--splits", "train,test",
            "--out", tmp_path / "pieces", *extra]


@pytest.mark.parametrize("vocab", ["0", "-3"])
def test_spm_vocab_size_must_be_positive(capsys, parallel_text, tmp_path, vocab):
    msg = cli_error(capsys, *spm_args(parallel_text, tmp_path, "--vocab-size", vocab))
    assert msg.endswith(f"--vocab-size must be > 0, got {vocab}")


def test_spm_vocab_too_large_passes_sentencepiece_limit(capsys, parallel_text, tmp_path):
    msg = cli_error(capsys, *spm_args(parallel_text, tmp_path, "--vocab-size", "5000"))
    assert "--vocab-size 5000 is too large for the train split: sentencepiece allows at most" in msg
    limit = int(msg.rsplit("at most ", 1)[1].split()[0])
    assert cli.main([str(a) for a in spm_args(parallel_text, tmp_path, "--vocab-size", limit)]) == 0
    assert f"(vocab {limit})" in capsys.readouterr().out


def test_spm_missing_train_split(capsys, parallel_text, tmp_path):
    msg = cli_error(capsys, *spm_args(parallel_text, tmp_path, "--vocab-size", "30", "--train-split", "big"))
    assert msg.endswith(f"missing input file {parallel_text / 'big.es'}")
    assert not (tmp_path / "pieces").exists()  # checked before anything is written


def test_spm_model_encodes_with_an_existing_model_as_training_did(capsys, parallel_text, tmp_path):
    """Encoding with --model (a shipped teacher's vocabulary) gives the pieces
    of the run that trained that model, and trains nothing."""
    assert cli.main([str(a) for a in spm_args(parallel_text, tmp_path, "--vocab-size", "25")]) == 0
    trained = tmp_path / "pieces"
    again = tmp_path / "again"
    args = ["spm", "--input-dir", parallel_text, "--src", "es", "--tgt", "en", "--splits", "test",
            "--model", trained / "spm.model", "--vocab-size", "999999", "--out", again]
    assert cli.main([str(a) for a in args]) == 0
    assert "(vocab 25)" in capsys.readouterr().out.splitlines()[-1]
    for lang in ("es", "en"):
        assert (again / f"test.sp.{lang}").read_text() == (trained / f"test.sp.{lang}").read_text()
    assert (again / "spm.model").read_bytes() == (trained / "spm.model").read_bytes()
    assert not (again / "train.sp.es").exists()


def test_spm_model_that_is_not_sentencepiece_is_one_line(capsys, parallel_text, tmp_path):
    (tmp_path / "bad.model").write_text("not a model")
    msg = cli_error(capsys, *spm_args(parallel_text, tmp_path, "--model", tmp_path / "bad.model"))
    assert f"--model {tmp_path / 'bad.model'} is not a SentencePiece model" in msg
    msg = cli_error(capsys, *spm_args(parallel_text, tmp_path, "--model", tmp_path / "none.model"))
    assert msg.endswith(f"--model {tmp_path / 'none.model'}: no such file")


# ------------------------------------------------------- checkpoints: prune, export
def bad_checkpoints(tmp_path):
    files = {"random bytes": bytes(range(256)) * 4, "text": b"hello\n", "empty": b""}
    for name, data in files.items():
        (tmp_path / f"{name}.pt").write_bytes(data)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "dict.pt")
    return {
        tmp_path / "random bytes.pt": "is not a fairseq checkpoint (torch cannot read it: UnpicklingError)",
        tmp_path / "text.pt": "is not a fairseq checkpoint (torch cannot read it: KeyError)",
        tmp_path / "empty.pt": "is empty: not a fairseq checkpoint",
        tmp_path / "dict.pt": "is not a fairseq checkpoint (no 'model' entry)",
    }


@pytest.mark.parametrize("command", ["prune", "export"])
def test_non_checkpoint_is_one_line_error(capsys, tmp_path, command):
    extra = ["--ratio", "0.5"] if command == "prune" else []
    for path, message in bad_checkpoints(tmp_path).items():
        msg = cli_error(capsys, command, "--path", path, "--out", tmp_path / "out" / "x.pt", *extra)
        assert msg.endswith(f"{path} {message}")


def test_prune_mask_out_must_not_overwrite_the_pruned_checkpoint(capsys, tiny_teacher, tmp_path):
    out = tmp_path / "pruned.pt"
    msg = cli_error(capsys, "prune", "--path", tiny_teacher, "--ratio", "0.5", "--out", out, "--mask-out", out)
    assert msg.endswith(f"--mask-out must differ from --out ({out})")
    assert not out.exists()
    msg = cli_error(capsys, "prune", "--path", tiny_teacher, "--ratio", "0.5", "--out", out,
                    "--mask-out", tiny_teacher)
    assert "--mask-out must differ from --path" in msg


# ----------------------------------------------------------------- cache-teacher
def test_cache_teacher_missing_dictionary(capsys, tiny_data, tiny_teacher, tmp_path):
    msg = cli_error(capsys, "cache-teacher", tiny_data / "bin", "--teacher-path", tiny_teacher,
                    "--out", tmp_path / "cache", "-s", "en", "-t", "de", "--cpu")
    assert msg.endswith(f"missing dictionary {os.path.join(tiny_data / 'bin', 'dict.de.txt')}")
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------- --help
def help_entries(text):
    """``{option string: its whole help entry on one line}`` of an argparse --help output."""
    entries, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):  # an option: its flags, then (maybe on the next line) its help
            current = [line.strip()]
            for flag in line.strip().split("  ")[0].split(", "):
                entries[flag.split()[0]] = current
        elif current is not None and line.startswith("    "):  # the help, continued
            current.append(line.strip())
        else:
            current = None
    return {flag: " ".join(lines) for flag, lines in entries.items()}


def options_with_defaults(command):
    """Options of ``command`` that take a value and have a default other than None."""
    import argparse

    module = importlib.import_module(cli.SUBCOMMANDS[command][0])
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return {a.option_strings[0]: a.default for a in parser._actions
            if a.option_strings and a.nargs != 0 and a.default not in (None, argparse.SUPPRESS)}


@pytest.mark.parametrize("command", ["evaluate", "translate", "cache-teacher", "spm"])
def test_help_shows_every_default(capsys, command):
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    assert stop.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    defaults = options_with_defaults(command)
    assert {"evaluate": "--beam", "translate": "--max-len-a", "cache-teacher": "--topk",
            "spm": "--vocab-size"}[command] in defaults
    missing = {flag: default for flag, default in defaults.items()
               if f"(default: {default}" not in entries[flag]}
    assert not missing, f"fairseq-kd {command} --help hides the defaults {missing}"


@pytest.mark.parametrize("command", ["evaluate", "translate"])
def test_help_says_why_the_length_bound_differs_from_corpus(capsys, command):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    entry = help_entries(capsys.readouterr().out)["--max-len-a"]
    assert "(default: 1.5)" in entry and "fairseq-kd corpus keeps fairseq-generate's 0 x source + 200" in entry
