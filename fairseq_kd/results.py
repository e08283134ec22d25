"""The results file of ``fairseq-kd evaluate``: read and checked, updated and printed
(:mod:`fairseq_kd.plots` draws it).

A JSON object: the sacreBLEU signatures ("bleu_signature", "chrf_signature"),
the "device" the speeds were measured on and "systems", one entry per
evaluated system (name, params, device, and per decoding "greedy" / "beam":
beam, bleu, chrf, sentences_per_s).  ``fairseq-kd evaluate`` writes it,
``fairseq-kd table`` and ``fairseq-kd plot`` read it; the table's significance
columns come from the hypotheses files beside it (:mod:`fairseq_kd.study`).

Neither fairseq nor torch is imported here (``fairseq-kd table`` and ``plot``
start quickly).
"""
import contextlib
import json
import os

from fairseq_kd.atomic_io import write_atomic
from fairseq_kd.errors import KDError, require

DECODINGS = ("greedy", "beam")
DECODING_KEYS = ("beam", "bleu", "chrf", "sentences_per_s")
# How a device string notes fp16 decoding (fairseq_kd.evaluation.decoding_device)
FP16_NOTE = " in fp16"


def read_results(path, allow_empty=False):
    """A results file written by ``fairseq-kd evaluate``, checked (for table, plot, evaluate)."""
    require(os.path.isfile(path), f"results file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KDError(f"{path} is not a JSON file ({e})") from None
    require(isinstance(results, dict) and isinstance(results.get("systems"), list),
            f"{path} is not a results file of fairseq-kd evaluate (no 'systems' list)")
    require(allow_empty or results["systems"], f"{path} lists no systems")
    for system in results["systems"]:
        check_system(system, path)
    return results


def check_system(system, path):
    name = system.get("name") if isinstance(system, dict) else None
    require(isinstance(name, str), f"{path}: a system without a name")
    missing = [k for k in ("params", *DECODINGS) if k not in system]
    missing += [f"{d}.{k}" for d in DECODINGS if isinstance(system.get(d), dict)
                for k in DECODING_KEYS if k not in system[d]]
    require(not missing, f"{path}: system '{name}' lacks {', '.join(missing)}")


def results_to_update(path):
    """The results file to update (empty when it does not exist yet)."""
    return read_results(path, allow_empty=True) if os.path.exists(path) else {"systems": []}


def check_same_device(results, path, name, device):
    """Speeds measured on different devices must not share a table or a plot.

    ``results`` (read from ``path``) is about to get the system ``name``
    timed on ``device``.  Systems without their own "device" entry come from
    files written before it existed, whose file-level field could be wrong:
    they are not compared.
    """
    # fp16 is how a PyTorch system decodes, not another device: its CTranslate2 row runs beside it
    others = {s["device"].removesuffix(FP16_NOTE) for s in results["systems"]
              if s["name"] != name and "device" in s}
    require(others <= {device.removesuffix(FP16_NOTE)},
            f"{path} holds systems timed on {', '.join(sorted(others))}, this run decodes on "
            f"{device}: their speeds would not be comparable; use another --results file, or "
            f"delete this one to evaluate every system on this device")


def record_system(path, entry, bleu_signature, chrf_signature, device):
    """Put ``entry`` in ``path`` in place of the system of its name.

    The file is read again under a lock, so an evaluation that ran meanwhile
    into the same file (two recipe runs sharing a work folder) keeps its row.
    """
    with locked(path):
        results = results_to_update(path)
        check_same_device(results, path, entry["name"], device)
        results["bleu_signature"] = bleu_signature
        results["chrf_signature"] = chrf_signature
        results["device"] = device
        results["systems"] = [s for s in results["systems"] if s["name"] != entry["name"]] + [entry]
        write_atomic(path, json.dumps(results, indent=2))


@contextlib.contextmanager
def locked(path):
    """An exclusive lock on the folder that holds ``path``, for the ``with`` block.

    The folder, not a lock file beside ``path``: a shipped folder's results
    file must leave nothing else behind in it.
    """
    import fcntl

    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def find_system(results, name, option):
    """The system ``name`` of ``results`` (``option`` names it in the error)."""
    found = [s for s in results["systems"] if s["name"] == name]
    require(found, f"{option} {name}: no such system in the results")
    return found[0]


def signed(difference):
    """A BLEU difference as a table shows it: one decimal, signed, never "-0.0"."""
    return f"{round(difference, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0"


def markdown_table(results, baseline=None, teacher=None, significance=None, speed=True):
    """The systems as a Markdown table and the signatures.

    ``speed=False`` leaves out the sentences/s columns (systems timed beside
    other jobs: their speeds would mean nothing).

    ``baseline`` adds "vs BASELINE" BLEU columns (each decoding against the
    baseline's same decoding), ``teacher`` "vs TEACHER beam" columns (each
    decoding against the teacher's beam BLEU, the best it translates; with
    ``speed``, also each decoding's speed over the teacher's beam speed), and
    ``significance`` (:func:`fairseq_kd.study.paired_significance` against
    ``baseline``) the p-value of each "vs BASELINE" difference and each BLEU's
    95% bootstrap interval.
    """
    columns = []  # (header, cell of a system) after the fixed columns
    if baseline is not None:
        base = find_system(results, baseline, "--baseline")
        for d in DECODINGS:
            # from the stored scores (2 decimals), then rounded like the columns
            columns.append((f"BLEU {d} vs {baseline}",
                            lambda s, d=d: signed(s[d]["bleu"] - base[d]["bleu"]) + p_value_note(significance, d, s)))
    if teacher is not None:
        top = find_system(results, teacher, "--teacher")
        for d in DECODINGS:
            columns.append((f"BLEU {d} vs {teacher} beam", lambda s, d=d: signed(s[d]["bleu"] - top["beam"]["bleu"])))
        if speed:
            for d in DECODINGS:
                columns.append((f"sent/s {d} / {teacher} beam",
                                lambda s, d=d: f"{s[d]['sentences_per_s'] / top['beam']['sentences_per_s']:.1f}x"))
    if significance is not None:
        for d in DECODINGS:
            columns.append((f"BLEU {d} 95% CI", lambda s, d=d: interval(significance[d][s["name"]])))
    fixed = [("params", lambda s: f"{s['params'] / 1e6:.1f}M")]
    if any(is_sparse(s) for s in results["systems"]):
        fixed.append(("non-zero params", lambda s: f"{s['nonzero_params'] / 1e6:.1f}M" if "nonzero_params" in s
                      else "-"))
    for d in DECODINGS:
        fixed += [(f"BLEU {d}", lambda s, d=d: f"{s[d]['bleu']:.1f}"), (f"chrF {d}", lambda s, d=d: f"{s[d]['chrf']:.1f}")]
        if speed:
            fixed.append((f"sent/s {d}", lambda s, d=d: f"{s[d]['sentences_per_s']:.0f}"))
    lines = ["| system |" + "".join(f" {h} |" for h, _ in fixed + columns),
             "|---|" + "---:|" * (len(fixed) + len(columns))]
    for s in results["systems"]:
        lines.append(f"| {s['name']} |" + "".join(f" {cell(s)} |" for _, cell in fixed + columns))
    lines.append("")
    lines.append(f"BLEU signature: `{results.get('bleu_signature', '')}`  ")
    lines.append(f"chrF signature: `{results.get('chrf_signature', '')}`  ")
    if teacher is not None:
        lines.append(f"vs {teacher} beam: the row's BLEU minus {teacher}'s beam BLEU ({top['beam']['bleu']:.2f})  ")
        if speed:
            lines.append(f"/ {teacher} beam: the row's sentences/s over {teacher}'s beam sentences/s "
                         f"({top['beam']['sentences_per_s']:.1f}, {top.get('backend', 'fairseq')})  ")
    if significance is not None:
        lines.append(f"p: sacreBLEU's paired bootstrap resampling test of the BLEU difference from {baseline} "
                     "(same decoding; * p < 0.05); 95% CI: the BLEU's interval over the same resamples "
                     f"(bootstrap mean ± half-width); signature `{significance['signature']}`  ")
    lines.append(f"beam search: beam {results['systems'][0]['beam']['beam']}; device: {results.get('device')}")
    return "\n".join(lines) + "\n"


def is_sparse(system):
    """Whether a system holds noticeably fewer non-zero parameters than parameters (a pruned
    model; a dense one has a few exact zeros, e.g. the padding embedding)."""
    return "nonzero_params" in system and system["nonzero_params"] < 0.99 * system["params"]


def p_value_note(significance, decoding, system):
    """The p-value after a "vs baseline" difference, " (p 0.0123)", starred below 0.05;
    empty without a test, and for the baseline itself."""
    p = significance[decoding][system["name"]]["p"] if significance is not None else None
    return "" if p is None else f" (p {p:.4f}{'*' if p < 0.05 else ''})"


def interval(result):
    """A bootstrap result's 95% interval of BLEU, "low–high"."""
    return f"{result['mean'] - result['ci']:.1f}–{result['mean'] + result['ci']:.1f}"
