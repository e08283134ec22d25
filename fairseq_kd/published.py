"""Published results a study's page sets beside its own: Kim & Rush (2016).

Kim & Rush, "Sequence-Level Knowledge Distillation" (EMNLP 2016), Table 1: WMT14
English-German, newstest2014, BLEU of greedy and beam-5 decoding.  Their teacher is
a 4x1000 LSTM, their students 2x500; :func:`kim_rush_table` prints their rows in one
table with the rows of ours that do the same thing (``fairseq-kd table --kim-rush``):
each BLEU's distance from the teacher's beam score, and each student's gain over the
student trained without KD.
"""
import dataclasses

from fairseq_kd.results import signed


@dataclasses.dataclass(frozen=True)
class PublishedRow:
    label: str  # the row as the paper has it
    params_m: float  # millions of parameters (non-zero ones for a pruned model)
    greedy: float | None  # BLEU; None: not reported
    beam: float | None
    ours: str  # the system of ours that does the same
    ours_note: str = ""  # where ours differs


KIM_RUSH_2016 = [
    PublishedRow("teacher 4x1000", 221, 17.7, 19.5, "teacher"),
    PublishedRow("2x500, no KD", 84, 14.7, 17.6, "baseline"),
    PublishedRow("2x500 Word-KD", 84, 15.4, 17.7, "word_kd"),
    PublishedRow("2x500 Seq-KD", 84, 18.9, 19.0, "seq_kd"),
    PublishedRow("2x500 Seq-KD + Seq-Inter + Word-KD", 84, 18.8, 19.2, "seq_word_kd", "Seq-KD + Word-KD, no Seq-Inter"),
    PublishedRow("Seq-KD + Seq-Inter, 80% of weights pruned", 17, None, 19.1, "pruned80_seq_kd",
                 "80% pruned"),
]
KIM_RUSH_TEACHER, KIM_RUSH_BASELINE = KIM_RUSH_2016[0], KIM_RUSH_2016[1]


def kim_rush_rows(pruned):
    """Kim & Rush's rows, their pruned one set beside our student PRUNED (the recipe's student
    pruned to 80%: they pruned their Seq-KD student, a study may prune its best one instead)."""
    return KIM_RUSH_2016[:-1] + [dataclasses.replace(KIM_RUSH_2016[-1], ours=pruned)]


def bleu(value):
    return "-" if value is None else f"{value:.1f}"


def difference(value, reference):
    return "-" if value is None or reference is None else signed(value - reference)


def ours_params(system):
    count = system.get("nonzero_params", system["params"])
    return f"{count / 1e6:.1f}M"


def kim_rush_table(results, teacher="teacher", baseline="baseline", rows=KIM_RUSH_2016):
    """Kim & Rush's rows and ours side by side, in one Markdown table: parameters, BLEU greedy
    and beam, each BLEU minus the teacher's beam BLEU, and each student's BLEU minus the
    no-KD student's (same decoding).  A system of ours that was not run shows "not run"."""
    systems = {s["name"]: s for s in results["systems"]}
    ours_teacher, ours_base = systems.get(teacher), systems.get(baseline)
    top = ours_teacher["beam"]["bleu"] if ours_teacher else None
    lines = ["| Kim & Rush 2016 | params | greedy | beam | vs teacher beam (greedy / beam) | vs no KD (greedy / beam) "
             "| ours | params | greedy | beam | vs teacher beam (greedy / beam) | vs baseline (greedy / beam) |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        student = row is not rows[0]
        theirs = [row.label, f"{row.params_m:g}M", bleu(row.greedy), bleu(row.beam),
                  f"{difference(row.greedy, KIM_RUSH_TEACHER.beam)} / {difference(row.beam, KIM_RUSH_TEACHER.beam)}",
                  (f"{difference(row.greedy, KIM_RUSH_BASELINE.greedy)} / "
                   f"{difference(row.beam, KIM_RUSH_BASELINE.beam)}") if student else ""]
        name = f"`{row.ours}`" + (f" ({row.ours_note})" if row.ours_note else "")
        system = systems.get(row.ours)
        if system is None:
            ours = [name, "not run", "", "", "", ""]
        else:
            greedy, beam = system["greedy"]["bleu"], system["beam"]["bleu"]
            versus_base = (f"{difference(greedy, ours_base['greedy']['bleu'])} / "
                           f"{difference(beam, ours_base['beam']['bleu'])}") if student and ours_base else ""
            ours = [name, ours_params(system), bleu(greedy), bleu(beam),
                    f"{difference(greedy, top)} / {difference(beam, top)}", versus_base]
        lines.append("| " + " | ".join(theirs + ours) + " |")
    return "\n".join(lines) + "\n"
