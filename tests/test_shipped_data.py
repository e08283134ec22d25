"""The Bible corpus shipped in examples/data is clean and aligned.

An earlier copy appended a Psalm heading ("David's Psalm of praise.") to 46%
of the English lines; every demo, test and study trains on this archive, so a
regression here would silently distort every number the project reports.
"""
import re
import tarfile

import pytest

from helpers import BIBLE_ARCHIVE

SPLITS = {"train": 26722, "valid": 1000, "test": 2000}
# A heading as diatheke renders it: "<someone>'s Psalm ...", "A Psalm of ...", "Psalm of praise."
PSALM_HEADING = re.compile(r"(Psalm of praise\.|A Psalm of \w+\.|\bPsalm of David\.)$")


@pytest.fixture(scope="module")
def corpus():
    with tarfile.open(BIBLE_ARCHIVE) as tar:
        return {
            (split, lang): tar.extractfile(f"bible.es-en/{split}.{lang}").read().decode("utf-8").splitlines()
            for split in SPLITS for lang in ("es", "en")
        }


@pytest.mark.parametrize("split", SPLITS)
def test_sides_align_with_the_documented_counts(corpus, split):
    es, en = corpus[split, "es"], corpus[split, "en"]
    assert len(es) == len(en) == SPLITS[split]
    assert all(line.strip() for line in es + en), "an empty side"


@pytest.mark.parametrize("split", SPLITS)
def test_no_english_line_ends_with_a_psalm_heading(corpus, split):
    tainted = [line for line in corpus[split, "en"] if PSALM_HEADING.search(line)]
    assert not tainted, f"{len(tainted)} lines end with a heading, e.g. {tainted[0]!r}"


def test_the_heading_pattern_catches_the_old_corruption():
    assert PSALM_HEADING.search("And the LORD said unto Moses. David's Psalm of praise.")
    assert not PSALM_HEADING.search("Praise ye the LORD. Praise the LORD, O my soul.")
