"""The teacher-student dictionary check compares symbols, and says so when it cannot.

A fairseq checkpoint stores only embedding sizes, and fairseq-preprocess pads a
dictionary to a multiple of 8, so two different vocabularies easily share a
size.  These tests give a student data folder the shipped teacher's dictionary
with two entries swapped (same size, different symbols; the teacher's own data
folder is a path of the machine that trained it, gone here): the check must
find the teacher's dictionary (beside the checkpoint, ``--teacher-dict``, or
embedded by ``fairseq-kd export``) and refuse it in one line, or else log a
warning that only sizes were compared.
"""
import logging
import os
import subprocess

import pytest
import torch

import helpers
from helpers import REPO, STUDENT_ARCH, USER_DIR, fairseq_train, run, tool

SHIPPED = REPO / "examples" / "teacher"
SWAPPED = 10  # dict.txt lines 10 and 11 trade places: symbols 14 and 15 (after fairseq's 4 specials)


def dict_lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def write_dict(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def swapped(lines, i=SWAPPED):
    """The same entries with lines i and i+1 exchanged: same size, other symbols."""
    lines = list(lines)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    return lines


def piece(lines, i):
    return lines[i].rsplit(" ", 1)[0]


def student_folder(folder, lines, langs=("es", "en")):
    """A student data folder as far as the task reads it before training: its dictionaries."""
    for lang in langs:
        write_dict(folder / f"dict.{lang}.txt", lines)
    return folder


def student_task(data, *extra):
    """A translation_kd task on ``data`` set up exactly as fairseq-train sets it up."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = [str(data), "--user-dir", USER_DIR, "--task", "translation_kd", "-s", "es", "-t", "en",
            "--arch", "transformer", *map(str, extra)]
    ns = options.parse_args_and_arch(options.get_training_parser(), args)
    return tasks.setup_task(convert_namespace_to_omegaconf(ns).task)


def load_teacher(data, teacher, *extra):
    """Load ``teacher`` for a student on ``data`` (the dictionary check runs here)."""
    return student_task(data, "--teacher-path", teacher, *extra).teacher.load()


@pytest.fixture
def lone_teacher(tmp_path):
    """The shipped teacher in a folder of its own: no dictionary beside it, data folder gone."""
    (tmp_path / "lone").mkdir()
    link = tmp_path / "lone" / "teacher.pt"
    link.symlink_to(SHIPPED / "teacher.pt")
    return link


def records(caplog, level):
    return [r.getMessage() for r in caplog.records if r.name == "fairseq_kd.teacher" and r.levelno == level]


# ------------------------------------------------------------- pure helpers
def test_first_difference_names_the_index_where_lists_part_or_one_ends():
    from fairseq_kd.teacher import first_difference, symbol_at

    assert first_difference(["a", "b"], ["a", "b"]) is None
    assert first_difference(["a", "b", "c"], ["a", "x", "c"]) == 1
    assert first_difference(["a", "b"], ["a", "b", "c"]) == 2
    assert symbol_at(["a", "b"], 2) == "past its end (2 entries)"
    assert symbol_at(["a", "▁b"], 1) == "'▁b'"


# --------------------------------------------------------- the shipped teacher
def test_shipped_teacher_is_checked_by_symbols_on_data_binarized_with_its_dict(tmp_path, caplog):
    """The quickstart's data: pieces binarized with --srcdict examples/teacher/dict.txt."""
    lines = dict_lines(SHIPPED / "dict.txt")
    text = " ".join(piece(lines, i) for i in range(40, 60))
    for lang in ("es", "en"):
        (tmp_path / f"train.{lang}").write_text(text + "\n", encoding="utf-8")
    run([tool("fairseq-preprocess"), "-s", "es", "-t", "en", "--trainpref", tmp_path / "train",
         "--destdir", tmp_path / "bin", "--srcdict", SHIPPED / "dict.txt", "--joined-dictionary",
         "--workers", "1"])
    with caplog.at_level(logging.INFO, logger="fairseq_kd.teacher"):
        load_teacher(tmp_path / "bin", SHIPPED / "teacher.pt")
    assert not records(caplog, logging.WARNING)
    checked, = [m for m in records(caplog, logging.INFO) if "symbol by symbol" in m]
    assert checked.endswith(f"({SHIPPED / 'dict.txt'})")


def test_same_size_other_dictionary_is_refused_naming_the_first_difference(tmp_path):
    """Sizes equal (8008), so only the symbols tell: the dict.txt beside teacher.pt does."""
    from fairseq_kd.errors import KDError

    lines = dict_lines(SHIPPED / "dict.txt")
    data = student_folder(tmp_path / "bin", swapped(lines))
    with pytest.raises(KDError) as caught:
        load_teacher(data, SHIPPED / "teacher.pt")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"teacher/student dictionary mismatch: source symbol {SWAPPED + 4} is {piece(lines, SWAPPED)!r} "
        f"in the teacher's dictionary ({SHIPPED / 'dict.txt'}) but {piece(lines, SWAPPED + 1)!r} in the "
        f"student's dict.es.txt")


