"""The recipes with TEACHER_CT2, an external CTranslate2 teacher (#22 item 3): the commands they
run (dry run), the methods they refuse, and (slow) the custom recipe from raw text to its report."""
import json

import pytest

from test_recipes import TINY, check_options, dry_run_commands, run_recipe, train_option


def test_external_teacher_translates_first_and_students_get_their_own_vocabulary(tmp_path):
    ct2 = str(tmp_path / "opus-mt-de-en")
    cmds = dry_run_commands("custom", tmp_path, TEACHER_CT2=ct2, TEACHER_SRC_LANG="__de__",
                            TEACHER_TGT_LANG="__en__", METHODS="baseline seq_kd seq_inter")
    assert cmds[0][0] == "bash"  # prepare.sh: the raw text
    cmds = cmds[1:]
    for cmd in cmds:
        check_options(cmd)
    steps = [c[1] if c[0] == "fairseq-kd" else c[0] for c in cmds]
    # no teacher trained; the teacher's text first, then the students' vocabulary and data
    assert steps[:7] == ["corpus", "corpus", "spm", "spm", "spm", "fairseq-preprocess", "fairseq-preprocess"]
    corpus, inter = cmds[0], cmds[1]
    assert corpus[2] == str(tmp_path / "custom" / "raw") and train_option(corpus, "--teacher-ct2") == ct2
    assert (train_option(corpus, "--source-prefix"), train_option(corpus, "--target-prefix")) == ("__de__", "__en__")
    assert train_option(inter, "--seq-inter") == "35" and train_option(inter, "--out").endswith("/distilled_inter_text")
    spm = [c for c in cmds if c[1:2] == ["spm"]]
    assert train_option(spm[0], "--input-dir").endswith("/distilled_text") and "--vocab-size" in spm[0]
    assert all(train_option(c, "--model").endswith("/pieces_distilled/spm.model") for c in spm[1:])
    preprocess = [c for c in cmds if c[0] == "fairseq-preprocess"]
    assert [train_option(c, "--destdir").rsplit("/", 1)[1] for c in preprocess] == ["distilled", "bin", "distilled_inter"]
    assert "--srcdict" not in preprocess[0]
    assert all(train_option(c, "--srcdict").endswith("/distilled/dict.de.txt") for c in preprocess[1:])
    students = [c for c in cmds if c[0] == "fairseq-train"]
    assert [train_option(c, "--save-dir").rsplit("/", 1)[1] for c in students] == [
        "student_baseline", "student_seq_kd", "student_seq_inter", "student_pruned_seq_kd"]
    assert not any("--teacher-path" in c for c in students)
    teacher_row, = [c for c in cmds if c[1:2] == ["evaluate"] and "--teacher-ct2" in c]
    assert train_option(teacher_row, "--name") == "teacher"
    assert train_option(teacher_row, "--src-text") == str(tmp_path / "custom" / "raw" / "test.de")


def test_external_teacher_defaults_to_baseline_and_seq_kd(tmp_path):
    cmds = dry_run_commands("custom", tmp_path, "students", TEACHER_CT2=str(tmp_path / "m"))
    assert [train_option(c, "--save-dir").rsplit("/", 1)[1] for c in cmds] == ["student_baseline", "student_seq_kd"]


@pytest.mark.parametrize("settings, expected", [
    ({"METHODS": "baseline word_kd seq_kd"},
     "METHODS: word_kd needs the teacher's distributions over the student's vocabulary, and TEACHER_CT2 "
     "(an external teacher) gives only its translations: use seq_kd (or seq_inter)"),
    ({"METHODS": "hybrid_kd"}, "METHODS: hybrid_kd needs the teacher's distributions"),
    ({"TEACHER_PATH": "teacher.pt"}, "TEACHER_CT2 and TEACHER_PATH are two teachers: set one"),
    ({"DRY_RUN": ""}, "no CTranslate2 model there (model.bin"),
])
def test_what_an_external_teacher_cannot_do_is_one_line_error(settings, expected, tmp_path):
    env = {"DRY_RUN": "1", "GPUS": "cpu", "WORK": str(tmp_path / "w"), "DATA_DIR": str(tmp_path), "SRC": "de",
           "TGT": "en", "TEACHER_CT2": str(tmp_path), **settings}
    proc = run_recipe("custom", env, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert expected in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "w" / "raw").exists()


@pytest.mark.slow
def test_custom_recipe_with_an_external_teacher_runs_to_its_report(tmp_path):
    """A tiny Marian teacher (OPUS-MT layout) distils a Bible slice: the baseline and seq_kd students
    train on their own vocabulary, the teacher is scored on the test split, the page has every row."""
    pytest.importorskip("transformers")
    import ct2_teachers

    teacher = ct2_teachers.marian(tmp_path)
    data = tmp_path / "corpus"
    data.mkdir()
    for split, n in (("train", 300), ("valid", 20), ("test", 15)):
        for lang in ("es", "en"):
            (data / f"{split}.{lang}").write_text("\n".join(ct2_teachers.bible_lines(split, lang, n)) + "\n")
    work = tmp_path / "work"
    settings = {**TINY, "DATA_DIR": str(data), "SRC": "es", "TGT": "en", "WORK": str(work), "TEACHER_CT2": str(teacher),
                "TRAIN_LINES": "0", "VALID_LINES": "0", "TEST_LINES": "0", "PRUNE_FROM": "", "CT2_QUANT": ""}
    run_recipe("custom", settings)
    distilled = (work / "distilled_text" / "train.en").read_text().splitlines()
    assert len(distilled) == 300
    assert json.loads((work / "distilled_text" / "train.report.json").read_text())["lines"] == 300
    results = json.loads((work / "results.json").read_text())
    assert [s["name"] for s in results["systems"]] == ["teacher", "baseline", "seq_kd"]
    assert results["bleu_signature"].startswith("nrefs:1|")
    page = (work / "results.md").read_text()
    assert "| teacher |" in page and "| seq_kd |" in page and "TEACHER_CT2: an external CTranslate2 teacher" in page
    # the students' vocabulary was trained on the source and the teacher's text
    assert (work / "pieces_distilled" / "spm.model").exists()
    assert (work / "distilled" / "dict.en.txt").read_text() == (work / "bin" / "dict.en.txt").read_text()
