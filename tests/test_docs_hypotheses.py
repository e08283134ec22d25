"""The test hypotheses shipped beside the results page rescore to the page's numbers.

``fairseq-kd hypotheses`` copies every row's detokenized test translations (greedy and beam,
xz-compressed), the reference and the rows (``results.json``) into
``docs/hypotheses/RECIPE_PROFILE/``.  For every such folder this rescores each file with
sacreBLEU, independently of the code that wrote it, against the shipped reference and checks
the score against the shipped rows, the folder's README and the results page's table.
"""
import json
import lzma
import re

import pytest
import sacrebleu

from fairseq_kd.study import exported_name
from helpers import REPO

FOLDERS = sorted(p.parent for p in (REPO / "docs" / "hypotheses").glob("*/results.json"))
DECODINGS = ("greedy", "beam")


def read_xz_lines(path):
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def rows_of(folder):
    with open(folder / "results.json", encoding="utf-8") as f:
        return json.load(f)["systems"]


def page_table(folder):
    """{(row name, column): cell} of the page section the folder was exported for."""
    page = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    recipe, profile = re.fullmatch(r"(.+)_(cpu_converged|cpu|gpu)", folder.name).groups()
    section = page.split(f"<!-- results {recipe} {profile} -->")[1].split("<!-- /results")[0]
    lines = [line for line in section.splitlines() if line.startswith("| system |")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    body = section.split(lines[0])[1].splitlines()[2:]
    cells = {}
    for line in body:
        if not line.startswith("|"):
            break
        row = [c.strip() for c in line.strip("|").split("|")]
        cells.update({(row[0], column): cell for column, cell in zip(header, row)})
    return cells


@pytest.mark.skipif(not FOLDERS, reason="no hypotheses shipped in docs/hypotheses")
@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_shipped_hypotheses_rescore_to_the_rows_the_readme_and_the_page(folder):
    reference = read_xz_lines(folder / "test.en.xz")
    readme = (folder / "README.md").read_text(encoding="utf-8")
    table = page_table(folder)
    rows = rows_of(folder)
    assert rows, folder
    for row in rows:
        for decoding in DECODINGS:
            name = exported_name("results.json", row["name"], decoding)
            hypotheses = read_xz_lines(folder / name)
            assert len(hypotheses) == len(reference) == row["sentences"], name
            bleu = sacrebleu.corpus_bleu(hypotheses, [reference]).score
            chrf = sacrebleu.corpus_chrf(hypotheses, [reference]).score
            assert bleu == pytest.approx(row[decoding]["bleu"], abs=0.006), name
            assert chrf == pytest.approx(row[decoding]["chrf"], abs=0.006), name
            assert f"| {name} | {row[decoding]['bleu']:.2f} |" in readme, name
            # the page rounds the recorded two decimals (37.25 -> "37.2", as Python's format does)
            assert table[(row["name"], f"BLEU {decoding}")] == f"{row[decoding]['bleu']:.1f}", name


def test_a_wrong_hypothesis_changes_the_score():
    # the check above can fail: one translation replaced moves BLEU off the recorded value
    folder = FOLDERS[0] if FOLDERS else pytest.skip("no hypotheses shipped")
    row = rows_of(folder)[0]
    reference = read_xz_lines(folder / "test.en.xz")
    hypotheses = read_xz_lines(folder / exported_name("results.json", row["name"], "greedy"))
    hypotheses[: len(hypotheses) // 20] = ["the"] * (len(hypotheses) // 20)
    bleu = sacrebleu.corpus_bleu(hypotheses, [reference]).score
    assert abs(bleu - row["greedy"]["bleu"]) > 0.006
