"""fairseq_kd.shipping and the demo's side-by-side: the pieces of a shipped folder.

A SentencePiece model without the training machine's paths encodes exactly as before;
an export with --portable holds no absolute path; a results file names its model by its
file name; a line of options loses the machine's paths; a training log says why training
stopped; fairseq-kd side-by-side prints the translations evaluate wrote, and refuses
hypotheses that are not the ones scored.  (The recipe's ship_students step, end to end
on a tiny student: tests/test_shipped_students.py.)
"""
import json
import os
import tarfile

import pytest
import torch

from fairseq_kd.errors import KDError
from fairseq_kd.shipping import (model_problems, parameters_words, portable_results, portable_spm_model, portable_text,
                                 proto_fields, stop_reason)
from helpers import BIBLE_ARCHIVE, REPO, run, tool

TEACHER_DIR = REPO / "examples" / "teacher"


def trainer_spec_strings(model):
    """TrainerSpec's input files and model prefix of a serialized SentencePiece model."""
    spec = next(payload for number, wire, _, payload in proto_fields(model) if number == 2 and wire == 2)
    return [payload.decode() for number, wire, _, payload in proto_fields(spec) if number in (1, 2) and wire == 2]


def test_a_portable_sentencepiece_model_keeps_file_names_only_and_encodes_exactly_as_before(tmp_path):
    import sentencepiece as spm

    # SentencePiece records the paths of its training files and output in the model
    text = tmp_path / "corpus" / "train.es"
    text.parent.mkdir()
    with tarfile.open(BIBLE_ARCHIVE) as tar:
        text.write_bytes(tar.extractfile("bible.es-en/train.es").read()[:50_000])
    (tmp_path / "pieces").mkdir()
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "pieces" / "spm"), vocab_size=200,
                                   minloglevel=2)
    trained = (tmp_path / "pieces" / "spm.model").read_bytes()
    assert trainer_spec_strings(trained) == [str(text), str(tmp_path / "pieces" / "spm")]
    assert trainer_spec_strings(portable_spm_model(trained)) == ["train.es", "spm"]
    assert str(tmp_path).encode() not in portable_spm_model(trained)
    # the teacher's 8k model (whatever it recorded): only names left, every test verse encoded as before
    original = (TEACHER_DIR / "spm.model").read_bytes()
    portable = portable_spm_model(original)
    assert trainer_spec_strings(portable) == [os.path.basename(p) for p in trainer_spec_strings(original)]
    assert portable_spm_model(portable) == portable
    a, b = (spm.SentencePieceProcessor(model_proto=m) for m in (original, portable))
    assert a.get_piece_size() == b.get_piece_size() == 8000
    with tarfile.open(BIBLE_ARCHIVE) as tar:
        lines = [line for lang in ("es", "en")
                 for line in tar.extractfile(f"bible.es-en/test.{lang}").read().decode().splitlines()]
    assert len(lines) == 4000
    assert [a.encode(line) for line in lines] == [b.encode(line) for line in lines]
    assert [b.decode(b.encode(line)) for line in lines[:50]] == [a.decode(a.encode(line)) for line in lines[:50]]
    with pytest.raises(KDError, match="not a SentencePiece model"):
        portable_spm_model(b"\x0f" + original)


