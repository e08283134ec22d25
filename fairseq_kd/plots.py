"""Plots, one colour per system: BLEU against speed or size with readable labels
(``fairseq-kd plot``) and learning curves (``fairseq-kd curves``).

A results file (:mod:`fairseq_kd.results`) holds a system's fairseq row and
its CTranslate2 rows ("NAME (ct2 int8)").  A system keeps one colour and one
label text across its rows; the backend is the marker (legend).  Students of
one size share an x in the parameters plot, so their labels are spread
vertically (:func:`spread_positions`), joined to their points by a line when
moved, and a system's rows at the same x share one label.

``fairseq-kd curves`` draws learning curves (:func:`draw_curves`): validation
BLEU by update, a line per system in its colour, its best validation starred.

matplotlib is imported only when a plot is drawn.
"""
import os
from itertools import groupby

BACKEND_MARKERS = {"fairseq": "o", "ctranslate2": "^"}
BACKEND_LABELS = {"fairseq": "fairseq", "ctranslate2": "CTranslate2"}
LABEL_FONT_SIZE = 8
LABEL_OFFSET_PX = 6  # from the point to its label's left edge
LABEL_PAD_PX = 2  # between two labels of a lane


def system_name(system):
    """The system a results row measures: its name without the " (ct2 Q)" a CTranslate2 row adds."""
    if system.get("backend") == "ctranslate2":
        return system["name"].removesuffix(f" (ct2 {system.get('quantization', '')})")
    return system["name"]


def backend_of(system):
    return system.get("backend", "fairseq")


def spread_positions(desired, gap):
    """Positions as close as possible (least squares) to ``desired`` with neighbours at least ``gap`` apart.

    The order of ``desired`` is kept (ties by index).  Overlapping runs are merged into
    blocks of evenly spaced positions centred on their members' wishes, merging again
    while a block reaches into the one below (the pool-adjacent-violators algorithm on
    ``desired[i] - i * gap``, which is non-decreasing exactly when no two are closer than
    ``gap``).  Returns the positions in the order of ``desired``.
    """
    order = sorted(range(len(desired)), key=lambda i: (desired[i], i))
    shifted = [desired[i] - k * gap for k, i in enumerate(order)]
    blocks = []  # [mean of shifted, count]
    for value in shifted:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    fitted = [mean for mean, count in blocks for _ in range(count)]
    positions = [0.0] * len(desired)
    for k, i in enumerate(order):
        positions[i] = fitted[k] + k * gap
    return positions


def lanes(spans):
    """Indices of ``spans`` ((left, right) pairs) grouped into lanes: spans that overlap,
    directly or through others, share a lane; labels of different lanes never collide."""
    order = sorted(range(len(spans)), key=lambda i: spans[i][0])
    result, right = [], None
    for i in order:
        if right is None or spans[i][0] > right:
            result.append([])
            right = spans[i][1]
        result[-1].append(i)
        right = max(right, spans[i][1])
    return result


def label_groups(systems, xs, ys):
    """(system name, x, y) per label: one per system and x, at the mean y of its rows there."""
    keyed = sorted(((system_name(s), x, y) for s, x, y in zip(systems, xs, ys)), key=lambda t: t[:2])
    groups = []
    for (name, x), members in groupby(keyed, key=lambda t: t[:2]):
        members = list(members)
        groups.append((name, x, sum(m[2] for m in members) / len(members)))
    return groups


def text_size_px(ax, renderer, text):
    """(width, height) in pixels of ``text`` drawn as a label."""
    probe = ax.text(0, 0, text, fontsize=LABEL_FONT_SIZE)
    box = probe.get_window_extent(renderer)
    probe.remove()
    return box.width, box.height