def test_same_size_other_dictionary_stops_fairseq_train_with_one_line(tmp_path):
    """End to end: fairseq-train with the shipped teacher on data binarized with another
    dictionary of the same size stops before training, with one line and no traceback."""
    lines = swapped(dict_lines(SHIPPED / "dict.txt"))
    other = write_dict(tmp_path / "other_dict.txt", lines)
    text = " ".join(piece(lines, i) for i in range(40, 60))
    for split in ("train", "valid"):
        for lang in ("es", "en"):
            (tmp_path / f"{split}.{lang}").write_text(text + "\n", encoding="utf-8")
    run([tool("fairseq-preprocess"), "-s", "es", "-t", "en", "--trainpref", tmp_path / "train",
         "--validpref", tmp_path / "valid", "--destdir", tmp_path / "bin", "--srcdict", other,
         "--joined-dictionary", "--workers", "1"])
    proc = fairseq_train(tmp_path / "bin", tmp_path / "ck", *STUDENT_ARCH, "--task", "translation_kd",
                         "--teacher-path", SHIPPED / "teacher.pt", "--criterion", "word_kd",
                         "--max-epoch", "1", check=False)
    error = helpers.one_line_error(proc)
    assert f"source symbol {SWAPPED + 4} is {piece(lines, SWAPPED + 1)!r} in the teacher's dictionary" in error
    assert not list((tmp_path / "ck").glob("*.pt"))


# --------------------------------------------------- no dictionary: --teacher-dict
def test_sizes_only_is_a_logged_warning_naming_teacher_dict(tmp_path, lone_teacher, caplog):
    data = student_folder(tmp_path / "bin", swapped(dict_lines(SHIPPED / "dict.txt")))
    with caplog.at_level(logging.INFO, logger="fairseq_kd.teacher"):
        load_teacher(data, lone_teacher)  # cannot tell: loads, but not quietly
    warning, = records(caplog, logging.WARNING)
    assert warning.startswith(f"teacher {lone_teacher}: only the vocabulary sizes (8008 source, 8008 target "
                              f"entries) could be compared")
    assert "--teacher-dict" in warning


@pytest.mark.parametrize("form", ["file", "folder"])
def test_teacher_dict_is_compared_symbol_by_symbol(tmp_path, lone_teacher, caplog, form):
    from fairseq_kd.errors import KDError

    lines = dict_lines(SHIPPED / "dict.txt")
    if form == "file":
        teacher_dict = SHIPPED / "dict.txt"
    else:  # a folder of per-language files, for teachers with separate dictionaries
        teacher_dict = student_folder(tmp_path / "teacher_dicts", lines)
    good = student_folder(tmp_path / "good", lines)
    with caplog.at_level(logging.INFO, logger="fairseq_kd.teacher"):
        load_teacher(good, lone_teacher, "--teacher-dict", teacher_dict)
    assert not records(caplog, logging.WARNING)
    assert any("symbol by symbol (--teacher-dict" in m for m in records(caplog, logging.INFO))
    bad = student_folder(tmp_path / "bad", swapped(lines))
    with pytest.raises(KDError, match=rf"source symbol {SWAPPED + 4} is .* \(--teacher-dict "):
        load_teacher(bad, lone_teacher, "--teacher-dict", teacher_dict)


def test_teacher_dict_bad_input_is_one_line(tmp_path, lone_teacher):
    from fairseq_kd.errors import KDError

    data = student_folder(tmp_path / "bin", dict_lines(SHIPPED / "dict.txt"))
    with pytest.raises(KDError, match=f"^--teacher-dict: not found: {tmp_path / 'nope.txt'}$"):
        load_teacher(data, lone_teacher, "--teacher-dict", tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KDError, match="^--teacher-dict: folder .*empty holds neither dict.es.txt and "
                                      "dict.en.txt nor dict.txt$"):
        load_teacher(data, lone_teacher, "--teacher-dict", tmp_path / "empty")
    with pytest.raises(KDError, match="^--teacher-dict is the dictionary of a --teacher-path teacher"):
        student_task(data, "--teacher-dict", SHIPPED / "dict.txt")
    junk = write_dict(tmp_path / "junk.txt", ["no-count-here"])
    with pytest.raises(KDError, match=f"^{junk} is not a fairseq dictionary: "):
        load_teacher(data, lone_teacher, "--teacher-dict", junk)


