"""fairseq_kd.study and its commands: paired significance against sacreBLEU's own command
line, the table's teacher and significance columns, and shipped hypotheses that rescore to
the table's numbers with the README's own command."""
import json
import lzma
import os
import random
import re
import subprocess

import pytest
from sacrebleu.metrics import BLEU, CHRF

from fairseq_kd import cli
from fairseq_kd.errors import KDError
from fairseq_kd.evaluation import hypotheses_file
from fairseq_kd.results import markdown_table, read_results
from fairseq_kd.study import export_hypotheses, paired_significance, portable_rows
from helpers import BIN, env

WORDS = "in the beginning god created heaven and earth was without form void darkness upon face of deep".split()
# a row's name and how often its hypotheses change a reference word, per decoding
ROWS = {"teacher": (0.10, 0.05), "baseline": (0.40, 0.30), "student": (0.30, 0.25),
        "student (ct2 int8)": (0.32, 0.25)}


def noisy(rng, sentence, rate):
    return " ".join(rng.choice(WORDS) if rng.random() < rate else w for w in sentence.split())


def make_study(folder, rows=ROWS, ref_path=None, seed=7):
    """A results file in ``folder`` whose rows' hypotheses (made-up noisy copies of a made-up
    reference, ``folder``/test.en unless ``ref_path``) lie where fairseq-kd evaluate writes
    them, scored as evaluate scores them: (results path, reference path)."""
    rng = random.Random(seed)
    refs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(80)]
    ref = str(ref_path or os.path.join(folder, "test.en"))
    with open(ref, "w", encoding="utf-8") as f:
        f.write("".join(r + "\n" for r in refs))
    results_path = os.path.join(folder, "results.json")
    systems, bleu = [], BLEU()
    for name, rates in rows.items():
        entry = {"name": name, "params": 1_000_000}
        for decoding, rate in zip(("greedy", "beam"), rates):
            hyps = [noisy(rng, r, rate) for r in refs]
            with open(hypotheses_file(results_path, name, decoding), "w", encoding="utf-8") as f:
                f.write("".join(h + "\n" for h in hyps))
            entry[decoding] = {"beam": 1 if decoding == "greedy" else 5,
                               "bleu": round(bleu.corpus_score(hyps, [refs]).score, 2),
                               "chrf": round(CHRF().corpus_score(hyps, [refs]).score, 2), "sentences_per_s": 10.0}
        systems.append(entry)
    with open(results_path, "w") as f:
        json.dump({"bleu_signature": str(bleu.get_signature()), "device": "CPU", "systems": systems}, f)
    return results_path, ref


@pytest.fixture
def study(tmp_path, monkeypatch):
    monkeypatch.delenv("SACREBLEU_SEED", raising=False)  # sacreBLEU's default seed, here and in its CLI
    return make_study(str(tmp_path))


def sacrebleu_paired_bs(ref, files, *extra):
    """sacreBLEU's command line: ``sacrebleu REF -i BASE SYS... --paired-bs -m bleu``, its JSON."""
    proc = subprocess.run([str(BIN / "sacrebleu"), ref, "-i", *files, "--paired-bs", "-m", "bleu", "-f", "json",
                           *extra], capture_output=True, text=True, env=env(), check=True)
    return json.loads(proc.stdout)


@pytest.mark.parametrize("samples", [1000, 300])
def test_p_values_and_intervals_are_sacrebleus_command_lines(study, samples):
    results_path, ref = study
    results = read_results(results_path)
    ours = paired_significance(results_path, results, ref, "baseline", n_samples=samples)
    others = [n for n in ROWS if n != "baseline"]
    for decoding in ("greedy", "beam"):
        files = [hypotheses_file(results_path, n, decoding) for n in ["baseline", *others]]
        theirs = sacrebleu_paired_bs(ref, files, "--paired-bs-n", str(samples))
        assert [row["system"] for row in theirs][1:] == files[1:]
        for name, row in zip(["baseline", *others], theirs):
            mine = ours[decoding][name]
            assert mine["p"] == row["BLEU"]["p_value"]  # None for the baseline in both
            assert mine["mean"] == pytest.approx(row["BLEU"]["mean"], abs=1e-9)
            assert mine["ci"] == pytest.approx(row["BLEU"]["ci"], abs=1e-9)
        # not vacuous: the teacher changes a quarter as many words as the baseline
        assert ours[decoding]["teacher"]["p"] < 0.05
    assert f"bs:{samples}|seed:12345|" in ours["signature"]


