"""fairseq_kd.plots: label spreading against scipy's constrained optimum, labels that never overlap,
and learning curves drawn from their points in one colour per system."""
import itertools
import random

import pytest

from fairseq_kd.plots import draw_curves, draw_results, label_groups, lanes, plot_curves, spread_positions, system_name


def cost(positions, desired):
    return sum((p - d) ** 2 for p, d in zip(positions, desired))


def check_spaced(positions, desired, gap):
    order = sorted(range(len(desired)), key=lambda i: (desired[i], i))
    placed = [positions[i] for i in order]
    assert all(b - a >= gap - 1e-9 for a, b in zip(placed, placed[1:])), (desired, positions)


def test_spread_leaves_spaced_positions_alone():
    assert spread_positions([5.0, 0.0, 2.5], 2.0) == [5.0, 0.0, 2.5]


def test_spread_centres_a_pile_on_its_mean():
    assert spread_positions([1.0, 1.0, 1.0], 0.5) == pytest.approx([0.5, 1.0, 1.5])


@pytest.mark.parametrize("seed", range(20))
def test_spread_is_the_constrained_least_squares_optimum(seed):
    """Against scipy's SLSQP on the same problem: positions in the order of the wishes, gaps >= gap."""
    optimize = pytest.importorskip("scipy.optimize")
    import numpy as np

    rng = random.Random(seed)
    n, gap = rng.randint(2, 9), rng.uniform(0.2, 1.5)
    desired = [round(rng.uniform(0, 4), 1) for _ in range(n)]  # rounded: ties happen
    ours = spread_positions(desired, gap)
    check_spaced(ours, desired, gap)
    order = sorted(range(n), key=lambda i: (desired[i], i))
    constraints = [{"type": "ineq", "fun": lambda p, a=a, b=b: p[b] - p[a] - gap}
                   for a, b in zip(order, order[1:])]
    start = np.array(desired) + np.array([order.index(i) * gap for i in range(n)])  # feasible
    best = optimize.minimize(lambda p: cost(p, desired), start, constraints=constraints, method="SLSQP",
                             options={"ftol": 1e-12, "maxiter": 500})
    assert best.success
    assert cost(ours, desired) <= best.fun + 1e-7


def test_lanes_join_overlapping_spans_only():
    spans = [(0, 2), (5, 6), (1, 3), (2.5, 4), (7, 8)]
    assert sorted(map(sorted, lanes(spans))) == [[0, 2, 3], [1], [4]]


def system(name, params, bleu, speed, backend=None):
    entry = {"name": name, "params": params,
             "greedy": {"beam": 1, "bleu": bleu, "chrf": 50.0, "sentences_per_s": speed},
             "beam": {"beam": 5, "bleu": bleu + 1, "chrf": 51.0, "sentences_per_s": speed / 4}}
    if backend:
        entry.update(name=f"{name} (ct2 int8)", backend=backend, quantization="int8")
    return entry


def study(students=12):
    """A teacher and ``students`` same-size students, each with a CTranslate2 row, BLEU 0.3 apart."""
    rows = [system("teacher", 7.6e6, 37.3, 180), system("teacher", 7.6e6, 37.1, 850, "ctranslate2")]
    for k in range(students):
        rows.append(system(f"student_{k}", 2.4e6, 20 + 0.3 * k, 300 + k))
        rows.append(system(f"student_{k}", 2.4e6, 20.1 + 0.3 * k, 2000 + 5 * k, "ctranslate2"))
    return {"systems": rows, "device": "CPU (2 cores)"}


def test_a_ct2_row_is_its_systems_row():
    rows = study(1)["systems"]
    assert [system_name(s) for s in rows] == ["teacher", "teacher", "student_0", "student_0"]
    assert system_name({"name": "a (ct2 x)", "backend": None}) == "a (ct2 x)"  # only CT2 rows are renamed


def test_a_systems_rows_at_one_x_share_a_label():
    rows = study(2)["systems"]
    groups = label_groups(rows, [s["params"] for s in rows], [s["greedy"]["bleu"] for s in rows])
    assert [t for t, _, _ in groups] == ["student_0", "student_1", "teacher"]
    assert [y for _, _, y in groups] == pytest.approx([20.05, 20.35, 37.2])


@pytest.mark.parametrize("x", ["params", "speed"])
def test_no_two_labels_overlap(x):
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    fig = draw_results(study(), x=x)
    ax = fig.axes[0]
    fig.canvas.draw()  # places each annotation's text
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text().startswith(("teacher", "student"))]
    expected = 13 if x == "params" else 26  # rows at one x share a label; at two speeds they do not
    assert len(labels) == expected
    boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the text, not its line
    for (a, ta), (b, tb) in itertools.combinations(zip(boxes, labels), 2):
        assert not a.overlaps(b), (ta.get_text(), tb.get_text())
    moved = [t for t in labels if t.arrow_patch is not None]
    assert moved  # 0.3 BLEU apart is closer than a label is tall: some are moved and get a line
    plt.close(fig)


def curves(systems=8):
    """Made-up validation BLEU curves of different lengths, each peaking at a different update."""
    rng = random.Random(3)
    result = {}
    for k in range(systems):
        n = rng.randint(4, 12)
        result[f"method_{k}"] = [(267 * (i + 1), round(20 - (i - n // 2) ** 2 * 0.3 + rng.random(), 2))
                                 for i in range(n)]
    return result


def test_curves_are_drawn_from_their_points_one_colour_each_best_starred(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    data = curves()
    best = {name: max(points, key=lambda p: p[1]) for name, points in data.items()}
    fig = draw_curves(data, best, title="t")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == list(data)
    for line, points in zip(ax.lines, data.values()):
        assert list(zip(line.get_xdata(), line.get_ydata())) == points
    colours = [to_hex(line.get_color()) for line in ax.lines]
    assert len(set(colours)) == len(data)
    stars = ax.collections
    assert [tuple(map(float, c.get_offsets()[0])) for c in stars] == list(best.values())
    assert [to_hex(c.get_facecolor()[0]) for c in stars] == colours  # a star in its curve's colour
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(data)
    plt.close(fig)
    out = tmp_path / "new" / "curves.png"
    plot_curves(data, out, best)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