# ------------------------------------------------------ export embeds dictionaries
@pytest.fixture(scope="module")
def random_checkpoint(tiny_data, tmp_path_factory):
    """A randomly initialised 1+1-layer transformer on tiny_data, saved as fairseq-train saves."""
    from fairseq_kd.inprocess import save_random_checkpoint

    path = tmp_path_factory.mktemp("random") / "checkpoint.pt"
    save_random_checkpoint(tiny_data / "bin", path, 1, 2)
    return path


def kd_export(*args, check=True):
    return run([tool("fairseq-kd"), "export", *map(str, args)], check=check)


def test_export_embeds_dictionaries_that_the_teacher_check_reads(tiny_data, random_checkpoint, tmp_path):
    from fairseq.data import Dictionary

    from fairseq_kd.errors import KDError

    out = kd_export("--path", random_checkpoint, "--out", tmp_path / "teacher.pt").stdout
    assert f"dictionaries from {tiny_data / 'bin' / 'dict.es.txt'} and " in out
    exported = torch.load(tmp_path / "teacher.pt", map_location="cpu", weights_only=True)
    embedded = exported["fairseq_kd"]["dictionaries"]
    for side, lang in (("src", "es"), ("tgt", "en")):
        assert embedded[side] == Dictionary.load(str(tiny_data / "bin" / f"dict.{lang}.txt")).symbols
    assert embedded["src"] is embedded["tgt"]  # a joined dictionary is pickled once
    # the embedded symbols are what the check compares: a same-size swap is refused
    lines = dict_lines(tiny_data / "bin" / "dict.en.txt")
    data = student_folder(tmp_path / "swapped", swapped(lines))
    embedded_in = rf"\(embedded in {tmp_path / 'teacher.pt'}\)"
    with pytest.raises(KDError, match=rf"source symbol {SWAPPED + 4} is .* {embedded_in}"):
        load_teacher(data, tmp_path / "teacher.pt")
    load_teacher(tiny_data / "bin", tmp_path / "teacher.pt")


def test_stock_fairseq_translates_with_an_export_carrying_dictionaries(tiny_data, random_checkpoint, tmp_path):
    from fairseq_kd.deploy.export import write_export

    write_export(str(random_checkpoint), str(tmp_path / "model.pt"), half=True)
    assert "fairseq_kd" in torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=True)
    env = helpers.env()
    env["PYTHONPATH"] = ""  # stock fairseq: the plugin is not importable at all
    stock = subprocess.run(
        [tool("fairseq-generate"), str(tiny_data / "bin"), "--task", "translation", "--path",
         str(tmp_path / "model.pt"), "--gen-subset", "test", "--cpu", "--beam", "1", "--max-len-b", "5",
         "--batch-size", "64", "--required-batch-size-multiple", "1", "-s", "es", "-t", "en"],
        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert stock.returncode == 0, stock.stderr[-3000:]
    assert sum(line.startswith("H-") for line in stock.stdout.splitlines()) == 40


def test_export_without_dictionaries_warns_and_data_supplies_them(tiny_data, random_checkpoint, tmp_path):
    from fairseq_kd.deploy.export import write_export
    from fairseq_kd.errors import KDError

    state = torch.load(random_checkpoint, map_location="cpu", weights_only=False)
    state["cfg"]["task"]["data"] = str(tmp_path / "gone")  # trained on another machine
    moved = tmp_path / "moved.pt"
    torch.save(state, moved)
    proc = kd_export("--path", moved, "--out", tmp_path / "bare.pt")
    assert "dictionaries not embedded" in proc.stdout
    assert "carries no dictionaries" in proc.stderr and "give --data" in proc.stderr
    assert "fairseq_kd" not in torch.load(tmp_path / "bare.pt", map_location="cpu", weights_only=True)
    *_, origin = write_export(str(moved), str(tmp_path / "full.pt"), data=str(tiny_data / "bin"))
    assert origin == f"{tiny_data / 'bin' / 'dict.es.txt'} and {tiny_data / 'bin' / 'dict.en.txt'}"
    assert "fairseq_kd" in torch.load(tmp_path / "full.pt", map_location="cpu", weights_only=True)
    # a folder of other dictionaries than the model's is refused, not embedded
    wrong = student_folder(tmp_path / "wrong", dict_lines(SHIPPED / "dict.txt"))
    with pytest.raises(KDError, match=r"\(or give -s and -t\)$"):  # a random checkpoint names no languages
        write_export(str(moved), str(tmp_path / "wrong.pt"), data=str(wrong))
    with pytest.raises(KDError, match=f"^the source dictionary \\({wrong / 'dict.es.txt'} and "
                                      f"{wrong / 'dict.en.txt'}\\) has 8008 entries but the model embeds "):
        write_export(str(moved), str(tmp_path / "wrong.pt"), data=str(wrong), langs=("es", "en"))
    assert not os.path.exists(tmp_path / "wrong.pt")