def test_table_shows_the_gap_to_the_teacher_and_the_p_values(study, capsys):
    results_path, ref = study
    results = read_results(results_path)
    assert cli.main(["table", results_path, "--baseline", "baseline", "--teacher", "teacher",
                     "--significance", ref]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    assert header[8:] == ["BLEU greedy vs baseline", "BLEU beam vs baseline", "BLEU greedy vs teacher beam",
                          "BLEU beam vs teacher beam", "sent/s greedy / teacher beam", "sent/s beam / teacher beam",
                          "BLEU greedy 95% CI", "BLEU beam 95% CI"]
    significance = paired_significance(results_path, results, ref, "baseline")
    teacher_beam = results["systems"][0]["beam"]["bleu"]
    for system, line in zip(results["systems"], lines[2:]):
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        for d in ("greedy", "beam"):
            ratio = system[d]["sentences_per_s"] / results["systems"][0]["beam"]["sentences_per_s"]
            assert cells[f"sent/s {d} / teacher beam"] == f"{ratio:.1f}x"
            gap = float(cells[f"BLEU {d} vs teacher beam"])
            assert gap == pytest.approx(system[d]["bleu"] - teacher_beam, abs=0.05 + 1e-9)
            vs_base = re.fullmatch(r"([+-]\d+\.\d)(?: \(p (\d\.\d{4})\*?\))?", cells[f"BLEU {d} vs baseline"])
            p = significance[d][system["name"]]["p"]
            assert vs_base[2] == (None if p is None else f"{p:.4f}")
            low, high = map(float, cells[f"BLEU {d} 95% CI"].split("–"))
            result = significance[d][system["name"]]
            assert (low, high) == pytest.approx((result["mean"] - result["ci"], result["mean"] + result["ci"]),
                                                abs=0.05 + 1e-9)
    assert "signature `nrefs:1|bs:1000|seed:12345|" in "\n".join(lines)


def test_significance_needs_the_evaluated_hypotheses(study, capsys):
    results_path, ref = study
    assert cli.main(["table", results_path, "--significance", ref]) == 2
    assert "--significance compares with --baseline" in capsys.readouterr().err
    # a hypotheses file that is not the one evaluate scored: one line, no table
    path = hypotheses_file(results_path, "student", "beam")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines[1:] + lines[:1]))
    assert cli.main(["table", results_path, "--baseline", "baseline", "--significance", ref]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results.student.beam.txt scores BLEU" in err[0] and "not the translations evaluated" in err[0]
    os.remove(path)
    with pytest.raises(KDError, match="student beam: hypotheses not found"):
        paired_significance(results_path, read_results(results_path), ref, "baseline")


def test_table_without_the_new_options_is_unchanged(study):
    results = read_results(study[0])
    plain = markdown_table(results, "baseline").splitlines()
    assert plain[0].endswith("| BLEU greedy vs baseline | BLEU beam vs baseline |") and "p " not in plain[3]
    with pytest.raises(KDError, match="--teacher tutor: no such system"):
        markdown_table(results, teacher="tutor")


def test_shipped_hypotheses_rescore_to_the_tables_numbers_with_the_readmes_command(study, tmp_path):
    results_path, ref = study
    results = read_results(results_path)
    out = tmp_path / "docs" / "hypotheses"
    out.mkdir(parents=True)
    (out / "results.gone.beam.txt.xz").write_bytes(b"left by an earlier export")
    proc = subprocess.run([str(BIN / "fairseq-kd"), "hypotheses", results_path, "--ref", ref, "--out", out],
                          capture_output=True, text=True, env=env(), check=True)
    shipped = sorted(p.name for p in out.glob("*.txt.xz"))
    assert shipped == sorted(os.path.basename(hypotheses_file(results_path, s["name"], d)) + ".xz"
                             for s in results["systems"] for d in ("greedy", "beam"))
    assert proc.stdout.strip() == f"wrote {len(shipped) + 3} files to {out}"  # + reference, rows, README
    # the rows as the results file has them, no path of the machine
    rows = json.loads((out / "results.json").read_text())
    assert rows["systems"] == results["systems"] and rows["bleu_signature"] == results["bleu_signature"]
    readme = (out / "README.md").read_text()
    decompress, rescore = re.findall(r"^    (xz .*)$", readme, re.M)
    subprocess.run(decompress, shell=True, cwd=out, check=True)
    assert (out / "test.en").read_text() == open(ref).read()
    env_path = dict(env(), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    example = rescore.split()[2]
    refs = open(ref).read().splitlines()
    for system in results["systems"]:
        for d in ("greedy", "beam"):
            name = os.path.basename(hypotheses_file(results_path, system["name"], d)) + ".xz"
            # the README's command, for this file: the score the results file records
            scored = subprocess.run(rescore.replace(example, f"'{name}'"), shell=True, cwd=out, env=env_path,
                                    capture_output=True, text=True, check=True)
            assert json.loads(scored.stdout)["score"] == system[d]["bleu"]
            # exactly the file evaluate wrote
            text = lzma.decompress((out / name).read_bytes()).decode()
            assert text == open(hypotheses_file(results_path, system["name"], d)).read()
            assert round(BLEU().corpus_score(text.splitlines(), [refs]).score, 2) == system[d]["bleu"]
            assert f"| {name} | {system[d]['bleu']:.2f} |" in readme


def test_export_refuses_hypotheses_that_do_not_score_as_recorded(study, tmp_path):
    results_path, ref = study
    results = read_results(results_path)
    results["systems"][1]["greedy"]["bleu"] += 1
    with pytest.raises(KDError, match=r"results.baseline.greedy.txt scores BLEU .* records"):
        export_hypotheses(results_path, results, ref, str(tmp_path / "out"))
    with pytest.raises(KDError, match="--systems nobody: no such system"):
        export_hypotheses(results_path, results, ref, str(tmp_path / "out"), ["nobody"])


def test_table_without_speed_drops_only_the_speed_columns(study):
    """--no-speed: the same table less its two sent/s columns, cell for cell."""
    results = read_results(study[0])
    full = [line.split("|") for line in markdown_table(results, "baseline").splitlines()[:5]]
    quality = [line.split("|") for line in markdown_table(results, "baseline", speed=False).splitlines()[:5]]
    speed_cols = [i for i, h in enumerate(full[0]) if "sent/s" in h]
    assert len(speed_cols) == 2
    assert quality == [[c for i, c in enumerate(row) if i not in speed_cols] for row in full]


def test_shipped_rows_name_no_path_of_the_machine(tmp_path):
    """results.json beside the hypotheses: a file in the work folder by its path there, one
    elsewhere (a teacher in the repository) by its name."""
    work = tmp_path / "work"
    rows = [{"name": "student", "checkpoint": str(work / "exported" / "student.pt")},
            {"name": "teacher", "checkpoint": str(tmp_path / "repo" / "examples" / "teacher" / "teacher.pt")},
            {"name": "ct2", "model_dir": "exported/ct2"}]
    assert portable_rows(str(work / "results.json"), rows) == [
        {"name": "student", "checkpoint": "exported/student.pt"}, {"name": "teacher", "checkpoint": "teacher.pt"},
        {"name": "ct2", "model_dir": "exported/ct2"}]
    assert rows[0]["checkpoint"] == str(work / "exported" / "student.pt")  # the rows given are not changed
