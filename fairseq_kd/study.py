"""A study's test translations: paired significance against a baseline, and shipped hypotheses.

``fairseq-kd evaluate`` leaves each results row's detokenized hypotheses, greedy
and beam, beside the results file (:func:`fairseq_kd.evaluation.hypotheses_file`).
From them:

* :func:`paired_significance` runs sacreBLEU's own paired bootstrap resampling
  (:class:`sacrebleu.significance.PairedTest`, as ``sacrebleu REF -i BASE SYS ...
  --paired-bs``) of every row against a baseline row, per decoding
  (``fairseq-kd table --significance``);
* :func:`export_hypotheses` copies them xz-compressed, with the reference, the
  results rows (``results.json``), the students' training records
  (``training.NAME.json``, :func:`fairseq_kd.curves.training_record`) and a README
  saying how to rescore them (``fairseq-kd hypotheses``): what the study's page
  shows, kept with it even when the work folder that made it is gone;
* :func:`side_by_side` prints a few test sentences with every row's translation
  (``fairseq-kd side-by-side``, the demo's last step).

All first check that each file scores the BLEU the results file records, so
neither reports on translations other than the ones in the table.
"""
import glob
import json
import lzma
import os

from fairseq_kd.atomic_io import write_atomic
from fairseq_kd.errors import require
from fairseq_kd.evaluation import hypotheses_file, read_lines
from fairseq_kd.results import DECODINGS, find_system

BOOTSTRAP_SAMPLES = 1000  # sacreBLEU's default for --paired-bs


def row_hypotheses(results_path, system, decoding, n_refs):
    """The hypotheses fairseq-kd evaluate wrote for one row and decoding, one per reference."""
    path = hypotheses_file(results_path, system["name"], decoding)
    require(os.path.isfile(path), f"{system['name']} {decoding}: hypotheses not found: {path} "
                                  f"(written by fairseq-kd evaluate beside {results_path})")
    hyps = read_lines(path)
    require(len(hyps) == n_refs, f"{path}: {len(hyps)} lines for {n_refs} references")
    return hyps


def require_recorded_score(score, system, decoding, results_path, ref_path):
    """A row's hypotheses rescored must give the BLEU its results entry records (2 decimals)."""
    recorded = system[decoding]["bleu"]
    require(round(score, 2) == recorded,
            f"{hypotheses_file(results_path, system['name'], decoding)} scores BLEU {score:.2f} against "
            f"{ref_path}, {results_path} records {recorded}: not the translations evaluated, or another reference")


def paired_significance(results_path, results, ref_path, baseline, n_samples=BOOTSTRAP_SAMPLES):
    """sacreBLEU's paired bootstrap test of every row's BLEU against ``baseline``'s, per decoding.

    Returns {"signature": the test's BLEU signature, "greedy"/"beam": {row name:
    {"p": p-value (None for the baseline), "mean": the bootstrap mean BLEU, "ci":
    half-width of its 95% interval}}}.  sacreBLEU seeds the resampling from
    SACREBLEU_SEED (default 12345, in the signature), as its command line does, so
    the numbers are those of ``sacrebleu REF -i BASE SYS --paired-bs`` with the
    same samples.
    """
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    require(n_samples > 0, f"bootstrap samples must be positive, got {n_samples}")
    base = find_system(results, baseline, "--baseline")
    rows = [base] + [s for s in results["systems"] if s is not base]
    refs = read_lines(ref_path)
    significance = {}
    for decoding in DECODINGS:
        named = [(s["name"], row_hypotheses(results_path, s, decoding, len(refs))) for s in rows]
        # references given to the metric, as sacrebleu's command line does: their statistics once
        signatures, scores = PairedTest(named, {"BLEU": BLEU(references=[refs])}, references=None,
                                        test_type="bs", n_samples=n_samples)()
        significance[decoding] = {}
        for system, result in zip(rows, scores["BLEU"]):
            require_recorded_score(result.score, system, decoding, results_path, ref_path)
            significance[decoding][system["name"]] = {"p": result.p_value, "mean": result.mean, "ci": result.ci}
        significance["signature"] = str(signatures["BLEU"])
    return significance


def exported_name(results_path, name, decoding):
    """The shipped file of a row's hypotheses: its file in the work folder, xz-compressed."""
    return os.path.basename(hypotheses_file(results_path, name, decoding)) + ".xz"


def write_xz(path, data):
    # written whole then renamed: a folder in docs/ never holds half a file
    with lzma.open(path + ".tmp", "wb", preset=9) as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def portable_rows(results_path, rows):
    """The results rows with every file they name (:data:`fairseq_kd.shipping.PATH_FIELDS`)
    relative to the results file's folder (the work folder), or by its name alone when it
    lies outside: no path of the machine that made them."""
    from fairseq_kd.shipping import PATH_FIELDS

    folder = os.path.dirname(os.path.abspath(results_path))
    portable = json.loads(json.dumps(rows))
    for system in portable:
        for field in PATH_FIELDS:
            if isinstance(system.get(field), str):
                path = os.path.abspath(os.path.join(folder, system[field]))
                inside = os.path.commonpath([path, folder]) == folder
                system[field] = os.path.relpath(path, folder) if inside else os.path.basename(path)
    return portable


def write_training_records(out_dir, logs):
    """``out_dir``/training.NAME.json for every (name, fairseq-train log or training record)
    of ``logs``: validation BLEU when logged, else the loss; stale records removed first."""
    from fairseq_kd.curves import LOG_SOURCE, read_curve, write_record

    for stale in glob.glob(os.path.join(out_dir, "training.*.json")):
        os.remove(stale)
    return [write_record(os.path.join(out_dir, f"training.{name}.json"), read_curve(path, name), None,
                         "its training record" if path.endswith(".json") else LOG_SOURCE)
            for name, path in logs]


