"""fairseq-kd corpus --teacher-ct2: any CTranslate2 model folder as a Seq-KD teacher on raw text (#22).

Tiny random teachers in each converter's layout (tests/ct2_teachers.py) check
layout detection, alignment, determinism, resume, shards, the counts of the
report and the one-line errors; the slow test checks the shipped teacher,
converted by the stock ct2-fairseq-converter and used as an external
teacher, against today's built-in path line for line.
"""
import contextlib
import hashlib
import io
import json
import os
import shutil

import pytest

import ct2_teachers
import helpers
from fairseq_kd import cli
from fairseq_kd.corpus import external
from fairseq_kd.errors import KDError

pytest.importorskip("transformers")
pytest.importorskip("ctranslate2")

DECODE = ["--beam", "2", "--max-len-a", "0", "--max-len-b", "12", "--cpu", "--no-progress-bar", "--threads", "1"]


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    """{"marian", "m2m100", "fairseq"}: tiny converted teachers in each layout."""
    root = tmp_path_factory.mktemp("ct2_teachers")
    marian = ct2_teachers.marian(root)
    return {"marian": marian, "m2m100": ct2_teachers.m2m100(root),
            "fairseq": ct2_teachers.fairseq_like(root, marian)}


@pytest.fixture
def raw(tmp_path):
    """A raw corpus: 30 training verses (line 3 empty), 5 valid and test pairs."""
    d = tmp_path / "raw"
    d.mkdir()
    for split, n in (("train", 30), ("valid", 5), ("test", 5)):
        for lang in ("es", "en"):
            lines = list(ct2_teachers.bible_lines(split, lang, n))
            if split == "train" and lang == "es":
                lines[3] = ""
            (d / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def corpus(raw_dir, teacher, out, *extra):
    """Run ``fairseq-kd corpus RAW --teacher-ct2``: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = cli.main(["corpus", raw_dir, "--teacher-ct2", teacher, "--out", out, "-s", "es", "-t", "en",
                           *DECODE, *map(str, extra)])
    return status, err.getvalue()


def lines(path):
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


def error_line(status, stderr):
    errors = [line for line in stderr.splitlines() if line.startswith("fairseq-kd corpus: error:")]
    assert status == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


# ---------------------------------------------------------------- layouts
def test_each_converters_layout_is_detected(teachers):
    marian = external.TeacherLayout(str(teachers["marian"]))
    assert [os.path.basename(f) for f in (marian.source_spm, marian.target_spm)] == ["source.spm", "target.spm"]
    assert marian.source_tokens(["▁a"]) == ["▁a", "</s>"]  # the transformers converter leaves </s> to us
    assert marian.language_codes() == []
    m2m = external.TeacherLayout(str(teachers["m2m100"]), "__es__", "__en__")
    assert os.path.basename(m2m.source_spm) == "sentencepiece.bpe.model" == os.path.basename(m2m.target_spm)
    assert m2m.source_tokens(["▁a"]) == ["__es__", "▁a", "</s>"]
    assert m2m.strip_target(["__en__", "▁b"]) == ["▁b"]
    assert "__en__" in m2m.language_codes() and "multilingual" in m2m.kind
    fairseq = external.TeacherLayout(str(teachers["fairseq"]))
    assert os.path.basename(fairseq.source_spm) == "spm.model"


def with_vocabulary(teacher, tmp_path, change):
    """A copy of ``teacher`` whose vocabulary is ``change(tokens)``."""
    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    tokens = json.loads((copy / "shared_vocabulary.json").read_text(encoding="utf-8"))
    (copy / "shared_vocabulary.json").write_text(json.dumps(change(tokens)), encoding="utf-8")
    return str(copy)


def test_nllb_codes_and_multilingual_opus_mt_tokens_are_recognised(teachers, tmp_path):
    def nllb_code(token):  # __es__ -> spa_Latn, __en__ -> eng_Latn, __ast__ -> ast_Latn, ...
        code = token[2:-2]
        return {"es": "spa", "en": "eng"}.get(code, (code + "xx")[:3]) + "_Latn"

    nllb = with_vocabulary(teachers["m2m100"], tmp_path / "nllb", lambda tokens: [
        nllb_code(t) if t.startswith("__") and t.endswith("__") and len(t) > 4 else t for t in tokens])
    with pytest.raises(KDError, match="is multilingual .* name both languages"):
        external.TeacherLayout(nllb)
    layout = external.TeacherLayout(nllb, "spa_Latn", "eng_Latn")
    assert layout.source_tokens(["▁a"]) == ["spa_Latn", "▁a", "</s>"] and layout.target_prefix == ["eng_Latn"]
    # OPUS-MT's one-to-many models: the target language is a >>xxx<< token at the start of the source
    opus = with_vocabulary(teachers["marian"], tmp_path / "opus", lambda tokens: tokens[:-2] + [">>fra<<", ">>deu<<"])
    with pytest.raises(KDError, match="name the target language with --source-prefix, e.g. >>deu<<"):
        external.TeacherLayout(opus)
    assert external.TeacherLayout(opus, ">>fra<<").source_tokens(["▁a"]) == [">>fra<<", "▁a", "</s>"]


def test_parameters_and_positions_are_read_from_model_bin(teachers):
    # d_model 16, 1+1 layers; embeddings shared (stored once) and no position table counted
    assert 5_000 < external.parameter_count(str(teachers["marian"])) < 30_000
    assert external.max_source_positions(str(teachers["marian"])) == ct2_teachers.TINY["max_position_embeddings"]


# ---------------------------------------------------------------- the corpus
def test_distilled_text_is_aligned_counted_and_deterministic(teachers, raw, tmp_path):
    status, err = corpus(raw, teachers["marian"], tmp_path / "a", "--chunk-size", "7")
    assert status == 0, err
    out = tmp_path / "a"
    hyps = lines(out / "train.en")
    assert len(hyps) == 30 and hyps[3] == "" and all(h for i, h in enumerate(hyps) if i != 3)
    # OUT is a complete raw corpus: the source side and the gold valid/test beside the distilled train
    for name in ("train.es", "valid.es", "valid.en", "test.es", "test.en"):
        assert lines(out / name) == lines(raw / name), name
    report = json.loads((out / "train.report.json").read_text())
    assert (report["lines"], report["translated"], report["empty_sources"]) == (30, 29, [3])
    assert report["empty_translations"] == [] and report["layout"].startswith("source.spm/target.spm")
    # the same command in another folder, with other chunks: the same lines
    status, err = corpus(raw, teachers["marian"], tmp_path / "b", "--chunk-size", "4")
    assert status == 0, err
    assert lines(tmp_path / "b" / "train.en") == hyps


def test_a_killed_run_resumes_and_shards_merge_to_the_same_text(teachers, raw, tmp_path):
    out = tmp_path / "out"
    assert corpus(raw, teachers["marian"], out, "--chunk-size", "8")[0] == 0
    whole = lines(out / "train.en")
    # a run killed before its merge: two chunks saved, two missing, no distilled text yet
    work = out / "train.work"
    for name in ("chunk-000001.json", "chunk-000003.json"):
        os.remove(work / name)
    os.remove(out / "train.en")
    status, err = corpus(raw, teachers["marian"], out, "--chunk-size", "8")
    assert status == 0, err
    assert lines(out / "train.en") == whole
    # one job per shard, then the merge
    sharded = tmp_path / "sharded"
    for shard in ("0", "1"):
        assert corpus(raw, teachers["marian"], sharded, "--chunk-size", "8", "--num-shards", "2",
                      "--shard-id", shard)[0] == 0
    assert not (sharded / "train.en").exists()
    assert corpus(raw, teachers["marian"], sharded, "--chunk-size", "8", "--num-shards", "2")[0] == 0
    assert lines(sharded / "train.en") == whole
    # other settings in the same folder are refused, not mixed in
    for name in ("chunk-000000.json",):
        os.remove(work / name)
    status, err = corpus(raw, teachers["marian"], out, "--chunk-size", "8", "--beam", "3")
    assert "holds a run with other settings (beam)" in error_line(status, err)


def test_an_external_teacher_is_known_by_its_checksums_not_its_file_times(teachers, raw, tmp_path):
    """A copied or re-downloaded teacher folder has other file times: the run still resumes.
    Other bytes are another teacher; an earlier version's fingerprint (name, size, time) is
    trusted while it still matches the files, and replaced by the checksums."""
    teacher, out = tmp_path / "teacher", tmp_path / "out"
    shutil.copytree(teachers["marian"], teacher)
    assert corpus(raw, teacher, out, "--chunk-size", "8")[0] == 0
    settings_file = out / "train.work" / "settings.json"
    settings = json.loads(settings_file.read_text())
    model = teacher / "model.bin"
    assert f"model.bin:{model.stat().st_size}:sha256:{hashlib.sha256(model.read_bytes()).hexdigest()}" in settings["teacher_fingerprint"]

    def resumes():
        os.remove(out / "train.work" / "chunk-000001.json")
        status, err = corpus(raw, teacher, out, "--chunk-size", "8")
        return status == 0 and "other settings" not in err

    for path in teacher.iterdir():
        os.utime(path, (1e9, 1e9))
    assert resumes()
    legacy = external.legacy_teacher_fingerprint(teacher)
    settings_file.write_text(json.dumps({**settings, "teacher_fingerprint": legacy}))
    assert resumes() and json.loads(settings_file.read_text()) == settings
    settings_file.write_text(json.dumps({**settings, "teacher_fingerprint": legacy}))
    os.utime(model, (2e9, 2e9))  # touched since: nothing says it is the same teacher
    assert "other settings (teacher_fingerprint)" in error_line(*corpus(raw, teacher, out, "--chunk-size", "8"))
    settings_file.write_text(json.dumps(settings))
    with open(teacher / "config.json", "a") as f:
        f.write(" ")
    assert "other settings (teacher_fingerprint)" in error_line(*corpus(raw, teacher, out, "--chunk-size", "8"))


def test_multilingual_teacher_gets_its_language_codes_and_drops_the_target_code(teachers, raw, tmp_path):
    status, err = corpus(raw, teachers["m2m100"], tmp_path / "out", "--source-prefix", "__es__",
                         "--target-prefix", "__en__")
    assert status == 0, err
    hyps = lines(tmp_path / "out" / "train.en")
    assert len(hyps) == 30 and not any("__en__" in h for h in hyps)
    # the target code changes the translation: it is the decoder's first token
    status, err = corpus(raw, teachers["m2m100"], tmp_path / "fr", "--source-prefix", "__es__",
                         "--target-prefix", "__fr__")
    assert status == 0, err
    assert lines(tmp_path / "fr" / "train.en") != hyps


def test_seq_inter_keeps_the_n_best_hypothesis_closest_to_the_reference(teachers, raw, tmp_path):
    import sacrebleu

    status, err = corpus(raw, teachers["marian"], tmp_path / "inter", "--seq-inter", "4")
    assert status == 0, err
    chosen = lines(tmp_path / "inter" / "train.en")
    refs = lines(raw / "train.en")
    args = argparse_namespace(raw, seq_inter=4, teacher_ct2=str(teachers["marian"]))
    data = external.RawSplit(args, external.TeacherTokenizer(external.TeacherLayout(args.teacher_ct2)))
    translator = external.ExternalTranslator(args, data, data.tokenizer, "cpu")
    nbest, = translator.translate_batches([[0]])
    best = max(sacrebleu.sentence_bleu(h, [refs[0].strip()]).score for h, _ in nbest[0])
    assert sacrebleu.sentence_bleu(chosen[0], [refs[0].strip()]).score == best


def argparse_namespace(raw_dir, **kw):
    """``fairseq-kd corpus RAW --teacher-ct2 ...`` arguments with the command line's own defaults."""
    from fairseq_kd import cli
    from fairseq_kd.corpus import select

    args = cli.build_parser(["corpus"]).parse_args(["corpus", str(raw_dir), "--out", "OUT", "-s", "es", "-t", "en",
                                                   "--beam", "2", "--max-len-b", "12", "--threads", "1"])
    vars(args).update(kw)
    select.resolve(args)
    return args


# ---------------------------------------------------------------- one-line errors, nothing written
def broken_copy(teacher, tmp_path, remove):
    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    for name in remove:
        os.remove(copy / name)
    return copy


@pytest.mark.parametrize("case, expected", [
    ("no model", "holds no CTranslate2 model (model.bin)"),
    ("no vocabulary", "no source vocabulary (shared_vocabulary.json or source_vocabulary.json)"),
    ("no tokenizer", "no SentencePiece model: expected source.spm and target.spm"),
    ("multilingual without languages", "is multilingual (100 language codes: __af__, __am__, __ar__, __ast__, ...): "
                                       "name both languages"),
    ("unknown code", "--target-prefix __xx__: not in the vocabulary of"),
    ("misaligned", "has 30 lines but"),
    ("misaligned valid", "valid.es has 5 lines but"),
    ("out is the data", "--out must differ from the raw text folder"),
    ("formats", "--teacher-ct2 writes the text format only"),
    ("path too", "--path is not an option of --teacher-ct2"),
    ("fp16", "--fp16 is not an option of --teacher-ct2"),
])
def test_bad_input_is_one_line_error_before_anything_is_written(case, expected, teachers, raw, tmp_path):
    teacher, out, extra = teachers["marian"], tmp_path / "out", []
    if case == "no model":
        teacher = broken_copy(teacher, tmp_path, ["model.bin"])
    elif case == "no vocabulary":
        teacher = broken_copy(teacher, tmp_path, ["shared_vocabulary.json"])
    elif case == "no tokenizer":
        teacher = broken_copy(teacher, tmp_path, ["source.spm"])
    elif case == "multilingual without languages":
        teacher = teachers["m2m100"]
    elif case == "unknown code":
        teacher, extra = teachers["m2m100"], ["--source-prefix", "__es__", "--target-prefix", "__xx__"]
    elif case == "misaligned":
        (raw / "train.en").write_text("one line\n", encoding="utf-8")
    elif case == "misaligned valid":
        (raw / "valid.en").write_text("one line\n", encoding="utf-8")
    elif case == "out is the data":
        out = raw
    elif case == "formats":
        extra = ["--formats", "bin"]
    elif case == "path too":
        extra = ["--path", "teacher.pt"]
    elif case == "fp16":
        extra = ["--fp16"]
    before = sorted(os.listdir(raw))
    status, err = corpus(raw, teacher, out, *extra)
    assert expected in error_line(status, err)
    assert not out.exists() or out == raw
    assert sorted(os.listdir(raw)) == before


def test_corpus_needs_a_teacher():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = cli.main(["corpus", "DATA", "--out", "OUT", "-s", "es", "-t", "en"])
    assert "--path (the teacher checkpoint) or --teacher-ct2" in error_line(status, err.getvalue())


def test_language_codes_for_a_one_pair_model_are_refused(teachers):
    with pytest.raises(KDError, match=r"not in the vocabulary of .* \(it has no language codes"):
        external.TeacherLayout(str(teachers["marian"]), "__es__", "__en__")


# ---------------------------------------------------------------- the shipped teacher, converted by the stock tool
@pytest.mark.slow
def test_shipped_teacher_as_external_teacher_gives_the_built_in_paths_text_and_bleu(tmp_path):
    """The shipped teacher through ct2-fairseq-converter and raw text = today's built-in path on its
    binarized data (--backend ctranslate2 --post-process sentencepiece), line for line, on 200 test verses."""
    import sacrebleu

    teacher = helpers.REPO / "examples" / "teacher"
    raw = tmp_path / "raw"
    raw.mkdir()
    for lang in ("es", "en"):
        (raw / f"test.{lang}").write_text("\n".join(ct2_teachers.bible_lines("test", lang, 200)) + "\n",
                                          encoding="utf-8")
        shutil.copyfile(teacher / "dict.txt", tmp_path / f"dict.{lang}.txt")
    ct2 = tmp_path / "ct2"
    helpers.run([helpers.tool("ct2-fairseq-converter"), "--model_path", teacher / "teacher.pt", "--data_dir", tmp_path,
                 "--source_lang", "es", "--target_lang", "en", "--output_dir", ct2, "--quantization", "float32"])
    shutil.copyfile(teacher / "spm.model", ct2 / "spm.model")  # the converter copies no tokenizer
    helpers.run([helpers.tool("fairseq-kd"), "spm", "--input-dir", raw, "--src", "es", "--tgt", "en",
                 "--splits", "test", "--model", teacher / "spm.model", "--out", tmp_path / "pieces"])
    helpers.run([helpers.tool("fairseq-preprocess"), "-s", "es", "-t", "en", "--testpref",
                 tmp_path / "pieces" / "test.sp", "--destdir", tmp_path / "bin", "--srcdict", teacher / "dict.txt",
                 "--joined-dictionary", "--workers", "1"])
    decode = ["--split", "test", "-s", "es", "-t", "en", "--cpu", "--no-progress-bar", "--beam", "5",
              "--max-len-a", "1.5", "--max-len-b", "10"]
    helpers.run([helpers.tool("fairseq-kd"), "corpus", tmp_path / "bin", "--path", teacher / "teacher.pt",
                 "--out", tmp_path / "builtin", "--formats", "text", "--post-process", "sentencepiece",
                 "--backend", "ctranslate2", *decode])
    helpers.run([helpers.tool("fairseq-kd"), "corpus", raw, "--teacher-ct2", ct2, "--out", tmp_path / "external",
                 *decode])
    builtin, ext = lines(tmp_path / "builtin" / "test.text.en"), lines(tmp_path / "external" / "test.en")
    assert ext == builtin
    refs = lines(raw / "test.en")
    assert sacrebleu.corpus_bleu(ext, [refs]).score == sacrebleu.corpus_bleu(builtin, [refs]).score > 25


# ---------------------------------------------------------------- fairseq-kd evaluate --teacher-ct2
def test_evaluate_scores_an_external_teacher_as_the_corpus_translates(teachers, raw, tmp_path):
    results = tmp_path / "results.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["evaluate", "--teacher-ct2", teachers["m2m100"], "--source-prefix", "__es__",
                         "--target-prefix", "__en__", "--src-text", raw / "test.es", "--ref", raw / "test.en",
                         "--name", "teacher", "--results", results, "--beam", "2", "--max-len-a", "0",
                         "--max-len-b", "12", "--cpu"]) == 0
    saved = json.loads(results.read_text())
    row, = saved["systems"]
    assert row["name"] == "teacher" and row["params"] == external.parameter_count(str(teachers["m2m100"]))
    assert saved["bleu_signature"].startswith("nrefs:1|")
    status, err = corpus(raw, teachers["m2m100"], tmp_path / "out", "--split", "test", "--source-prefix",
                         "__es__", "--target-prefix", "__en__")
    assert status == 0, err
    assert lines(tmp_path / "results.teacher.beam.txt") == lines(tmp_path / "out" / "test.en")


def test_evaluate_refuses_an_external_teacher_without_its_language_codes(teachers, raw, tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = cli.main(["evaluate", "--teacher-ct2", teachers["m2m100"], "--src-text", raw / "test.es",
                           "--ref", raw / "test.en", "--name", "teacher", "--results", tmp_path / "r.json"])
    assert status == 2 and "is multilingual" in err.getvalue() and not (tmp_path / "r.json").exists()
