"""Which teacher layers each student layer is matched against (CKD, PKD).

A *layer map* for an ``L_T``-layer teacher and an ``L_S``-layer student is a
list of ``L_S`` groups; group ``i`` holds the teacher layers whose outputs are
concatenated and matched against student layer ``i``
(Wu et al. 2020; docs/ckd.md).  Layers are numbered from 0: layer 0
is the output of the first transformer layer; the embedding output is never
matched.  Named maps, with ``s = L_T // L_S``:

* ``skip`` (PKD, Sun et al. 2019): one teacher layer per student layer,
  every ``s``-th: ``[s-1], [2s-1], ..., [L_S*s-1]`` (the top layer when
  ``L_S`` divides ``L_T``).
* ``regular``: consecutive blocks partitioning the teacher; when ``L_S``
  does not divide ``L_T`` the first ``L_T mod L_S`` blocks get one extra
  layer.
* ``overlap``: the ``regular`` blocks, each but the last extended by the
  first layer of the next block, so neighbouring groups share one layer.
* ``cross``: interleaved layers, student layer ``i`` gets teacher layers
  ``i, i + L_S, i + 2 L_S, ...``; every group spans the teacher's depth
  (not the block reading ``1,3 | 4,6``, see below).
* explicit: ``"0,1,2|3,4,5"``, groups separated by ``|``, layers by ``,``.

Every named map needs ``L_T >= L_S``; an explicit map works for any depths.
Groups (teacher layers, 0-based) for the depths of the tests and docs/ckd.md
(``format_map_table()`` renders this table; a test compares both):

| teacher -> student | `skip` | `regular` | `overlap` | `cross` |
|---|---|---|---|---|
| 6 -> 3 | {1} {3} {5} | {0,1} {2,3} {4,5} | {0,1,2} {2,3,4} {4,5} | {0,3} {1,4} {2,5} |
| 6 -> 2 | {2} {5} | {0,1,2} {3,4,5} | {0,1,2,3} {3,4,5} | {0,2,4} {1,3,5} |
| 12 -> 4 | {2} {5} {8} {11} | {0,1,2} {3,4,5} {6,7,8} {9,10,11} | {0,1,2,3} {3,4,5,6} {6,7,8,9} {9,10,11} | {0,4,8} {1,5,9} {2,6,10} {3,7,11} |

``overlap`` and ``cross`` are our reading of Wu et al. 2020, who describe
them only as blocks overlapping by one layer or more and as interleaved
layers.  The project's method spec illustrates cross combination as
``1,3 | 4,6`` (1-based; 6-layer teacher, 2-layer student), whereas ``cross``
here gives ``{0,2,4} {1,3,5}`` (1-based ``1,3,5 | 2,4,6``), so that every
group spans the teacher's depth.  That example is the explicit map
``--layer-map '0,2|3,5'``; any other pattern can be given explicitly too.
"""
from typing import List, Sequence

from fairseq_kd.errors import KDError, require

NAMED_MAPS = ("skip", "regular", "overlap", "cross")


def _check_depths(name, teacher_layers, student_layers):
    require(teacher_layers >= 1 and student_layers >= 1,
            f"--layer-map {name}: teacher and student need at least one layer "
            f"(teacher {teacher_layers}, student {student_layers})")
    require(teacher_layers >= student_layers,
            f"cannot build --layer-map {name} for a {teacher_layers}-layer teacher and a "
            f"{student_layers}-layer student: named maps need teacher depth >= student depth; "
            f"give an explicit map such as '0|0,1|1'")


def skip_map(teacher_layers, student_layers):
    step = teacher_layers // student_layers
    return [[(i + 1) * step - 1] for i in range(student_layers)]


def regular_map(teacher_layers, student_layers):
    size, extra = divmod(teacher_layers, student_layers)
    groups, start = [], 0
    for i in range(student_layers):
        end = start + size + (1 if i < extra else 0)
        groups.append(list(range(start, end)))
        start = end
    return groups


def overlap_map(teacher_layers, student_layers):
    blocks = regular_map(teacher_layers, student_layers)
    return [block + blocks[i + 1][:1] if i + 1 < len(blocks) else list(block)
            for i, block in enumerate(blocks)]


def cross_map(teacher_layers, student_layers):
    return [list(range(i, teacher_layers, student_layers)) for i in range(student_layers)]


_BUILDERS = {"skip": skip_map, "regular": regular_map, "overlap": overlap_map, "cross": cross_map}


def parse_explicit_map(spec, teacher_layers, student_layers):
    """``"0,1|2,3"`` -> ``[[0, 1], [2, 3]]``, checked against both depths."""
    groups = []
    for part in spec.split("|"):
        try:
            group = [int(tok) for tok in part.split(",") if tok.strip()]
        except ValueError:
            raise KDError(f"--layer-map {spec!r}: expected a named map ({', '.join(NAMED_MAPS)}) "
                          f"or groups of teacher layer numbers such as '0,1,2|3,4,5'") from None
        require(group, f"--layer-map {spec!r}: empty group")
        require(len(set(group)) == len(group), f"--layer-map {spec!r}: a layer repeats within a group")
        groups.append(group)
    require(len(groups) == student_layers,
            f"--layer-map {spec!r} has {len(groups)} groups but the student has "
            f"{student_layers} layers (teacher {teacher_layers}): give one group per student layer")
    bad = sorted({j for g in groups for j in g if not 0 <= j < teacher_layers})
    require(not bad,
            f"--layer-map {spec!r} names teacher layers {bad}, but the teacher has "
            f"{teacher_layers} layers (0..{teacher_layers - 1}; student {student_layers})")
    return groups


def build_layer_map(spec, teacher_layers, student_layers) -> List[List[int]]:
    """The groups of teacher layers (0-based) for each of ``student_layers``."""
    spec = (spec or "").strip()
    if spec in _BUILDERS:
        _check_depths(spec, teacher_layers, student_layers)
        return _BUILDERS[spec](teacher_layers, student_layers)
    require(spec, f"--layer-map must be one of {', '.join(NAMED_MAPS)} or an explicit map")
    return parse_explicit_map(spec, teacher_layers, student_layers)


def format_groups(groups: Sequence[Sequence[int]]) -> str:
    """``[[0, 1], [2]]`` -> ``"{0,1} {2}"`` (no ``|``: it would split a markdown cell)."""
    return " ".join("{" + ",".join(map(str, g)) + "}" for g in groups)


def explicit_map_spec(groups: Sequence[Sequence[int]]) -> str:
    """``[[0, 1], [2]]`` -> ``"0,1|2"``, the ``--layer-map`` syntax."""
    return "|".join(",".join(map(str, g)) for g in groups)


def format_map_table(depths=((6, 3), (6, 2), (12, 4))) -> str:
    """Markdown table of every named map for the given (teacher, student) depths."""
    lines = ["| teacher -> student | " + " | ".join(f"`{n}`" for n in NAMED_MAPS) + " |",
             "|---" * (len(NAMED_MAPS) + 1) + "|"]
    for t, s in depths:
        cells = [format_groups(build_layer_map(n, t, s)) for n in NAMED_MAPS]
        lines.append(f"| {t} -> {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
