"""The teacher shipped in examples/teacher works from a clean clone.

`make demo` distils it, so it must load with stock fairseq (no plugin: the
file is a plain ``transformer`` export) and translate as well as its README
says.  The recipe's ship step scored the first test pairs from the shipped
folder alone into ``evaluation.check.json``; this test repeats that from the
files a user gets: the corpus in examples/data, the folder's SentencePiece
model and dictionary, ``fairseq-kd evaluate --no-user-dir``.
"""
import json

import pytest

from helpers import REPO, rescore_shipped_folder

TEACHER_DIR = REPO / "examples" / "teacher"
MAX_BYTES = 16 * 2**20  # fp16 weights of a 256-dim 3+3 transformer with an 8k vocabulary


@pytest.fixture(scope="module")
def documented():
    with open(TEACHER_DIR / "evaluation.check.json") as f:
        teacher, = json.load(f)["systems"]
    return teacher


def test_shipped_teacher_is_small_and_complete():
    for name in ("teacher.pt", "spm.model", "dict.txt", "README.md", "evaluation.json"):
        assert (TEACHER_DIR / name).is_file(), f"examples/teacher/{name} is missing"
    assert (TEACHER_DIR / "teacher.pt").stat().st_size < MAX_BYTES


def test_shipped_teacher_scores_its_documented_bleu_with_stock_fairseq(tmp_path, documented):
    measured = rescore_shipped_folder(TEACHER_DIR, "teacher.pt", "teacher", documented["sentences"],
                                      documented["beam"]["beam"], tmp_path)
    for decoding in ("greedy", "beam"):
        assert measured[decoding]["bleu"] >= documented[decoding]["bleu"] - 1, (decoding, measured, documented)
    # a usable teacher, not merely a reproducible one: the demo's students score far below this
    assert measured["beam"]["bleu"] > 25