def export_hypotheses(results_path, results, ref_path, out_dir, names=None, logs=()):
    """Write each row's hypotheses (greedy and beam) xz-compressed into ``out_dir``, with
    the reference, the rows themselves (``results.json``, :func:`portable_rows`), each
    (name, log) of ``logs`` as a training record (:func:`write_training_records`) and a
    README.md on rescoring them; return the files written.

    ``names`` limits the rows (default: all).  Hypotheses files and training records a
    previous export left in ``out_dir`` are removed first, so the folder holds exactly
    the table's rows.
    """
    from sacrebleu.metrics import BLEU

    rows = results["systems"] if names is None else [find_system(results, n, "--systems") for n in names]
    refs = read_lines(ref_path)
    bleu = BLEU(references=[refs])
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, "*.txt.xz")):
        os.remove(stale)
    written, scores = [], []
    for system in rows:
        for decoding in DECODINGS:
            hyps = row_hypotheses(results_path, system, decoding, len(refs))
            score = bleu.corpus_score(hyps, None).score
            require_recorded_score(score, system, decoding, results_path, ref_path)
            with open(hypotheses_file(results_path, system["name"], decoding), "rb") as f:
                data = f.read()
            written.append(os.path.join(out_dir, exported_name(results_path, system["name"], decoding)))
            write_xz(written[-1], data)
            scores.append((os.path.basename(written[-1]), system[decoding]["bleu"]))
    ref_name = os.path.basename(ref_path)
    with open(ref_path, "rb") as f:
        write_xz(os.path.join(out_dir, ref_name + ".xz"), f.read())
    rows_file = os.path.join(out_dir, "results.json")
    write_atomic(rows_file, json.dumps({**{k: v for k, v in results.items() if k != "systems"},
                                        "systems": portable_rows(results_path, rows)}, indent=1) + "\n")
    records = write_training_records(out_dir, logs)
    readme = os.path.join(out_dir, "README.md")
    with open(readme, "w", encoding="utf-8") as f:
        f.write(hypotheses_readme(ref_name, scores, str(bleu.get_signature()), [n for n, _ in logs]))
    return written + [os.path.join(out_dir, ref_name + ".xz"), rows_file, *records, readme]


def hypotheses_readme(ref_name, scores, signature, trained=()):
    """The exported folder's README: what the files are, how to rescore them, the BLEU of each."""
    example = scores[0][0]
    lines = ["# Test hypotheses", "",
             "Detokenized test translations of the results table's systems, one sentence per line (written",
             "by `fairseq-kd evaluate`, exported by `fairseq-kd hypotheses`), and the reference",
             f"`{ref_name}.xz`.  Rescore one with sacreBLEU (`-w 2`: the two decimals below):", "",
             f"    xz -dk {ref_name}.xz", f"    xz -dc {example} | sacrebleu {ref_name} -w 2", "",
             "| file | BLEU |", "|---|---:|"]
    lines += [f"| {name} | {score:.2f} |" for name, score in scores]
    lines += ["", f"BLEU signature: `{signature}`", "",
              "`results.json`: the rows these files were scored in (`fairseq-kd evaluate`'s results file;",
              "`fairseq-kd table results.json` prints them)."]
    if trained:
        lines += [f"`training.NAME.json`: the validation curve and hours in training updates of {', '.join(trained)}",
                  "(`fairseq-kd curves --log NAME=training.NAME.json` draws it)."]
    return "\n".join(lines) + "\n"


def pick_lines(sources, refs, count, max_chars):
    """``count`` line numbers spread evenly over the test set (the first among them), of the
    pairs whose source and reference are non-empty and at most ``max_chars`` characters."""
    candidates = [i for i, (src, ref) in enumerate(zip(sources, refs))
                  if src.strip() and ref.strip() and max(len(src), len(ref)) <= max_chars]
    if len(candidates) <= count:
        return candidates
    return [candidates[k * len(candidates) // count] for k in range(count)]


def side_by_side(results_path, results, src_path, ref_path, names, count=3, decoding="beam", max_chars=160):
    """Text: ``count`` test sentences (:func:`pick_lines`), each with its source, reference and
    the translation of every row in ``names``, from the hypotheses fairseq-kd evaluate wrote
    beside ``results_path`` (each checked to score the BLEU the results file records)."""
    from sacrebleu.metrics import BLEU

    require(decoding in DECODINGS, f"decoding must be one of {', '.join(DECODINGS)}, got {decoding}")
    require(count >= 1, f"the number of sentences must be positive, got {count}")
    sources, refs = read_lines(src_path), read_lines(ref_path)
    require(len(sources) == len(refs), f"{src_path} has {len(sources)} lines, {ref_path} {len(refs)}")
    bleu = BLEU(references=[refs])
    translations = []
    for name in names:
        system = find_system(results, name, "--systems")
        hyps = row_hypotheses(results_path, system, decoding, len(refs))
        require_recorded_score(bleu.corpus_score(hyps, None).score, system, decoding, results_path, ref_path)
        translations.append(hyps)
    labels = ["source", "reference", *names]
    width = max(map(len, labels))
    lines = []
    for i in pick_lines(sources, refs, count, max_chars):
        lines.append(f"test sentence {i + 1} of {len(refs)}:")
        for label, text in zip(labels, [sources[i], refs[i], *(hyps[i] for hyps in translations)]):
            lines.append(f"  {label:<{width}}  {text}")
        lines.append("")
    return "\n".join(lines)
