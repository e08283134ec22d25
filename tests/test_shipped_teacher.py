"""The teacher shipped in examples/teacher works from a clean clone.

`make demo` distils it, so it must load with stock fairseq (no plugin: the
file is a plain ``transformer`` export) and translate as well as its README
says.  The recipe's ship step scored the first test pairs from the shipped
folder alone into ``evaluation.check.json``; this test repeats that from the
files a user gets: the corpus in examples/data, the folder's SentencePiece
model and dictionary, ``fairseq-kd evaluate --no-user-dir``.
"""
import json
import tarfile

import pytest

from helpers import BIBLE_ARCHIVE, REPO, run, tool

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
    import sentencepiece as spm

    lines = documented["sentences"]
    sp = spm.SentencePieceProcessor(model_file=str(TEACHER_DIR / "spm.model"))
    with tarfile.open(BIBLE_ARCHIVE) as tar:
        for lang in ("es", "en"):
            text = tar.extractfile(f"bible.es-en/test.{lang}").read().decode("utf-8").splitlines()[:lines]
            (tmp_path / f"test.{lang}").write_text("\n".join(text) + "\n", encoding="utf-8")
            pieces = [" ".join(sp.encode(line.strip(), out_type=str)) for line in text]
            (tmp_path / f"test.sp.{lang}").write_text("\n".join(pieces) + "\n", encoding="utf-8")
    run([tool("fairseq-preprocess"), "-s", "es", "-t", "en", "--testpref", tmp_path / "test.sp",
         "--destdir", tmp_path / "bin", "--srcdict", TEACHER_DIR / "dict.txt", "--joined-dictionary",
         "--workers", "1"])
    results = tmp_path / "results.json"
    run([tool("fairseq-kd"), "evaluate", "--data", tmp_path / "bin", "--checkpoint", TEACHER_DIR / "teacher.pt",
         "--name", "teacher", "--ref", tmp_path / "test.en", "--results", results,
         "--beam", str(documented["beam"]["beam"]), "--cpu", "--no-user-dir"])
    measured, = json.loads(results.read_text())["systems"]
    for decoding in ("greedy", "beam"):
        assert measured[decoding]["bleu"] >= documented[decoding]["bleu"] - 1, (decoding, measured, documented)
    # a usable teacher, not merely a reproducible one: the demo's students score far below this
    assert measured["beam"]["bleu"] > 25