def place_labels(ax, labels):
    """Draw ``labels`` ((text, x, y, colour)) right of their points, spread so none overlap;
    a label moved off its point's height gets a line to the point in the point's colour."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    sizes = [text_size_px(ax, renderer, text) for text, *_ in labels]
    anchors = [ax.transData.transform((x, y)) for _, x, y, _ in labels]
    spans = [(px + LABEL_OFFSET_PX, px + LABEL_OFFSET_PX + w) for (px, _), (w, _) in zip(anchors, sizes)]
    to_points = 72.0 / fig.dpi
    for lane in lanes(spans):
        gap = max(sizes[i][1] for i in lane) + LABEL_PAD_PX
        for i, y_px in zip(lane, spread_positions([anchors[i][1] for i in lane], gap)):
            text, x, y, colour = labels[i]
            dy = y_px - anchors[i][1]
            line = dict(arrowstyle="-", color=colour, lw=0.6, shrinkA=0, shrinkB=3) if abs(dy) > gap / 2 else None
            ax.annotate(text, (x, y), xytext=(LABEL_OFFSET_PX * to_points, dy * to_points),
                        textcoords="offset points", fontsize=LABEL_FONT_SIZE, va="center",
                        annotation_clip=False, arrowprops=line)


def system_colours(plt, names):
    """A colour per name, in order (matplotlib's tab10, tab20 beyond ten names)."""
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: palette(k % palette.N) for k, name in enumerate(names)}


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_results(results, x="speed", decoding="greedy", title=None):
    """The figure of BLEU of ``decoding`` against its speed (``x="speed"``, log scale) or
    the parameters (``x="params"``) for every system of ``results``."""
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    systems = results["systems"]
    xs = [s[decoding]["sentences_per_s"] if x == "speed" else s["params"] / 1e6 for s in systems]
    ys = [s[decoding]["bleu"] for s in systems]
    colours = system_colours(plt, list(dict.fromkeys(system_name(s) for s in systems)))

    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    for s, x_value, y in zip(systems, xs, ys):
        ax.scatter([x_value], [y], marker=BACKEND_MARKERS.get(backend_of(s), "s"),
                   color=colours[system_name(s)], s=36, zorder=3)
    if x == "speed":
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"{decoding} translation speed (sentences/s, {results.get('device')})"
                  if x == "speed" else "parameters (millions)")
    ax.set_ylabel(f"sacreBLEU ({decoding})")
    ax.grid(True, alpha=0.3)
    ax.set_title(title or f"BLEU vs {'speed' if x == 'speed' else 'size'}")
    backends = list(dict.fromkeys(backend_of(s) for s in systems))
    if len(backends) > 1:
        ax.legend(handles=[Line2D([], [], ls="", marker=BACKEND_MARKERS.get(b, "s"), color="0.4",
                                  label=BACKEND_LABELS.get(b, b))
                           for b in backends], loc="best", ncol=len(backends), fontsize=LABEL_FONT_SIZE)
    left, right = ax.get_xlim()  # room on the right for the labels of the rightmost points
    ax.set_xlim(left, right * 1.6 if x == "speed" else right + 0.2 * (right - left))
    fig.tight_layout()
    labels = [(text, x_value, y, colours[text]) for text, x_value, y in label_groups(systems, xs, ys)]
    place_labels(ax, labels)
    return fig


def save_figure(fig, out):
    """Write ``fig`` to the PNG ``out`` (its folder created) and close it."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    pyplot().close(fig)  # a library caller may draw many


def plot_results(results, out, x="speed", decoding="greedy", title=None):
    """:func:`draw_results` written to the PNG ``out`` (its folder created)."""
    save_figure(draw_results(results, x, decoding, title), out)


def draw_curves(curves, best=None, ylabel="validation BLEU", title=None):
    """The figure of learning curves: ``curves`` maps a system to its (update, value)
    points, drawn as a line in the system's colour; ``best`` (system -> (update, value))
    marks each system's best validation with a star."""
    plt = pyplot()

    colours = system_colours(plt, list(curves))
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    for name, points in curves.items():
        updates, values = zip(*points)
        ax.plot(updates, values, color=colours[name], marker=".", markersize=4, lw=1.2, label=name)
    for name, (update, value) in (best or {}).items():
        ax.scatter([update], [value], marker="*", s=110, color=colours[name], edgecolors="black",
                   linewidths=0.5, zorder=3)
    ax.set_xlabel("updates")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.set_title(title or f"{ylabel} by update" + (" (star: best)" if best else ""))
    ax.legend(fontsize=LABEL_FONT_SIZE, loc="best", ncol=2 if len(curves) > 6 else 1)
    fig.tight_layout()
    return fig


def plot_curves(curves, out, best=None, ylabel="validation BLEU", title=None):
    """:func:`draw_curves` written to the PNG ``out`` (its folder created)."""
    save_figure(draw_curves(curves, best, ylabel, title), out)