def test_a_portable_export_records_no_path_of_the_machine(tmp_path):
    from fairseq_kd.deploy.export import write_export

    # a checkpoint trained on a data folder of this machine (the shipped teacher's weights)
    state = torch.load(TEACHER_DIR / "teacher.pt", map_location="cpu", weights_only=True)
    state["cfg"]["task"]["data"] = str(tmp_path / "bin")
    torch.save(state, tmp_path / "trained.pt")
    write_export(str(tmp_path / "trained.pt"), str(tmp_path / "plain.pt"), half=True, data=str(TEACHER_DIR))
    assert model_problems(str(tmp_path / "plain.pt")) == [
        f"plain.pt: cfg.task.data is a path of the machine: {tmp_path / 'bin'}"]
    _, exported, origin = write_export(str(tmp_path / "trained.pt"), str(tmp_path / "teacher.pt"), half=True,
                                       data=str(TEACHER_DIR), portable=True)
    assert origin == str(TEACHER_DIR / "dict.txt")  # its dictionaries embedded from the folder's dict.txt
    assert model_problems(str(tmp_path / "teacher.pt")) == []
    assert str(tmp_path).encode() not in (tmp_path / "teacher.pt").read_bytes()
    shipped = torch.load(tmp_path / "teacher.pt", map_location="cpu", weights_only=True)
    assert shipped["cfg"]["task"]["data"] is None and shipped["cfg"]["model"].data is None
    assert shipped["cfg"]["task"]["source_lang"] == "es"
    assert len(shipped["fairseq_kd"]["dictionaries"]["src"]) == 4 + 8004  # the specials and dict.txt
    assert all(torch.equal(shipped["model"][k], v) for k, v in state["model"].items())
    proc = run([tool("fairseq-kd"), "export", "--path", TEACHER_DIR / "teacher.pt", "--out", tmp_path / "x",
                "--format", "ctranslate2", "--portable", "--spm-model", TEACHER_DIR / "spm.model"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("error: --portable is for --format fairseq")


def test_portable_results_name_the_model_by_its_place_in_the_folder(tmp_path):
    folder = tmp_path / "shipped"
    folder.mkdir()
    entry = {"name": "seq_kd", "checkpoint": str(folder / "student.pt"), "params": 1,
             **{d: {"beam": b, "bleu": 1.0, "chrf": 2.0, "sentences_per_s": 3.0} for d, b in (("greedy", 1), ("beam", 5))}}
    (folder / "evaluation.json").write_text(json.dumps({"systems": [entry], "device": "CPU"}))
    results = portable_results(str(folder / "evaluation.json"))
    assert results["systems"][0]["checkpoint"] == "student.pt"
    assert json.loads((folder / "evaluation.json").read_text()) == {**results}
    assert json.loads((folder / "evaluation.json").read_text())["systems"][0] == {**entry, "checkpoint": "student.pt"}


def test_portable_text_makes_work_and_repository_paths_relative_and_others_a_file_name():
    text = ("--teacher-path /repo/examples/teacher/teacher.pt --distilled-data /w/distilled "
            "--teacher-cache=/w/teacher_cache --data /elsewhere/bin/ --user-dir /repo/fairseq_kd "
            "--eval-bleu-args {\"beam\":1} --ratio 1/2 `/w` and /wx/y")
    assert portable_text(text, ["/w", "/repo"]) == (
        "--teacher-path examples/teacher/teacher.pt --distilled-data distilled "
        "--teacher-cache=teacher_cache --data bin --user-dir fairseq_kd "
        "--eval-bleu-args {\"beam\":1} --ratio 1/2 `.` and y")


STAMP = "2026-12-01 10:00:00 | INFO | fairseq_cli.train |"
DONE = f"{STAMP} done training in 812.3 seconds"


@pytest.mark.parametrize("nonzero, words", [
    (2413568, "2.4M parameters"),
    (2413567, "2.4M parameters"),  # one weight float16 rounded to zero: not a pruned model
    (1725440, "2.4M parameters, 1.73M of them non-zero (pruned)"),
])
def test_a_shipped_readme_states_a_pruned_students_non_zero_parameters(nonzero, words):
    assert parameters_words({"params": 2413568, "nonzero_params": nonzero}) == words


@pytest.mark.parametrize("lines, stale, patience, reason", [
    ([DONE], "", "", "--max-epoch reached"),
    ([f"{STAMP} early stop since valid performance hasn't improved for last 6 runs", DONE], "6", "6",
     "early stopping: no better validation in the 6 epochs after the best (--patience 6)"),
    ([f"{STAMP} early stop since valid performance hasn't improved for last 6 runs", DONE], "", "",
     "early stopping: no better validation in 6 validations (--patience 6)"),
    ([f"{STAMP} Stopping training due to cumulative_training_time: 10.0002 > stop_time_hours: 10.0 hour(s)", DONE,
      "2026-12-02 | resumed", f"{STAMP} Stopping training due to num_updates: 1600 >= max_update: 1600", DONE],
     "2", "6", "--max-update 1600 reached"),  # the last run decides
    ([f"{STAMP} Stopping training due to cumulative_training_time: 10.0002 > stop_time_hours: 10.0 hour(s)", DONE],
     "1", "6", "the clock: --stop-time-hours 10.0 reached"),
    ([f"{STAMP} training on 1 devices"], "", "", "unknown: no run in the training log finished"),
])
def test_stop_reason_is_the_last_runs(tmp_path, lines, stale, patience, reason):
    log = tmp_path / "train.log"
    log.write_text("\n".join(lines) + "\n")
    assert stop_reason(str(log), stale, patience) == reason


def test_side_by_side_prints_the_scored_translations(tmp_path, monkeypatch, capsys):
    from fairseq_kd.cli import main
    from test_study import make_study

    monkeypatch.delenv("SACREBLEU_SEED", raising=False)
    results, ref = make_study(str(tmp_path), {"teacher": (0.1, 0.05), "seq_kd (shipped)": (0.4, 0.3)})
    refs = open(ref).read().splitlines()
    src = tmp_path / "test.es"
    src.write_text("".join(f"fuente {i}\n" if i != 0 else "x" * 200 + "\n" for i in range(len(refs))))
    assert main(["side-by-side", results, "--src", src, "--ref", ref, "--systems", "seq_kd (shipped)", "teacher",
                 "--lines", "2"]) == 0
    out = capsys.readouterr().out
    hyps = {name: open(f"{tmp_path}/results.{stem}.beam.txt").read().splitlines()
            for name, stem in (("teacher", "teacher"), ("seq_kd (shipped)", "seq_kd.shipped"))}
    # 80 pairs, the first too long: two of the other 79, spread evenly (the 2nd and the 41st)
    assert out == "\n".join(
        f"test sentence {i + 1} of 80:\n  source            fuente {i}\n  reference         {refs[i]}\n"
        f"  seq_kd (shipped)  {hyps['seq_kd (shipped)'][i]}\n  teacher           {hyps['teacher'][i]}\n"
        for i in (1, 40))
    # greedy translations on request; hypotheses that are not the scored ones are refused
    assert main(["side-by-side", results, "--src", src, "--ref", ref, "--systems", "teacher", "--lines", "1",
                 "--decoding", "greedy"]) == 0
    greedy = open(f"{tmp_path}/results.teacher.greedy.txt").read().splitlines()
    assert capsys.readouterr().out.splitlines()[3] == f"  teacher    {greedy[1]}"
    with open(f"{tmp_path}/results.teacher.beam.txt", "w") as f:
        f.write("".join(r + "\n" for r in refs))
    assert main(["side-by-side", results, "--src", src, "--ref", ref, "--systems", "teacher"]) == 2
    assert "scores BLEU 100.00 against" in capsys.readouterr().err
    assert main(["side-by-side", results, "--src", src, "--ref", ref, "--systems", "word_kd"]) == 2
    assert capsys.readouterr().err.strip() == "fairseq-kd side-by-side: error: --systems word_kd: no such system in the results"


def test_table_prints_only_the_systems_named(tmp_path, monkeypatch, capsys):
    from fairseq_kd.cli import main
    from test_study import make_study

    monkeypatch.delenv("SACREBLEU_SEED", raising=False)
    results, _ = make_study(str(tmp_path), {"teacher": (0.1, 0.05), "baseline": (0.4, 0.3),
                                            "baseline (shipped)": (0.3, 0.2), "seq_kd (shipped)": (0.2, 0.2)})
    assert main(["table", results, "--baseline", "baseline (shipped)", "--systems", "teacher",
                 "baseline (shipped)", "seq_kd (shipped)"]) == 0
    rows = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows == ["| system", "| teacher", "| baseline (shipped)", "| seq_kd (shipped)"]
    assert main(["table", results, "--systems", "nothing"]) == 2
