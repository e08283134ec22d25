"""CKD/PKD layer maps: the documented groups, general properties, clear errors."""
import re
from pathlib import Path

import pytest

from fairseq_kd import layer_maps
from fairseq_kd.errors import KDError
from fairseq_kd.layer_maps import NAMED_MAPS, build_layer_map, explicit_map_spec, format_map_table

# The groups documented in fairseq_kd/layer_maps.py and docs/ckd.md (0-based teacher layers).
DOCUMENTED = {
    (6, 3): {
        "skip": [[1], [3], [5]],
        "regular": [[0, 1], [2, 3], [4, 5]],
        "overlap": [[0, 1, 2], [2, 3, 4], [4, 5]],
        "cross": [[0, 3], [1, 4], [2, 5]],
    },
    (6, 2): {
        "skip": [[2], [5]],
        "regular": [[0, 1, 2], [3, 4, 5]],
        "overlap": [[0, 1, 2, 3], [3, 4, 5]],
        "cross": [[0, 2, 4], [1, 3, 5]],
    },
    (12, 4): {
        "skip": [[2], [5], [8], [11]],
        "regular": [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]],
        "overlap": [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9], [9, 10, 11]],
        "cross": [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]],
    },
}


@pytest.mark.parametrize("depths", sorted(DOCUMENTED))
@pytest.mark.parametrize("name", NAMED_MAPS)
def test_named_maps_give_the_documented_groups(depths, name):
    assert build_layer_map(name, *depths) == DOCUMENTED[depths][name]


def test_docstring_and_ckd_page_show_the_table_the_code_builds():
    table = format_map_table(sorted(DOCUMENTED, key=lambda d: (d[0], -d[1])))
    assert table in layer_maps.__doc__
    page = (Path(__file__).resolve().parents[1] / "docs" / "ckd.md").read_text(encoding="utf-8")
    assert table in page
    # and the rendered cells are the groups above
    row = re.search(r"^\| 6 -> 2 \| (.*) \|$", table, re.M).group(1).split(" | ")
    assert row[NAMED_MAPS.index("overlap")] == "{0,1,2,3} {3,4,5}"


@pytest.mark.parametrize("t", range(1, 13))
def test_named_map_properties_for_all_depths(t):
    for s in range(1, t + 1):
        skip, regular, overlap, cross = (build_layer_map(n, t, s) for n in NAMED_MAPS)
        for groups in (skip, regular, overlap, cross):
            assert len(groups) == s
            assert all(g and all(0 <= j < t for j in g) for g in groups)
        # skip: one layer each, equally spaced, increasing
        step = t // s
        assert [g[0] for g in skip] == [step * (i + 1) - 1 for i in range(s)]
        # regular: consecutive blocks that partition the teacher, sizes differ by <= 1
        assert sum(regular, []) == list(range(t))
        assert max(map(len, regular)) - min(map(len, regular)) <= 1
        # overlap: regular blocks, neighbours share exactly their boundary layer
        for i in range(s - 1):
            assert overlap[i] == regular[i] + [regular[i + 1][0]]
            assert set(overlap[i]) & set(overlap[i + 1]) == {regular[i + 1][0]}
        assert overlap[-1] == regular[-1]
        # cross: every teacher layer exactly once, student i gets layers = i mod s
        assert sorted(sum(cross, [])) == list(range(t))
        assert all(j % s == i for i, g in enumerate(cross) for j in g)


def test_explicit_map_round_trip_and_any_depths():
    assert build_layer_map("0,1,2|3,4,5", 6, 2) == [[0, 1, 2], [3, 4, 5]]
    assert build_layer_map(" 0 | 0,1 | 1 ", 2, 3) == [[0], [0, 1], [1]]  # student deeper
    groups = DOCUMENTED[(12, 4)]["overlap"]
    assert build_layer_map(explicit_map_spec(groups), 12, 4) == groups


def test_methods_cross_example_is_the_documented_explicit_map():
    """METHODS.md's cross example '1,3 | 4,6' (1-based, 6 -> 2) is not our named
    cross map; docs/ckd.md and the docstring say so and give the explicit map that is."""
    methods_example = [[1, 3], [4, 6]]
    spec = "0,2|3,5"
    assert build_layer_map(spec, 6, 2) == [[j - 1 for j in g] for g in methods_example]
    assert build_layer_map("cross", 6, 2) != build_layer_map(spec, 6, 2)
    page = (Path(__file__).resolve().parents[1] / "docs" / "ckd.md").read_text(encoding="utf-8")
    for doc in (page, layer_maps.__doc__):
        assert f"--layer-map '{spec}'" in doc and "1,3 | 4,6" in doc
        assert "METHODS.md leaves them open" not in doc


@pytest.mark.parametrize("spec,t,s,message", [
    ("skip", 2, 3, "2-layer teacher and a 3-layer student"),
    ("regular", 4, 6, "4-layer teacher and a 6-layer student"),
    ("0,1|2", 6, 3, "has 2 groups but the student has 3 layers (teacher 6)"),
    ("0,1|6", 6, 2, "names teacher layers [6], but the teacher has 6 layers (0..5; student 2)"),
    ("0,1||2", 6, 3, "empty group"),
    ("0,0|1", 6, 2, "repeats"),
    ("combine", 6, 2, "expected a named map"),
])
def test_bad_maps_are_clear_errors(spec, t, s, message):
    with pytest.raises(KDError, match=re.escape(message)):
        build_layer_map(spec, t, s)
