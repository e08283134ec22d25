"""fairseq-kd table --kim-rush: Kim & Rush (2016)'s rows beside the study's own."""
import json

from fairseq_kd import cli
from fairseq_kd.published import KIM_RUSH_2016


def system(name, greedy, beam, params=2.4e6, **extra):
    return {"name": name, "params": params,
            "greedy": {"beam": 1, "bleu": greedy, "chrf": 50.0, "sentences_per_s": 100.0},
            "beam": {"beam": 5, "bleu": beam, "chrf": 51.0, "sentences_per_s": 40.0}, **extra}


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_kim_rush_rows_sit_beside_ours_with_gaps_to_each_teacher_and_gains_over_each_baseline(tmp_path, capsys):
    results = {"systems": [system("teacher", 36.1, 39.0, params=7.6e6), system("baseline", 33.0, 35.2),
                           system("seq_kd", 37.5, 37.9),
                           system("pruned80_seq_kd", 35.0, 36.0, nonzero_params=0.9e6)]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert cli.main(["table", str(path), "--kim-rush"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(KIM_RUSH_2016)
    rows = {cells(line)[0]: cells(line) for line in lines[2:]}
    # theirs: 221M teacher at 19.5 beam; Seq-KD's greedy 0.6 below it, 4.2 / 1.4 over no KD
    assert rows["teacher 4x1000"][:6] == ["teacher 4x1000", "221M", "17.7", "19.5", "-1.8 / +0.0", ""]
    assert rows["2x500 Seq-KD"][:6] == ["2x500 Seq-KD", "84M", "18.9", "19.0", "-0.6 / -0.5", "+4.2 / +1.4"]
    assert rows["2x500, no KD"][5] == "+0.0 / +0.0"
    # ours, against our teacher's beam 39.0 and our baseline 33.0 / 35.2
    assert rows["2x500 Seq-KD"][6:] == ["`seq_kd`", "2.4M", "37.5", "37.9", "-1.5 / -1.1", "+4.5 / +2.7"]
    assert rows["teacher 4x1000"][6:] == ["`teacher`", "7.6M", "36.1", "39.0", "-2.9 / +0.0", ""]
    # the pruned row: no greedy score published; ours counts its non-zero parameters
    pruned = rows["Seq-KD + Seq-Inter, 80% of weights pruned"]
    assert pruned[1:6] == ["17M", "-", "19.1", "- / -0.4", "- / +1.5"]
    assert pruned[6:] == ["`pruned80_seq_kd` (80% pruned)", "0.9M", "35.0", "36.0", "-4.0 / -3.0",
                          "+2.0 / +0.8"]
    # a system not run yet
    assert rows["2x500 Word-KD"][6:] == ["`word_kd`", "not run", "", "", "", ""]


def test_the_pruned_row_is_the_student_the_study_pruned(tmp_path, capsys):
    """--kim-rush-pruned NAME: Kim & Rush's pruned Seq-KD row sits beside our student NAME (the
    recipe's student pruned to 80%), counted by its non-zero parameters."""
    results = {"systems": [system("teacher", 36.1, 39.0, params=7.6e6), system("baseline", 33.0, 35.2),
                           system("pruned80_seq_kd", 30.0, 31.0, nonzero_params=0.9e6),
                           system("pruned80_word_kd", 34.5, 36.1, nonzero_params=1.1e6)]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert cli.main(["table", str(path), "--kim-rush", "--kim-rush-pruned", "pruned80_word_kd"]) == 0
    pruned = cells(capsys.readouterr().out.splitlines()[-1])
    assert pruned[0] == "Seq-KD + Seq-Inter, 80% of weights pruned"
    assert pruned[6:] == ["`pruned80_word_kd` (80% pruned)", "1.1M", "34.5", "36.1", "-4.5 / -2.9",
                          "+1.5 / +0.9"]
