"""CTranslate2: conversion (and the stock converter on our export), corpus --backend ctranslate2,
export --format ctranslate2 + translate, evaluate --backend ctranslate2."""
import filecmp
import json
import os
import shutil
import subprocess

import pytest
import sacrebleu

import helpers
from fairseq_kd import cli
from helpers import STUDENT_ARCH, fairseq_train, run, tool
from test_seq_kd_corpus import DECODE, binarize, corpus, kill_midway, read_lines, stock_nbest

# The memorized model's outputs run long: its max length is relative to the source.
GREEDY = ["--beam", "1", "--max-len-a", "1.2", "--max-len-b", "5"]
N_LINES = 48


def post(pieces):
    return pieces.replace(" ", "").replace("\u2581", " ").strip()


@pytest.fixture(scope="module", autouse=True)
def ct2_cache(tmp_path_factory):
    """Converted models go to a fresh cache (for this process and the commands it starts)."""
    old = os.environ.get("FAIRSEQ_KD_CACHE")
    os.environ["FAIRSEQ_KD_CACHE"] = str(tmp_path_factory.mktemp("ct2_cache"))
    yield os.environ["FAIRSEQ_KD_CACHE"]
    if old is None:
        del os.environ["FAIRSEQ_KD_CACHE"]
    else:
        os.environ["FAIRSEQ_KD_CACHE"] = old


@pytest.fixture(scope="module")
def memorized(tiny_data, tmp_path_factory):
    """(data, checkpoint): a tiny model trained on 48 training pairs until it translates them
    into long, varied sentences (~15 s on one core); the tiny teacher's outputs are all alike."""
    root = tmp_path_factory.mktemp("memorized")
    src = read_lines(tiny_data / "pieces" / "train.sp.es")[:N_LINES]
    tgt = read_lines(tiny_data / "pieces" / "train.sp.en")[:N_LINES]
    data = binarize(tiny_data, root / "data", "train", src, tgt)
    fairseq_train(data, root / "model", *STUDENT_ARCH, "--task", "translation", "--valid-subset", "train",
                  "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0",
                  "--max-update", "120", "--lr", "0.01", "--dropout", "0", "--max-tokens", "4000",
                  "--no-epoch-checkpoints", "--no-save-optimizer-state")
    return data, root / "model" / "checkpoint_last.pt"


def kd_error(proc, command):
    """The one ``fairseq-kd COMMAND: error:`` line a failed command printed (and nothing else)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"fairseq-kd {command}: error: ")
    return lines[0]


def identical_share(a, b):
    assert len(a) == len(b)
    return sum(x == y for x, y in zip(a, b)) / len(a)


def corpus_bleu(pieces, refs):
    return sacrebleu.corpus_bleu([post(p) for p in pieces], [[post(r) for r in refs]]).score


# ------------------------------------------------------------------ conversion
def test_greedy_output_equals_fairseq(memorized, tmp_path):
    """Converted float32, greedy: every line identical to stock fairseq-generate's on the
    memorized model (measured: 48/48); asserted >= 95% and corpus BLEU within 0.3."""
    data, model = memorized
    hyps, _ = stock_nbest(data, model, "train", 1, decode=GREEDY)
    stock = [hyps[i][0] for i in range(N_LINES)]
    assert len(set(stock)) > N_LINES // 2 and max(len(s.split()) for s in stock) > 30  # varied, long
    # fairseq's maximum length is per batch (a * the batch's longest source + b) and this model's
    # outputs often reach it: the same batches as the stock run (one of 64), not the CPU default
    corpus(data, model, tmp_path, *GREEDY, "--backend", "ctranslate2", "--formats", "pieces",
           "--batch-size", "64")
    ours = read_lines(tmp_path / "train.en")
    share = identical_share(ours, stock)
    print(f"identical lines: {share:.1%}")
    assert share >= 0.95
    refs = read_lines(data / "raw" / "train.en")
    assert abs(corpus_bleu(ours, refs) - corpus_bleu(stock, refs)) <= 0.3


def test_stock_converter_reads_the_plain_export(memorized, tmp_path):
    """ct2-fairseq-converter without the plugin converts `fairseq-kd export`'s file into the
    very model our conversion (with the plugin) makes of the training checkpoint."""
    from fairseq_kd.deploy.ct2 import cached_model

    data, model = memorized
    run([tool("fairseq-kd"), "export", "--path", model, "--out", tmp_path / "exported.pt"])
    env = dict(helpers.env(), PYTHONPATH="")  # the plugin is not importable at all
    proc = subprocess.run([tool("ct2-fairseq-converter"), "--model_path", str(tmp_path / "exported.pt"),
                           "--data_dir", str(data), "--output_dir", str(tmp_path / "stock")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = cached_model(str(model), str(data), "es", "en", "float32")
    for name in ("model.bin", "config.json", "shared_vocabulary.json"):
        assert filecmp.cmp(tmp_path / "stock" / name, os.path.join(ours, name), shallow=False), name


def test_conversion_is_cached_by_checksum_and_quantization(memorized, tmp_path):
    from fairseq_kd.deploy.ct2 import cached_model

    data, model = memorized
    copy = tmp_path / "model.pt"
    shutil.copyfile(model, copy)
    first = cached_model(str(copy), str(data), "es", "en", "float32", cache_dir=tmp_path / "cache")
    stamp = os.stat(os.path.join(first, "model.bin")).st_mtime_ns
    assert cached_model(str(copy), str(data), "es", "en", "float32", cache_dir=tmp_path / "cache") == first
    assert os.stat(os.path.join(first, "model.bin")).st_mtime_ns == stamp  # not converted again
    int8 = cached_model(str(copy), str(data), "es", "en", "int8", cache_dir=tmp_path / "cache")
    assert int8 != first and os.path.getsize(os.path.join(int8, "model.bin")) < os.path.getsize(
        os.path.join(first, "model.bin"))
    with open(copy, "ab") as f:  # other bytes under the same name: another model
        f.write(b"\0")
    assert cached_model(str(copy), str(data), "es", "en", "float32", cache_dir=tmp_path / "cache") != first


# ------------------------------------------------------------------ corpus
@pytest.fixture(scope="module")
def odd_lines_ct2(tiny_data, tiny_teacher, tmp_path_factory):
    """The 30-line split with an empty line (3) and a long one (7), translated with CTranslate2 at once."""
    src = read_lines(tiny_data / "pieces" / "valid.sp.es")[:30]
    tgt = read_lines(tiny_data / "pieces" / "valid.sp.en")[:30]
    src[3] = ""
    src[7] = " ".join([src[7]] * 10)  # > 200 tokens
    data = binarize(tiny_data, tmp_path_factory.mktemp("odd"), "train", src, tgt)
    out = tmp_path_factory.mktemp("unsharded")
    corpus(data, tiny_teacher, out, "--backend", "ctranslate2", "--chunk-size", "4", "--max-source-tokens", "200")
    return data, out


def test_corpus_keeps_every_line_in_order(odd_lines_ct2, tiny_teacher):
    data, out = odd_lines_ct2
    hyps, _ = stock_nbest(data, tiny_teacher, "train", 1)
    lines, src = read_lines(out / "train.en"), read_lines(out / "train.es")
    assert len(lines) == len(src) == 30
    assert lines[3] == "" and src[3] == ""
    assert lines[7] == read_lines(data / "raw" / "train.en")[7]  # long source: the gold target
    assert identical_share([lines[i] for i in range(30) if i not in (3, 7)],
                           [hyps[i][0] for i in range(30) if i not in (3, 7)]) >= 0.95
    report = json.loads((out / "train.report.json").read_text())
    assert report["empty_sources"] == [3] and report["long_sources"] == [7] and report["translated"] == 28


def test_corpus_shards_merge_to_one_run(odd_lines_ct2, tiny_teacher, tmp_path):
    data, ref = odd_lines_ct2
    args = ["--backend", "ctranslate2", "--chunk-size", "4", "--max-source-tokens", "200"]
    for shard in (1, 0):
        corpus(data, tiny_teacher, tmp_path, *args, "--num-shards", "2", "--shard-id", shard)
    proc = corpus(data, tiny_teacher, tmp_path, *args)
    assert "resuming: 8 of 8 chunks already done" in proc.stdout
    for name in ("train.en", "train.es", "train.es-en.en.bin", "train.es-en.en.idx"):
        assert filecmp.cmp(tmp_path / name, ref / name, shallow=False), name
    proc = corpus(data, tiny_teacher, tmp_path, *args[2:], check=False)  # same folder, other backend
    assert "holds a run with other settings (backend, quantization)" in proc.stderr


def test_corpus_resumes_after_a_killed_run(tiny_data, tiny_teacher, tmp_path):
    args = ["--backend", "ctranslate2", "--batch-size", "1", "--chunk-size", "20", "--formats", "pieces"]
    corpus(tiny_data / "bin", tiny_teacher, tmp_path / "ref", *args)
    cmd = [tool("fairseq-kd"), "corpus", tiny_data / "bin", "--path", tiny_teacher, "--out", tmp_path / "o",
           "-s", "es", "-t", "en", "--cpu", "--no-progress-bar", *DECODE, "--workers", "1", *args]
    done = kill_midway(cmd, tmp_path / "o" / "train.work")
    assert 2 <= len(done) < 30, "the run was not interrupted midway"
    out = run(cmd).stdout
    assert f"resuming: {len(done)} of 30 chunks already done" in out
    assert filecmp.cmp(tmp_path / "o" / "train.en", tmp_path / "ref" / "train.en", shallow=False)


def test_seq_inter_picks_the_best_sentence_bleu_of_the_nbest(memorized, tiny_data, tmp_path):
    """The N best come from CTranslate2 itself (asked here directly); the gold target of
    sentence i is its (i % N)-th best, so the choice must often leave the 1-best."""
    import ctranslate2

    from fairseq_kd.deploy.ct2 import cached_model

    data, model = memorized
    nbest = 4
    src = read_lines(data / "raw" / "train.es")
    translator = ctranslate2.Translator(cached_model(str(model), str(data), "es", "en", "float32"))
    longest = max(len(s.split()) for s in src) + 1
    results = translator.translate_batch([s.split() for s in src], beam_size=nbest, num_hypotheses=nbest,
                                         max_decoding_length=int(1.2 * longest + 5), max_input_length=0)
    hyps = [[" ".join(h) for h in r.hypotheses] for r in results]
    gold = [hyps[i][i % nbest] for i in range(len(src))]
    seq_data = binarize(tiny_data, tmp_path / "data", "train", src, gold)
    corpus(seq_data, model, tmp_path / "out", *GREEDY[2:], "--seq-inter", nbest, "--formats", "pieces",
           "--backend", "ctranslate2", "--batch-size", "64")
    chosen = read_lines(tmp_path / "out" / "train.en")
    expected = []
    for i in range(len(src)):
        scores = [sacrebleu.sentence_bleu(h, [gold[i]]).score for h in hyps[i]]
        expected.append(hyps[i][scores.index(max(scores))])
    assert chosen == expected
    assert sum(c != hyps[i][0] for i, c in enumerate(chosen)) >= len(src) // 2


def test_corpus_ct2_refuses_what_it_cannot_do(tiny_data, tiny_teacher, tmp_path):
    proc = corpus(tiny_data / "bin", f"{tiny_teacher}:{tiny_teacher}", tmp_path, "--backend", "ctranslate2",
                  check=False)
    assert "--backend ctranslate2 translates with one teacher, not an ensemble" in proc.stderr
    proc = corpus(tiny_data / "bin", tiny_teacher, tmp_path, "--backend", "ctranslate2", "--unkpen", "1",
                  check=False)
    assert "--unkpen is not supported by --backend ctranslate2" in proc.stderr


# ------------------------------------------------------------------ export, translate, evaluate
@pytest.fixture(scope="module")
def model_folder(memorized, tiny_data, tmp_path_factory):
    data, model = memorized
    out = tmp_path_factory.mktemp("export") / "model"
    run([tool("fairseq-kd"), "export", "--path", model, "--format", "ctranslate2", "--quantization", "float32",
         "--data", data, "--spm-model", tiny_data / "pieces" / "spm.model", "--out", out])
    return out


def test_export_translate_round_trip_on_raw_text(model_folder, memorized, tmp_path):
    """Raw text in, raw text out: equal to stock fairseq-generate's detokenized greedy output."""
    data, model = memorized
    info = json.loads((model_folder / "fairseq_kd.json").read_text())
    assert info["source_lang"] == "es" and info["target_lang"] == "en" and info["quantization"] == "float32"
    raw = read_lines(data / "raw" / "train.es")
    raw_text = [post(line) for line in raw]
    (tmp_path / "in.es").write_text("\n".join(raw_text[:10] + [""] + raw_text[10:]) + "\n", encoding="utf-8")
    run([tool("fairseq-kd"), "translate", "--model", model_folder, "--input", tmp_path / "in.es",
         "--output", tmp_path / "out.en", "--beam", "1", "--max-len-a", "1.2", "--max-len-b", "5",
         "--batch-size", "64", "--threads", "1"])
    out = read_lines(tmp_path / "out.en")
    assert len(out) == N_LINES + 1 and out[10] == ""  # every line, in order; empty -> empty
    hyps, _ = stock_nbest(data, model, "train", 1, decode=GREEDY)
    assert identical_share(out[:10] + out[11:], [post(hyps[i][0]) for i in range(N_LINES)]) >= 0.95
    # stdin -> stdout: the same (the whole input: a batch's maximum length depends on its longest line)
    piped = subprocess.run([tool("fairseq-kd"), "translate", "--model", str(model_folder), "--beam", "1",
                            "--max-len-a", "1.2", "--max-len-b", "5", "--batch-size", "64"],
                           input=(tmp_path / "in.es").read_text(encoding="utf-8"), capture_output=True,
                           text=True, env=helpers.env())
    assert piped.returncode == 0 and piped.stdout.splitlines() == out


def test_translate_bad_inputs_are_one_line_errors(model_folder, tmp_path):
    def translate(*args):
        return kd_error(run([tool("fairseq-kd"), "translate", *args], check=False), "translate")

    assert "model folder not found" in translate("--model", tmp_path / "nope", "--input", tmp_path / "x")

    broken = tmp_path / "broken"
    shutil.copytree(model_folder, broken)
    (broken / "sentencepiece.model").unlink()
    assert "lacks its SentencePiece model" in translate("--model", broken)
    (tmp_path / "bad.es").write_bytes(b"\xff\xfe\x00 not utf-8\n")
    assert "cannot read" in translate("--model", model_folder, "--input", tmp_path / "bad.es")
    assert "file not found" in translate("--model", model_folder, "--input", tmp_path / "no.es")
    proc = run([tool("fairseq-kd"), "export", "--path", model_folder / "model.bin", "--format", "ctranslate2",
                "--out", tmp_path / "m"], check=False)
    assert "needs --spm-model" in kd_error(proc, "export")


def test_a_shipped_export_converts_without_its_data_folder(memorized, tiny_data, tmp_path):
    """What examples/teacher and examples/students ship (an export with --half --portable: no
    data folder recorded, the dictionaries embedded) converts with no --data, into the model
    that the same file converts into with its data folder's dictionaries: the same vocabulary
    and the same translations."""
    data, model = memorized
    shipped = tmp_path / "shipped" / "student.pt"
    run([tool("fairseq-kd"), "export", "--path", model, "--half", "--portable", "--out", shipped])
    convert = ["export", "--path", shipped, "--format", "ctranslate2", "--spm-model", tiny_data / "pieces" / "spm.model"]
    # trained without --source-lang/--target-lang (fairseq read them from the data folder's file names)
    proc = run([tool("fairseq-kd"), *convert, "--out", tmp_path / "nope"], check=False)
    assert "does not name its languages: give -s and -t" in kd_error(proc, "export")
    out, with_data = tmp_path / "from_shipped", tmp_path / "with_data"
    proc = run([tool("fairseq-kd"), *convert, "-s", "es", "-t", "en", "--quantization", "float32", "--out", out])
    assert "(dictionaries embedded in the checkpoint)" in proc.stdout
    assert json.loads((out / "fairseq_kd.json").read_text())["made_from"]["dictionaries"] == "embedded in the checkpoint"
    run([tool("fairseq-kd"), *convert, "--data", data, "--quantization", "float32", "--out", with_data])
    vocabularies = sorted(p.name for p in with_data.glob("*vocabulary*"))
    assert vocabularies and vocabularies == sorted(p.name for p in out.glob("*vocabulary*"))
    for name in vocabularies:
        assert (out / name).read_text() == (with_data / name).read_text(), name
    raw = tmp_path / "in.es"
    raw.write_text("\n".join(post(line) for line in read_lines(data / "raw" / "train.es")) + "\n", encoding="utf-8")
    outputs = []
    for folder in (with_data, out):
        run([tool("fairseq-kd"), "translate", "--model", folder, "--input", raw, "--output", tmp_path / "out.en",
             "--beam", "1", "--max-len-a", "1.2", "--max-len-b", "5", "--threads", "1"])
        outputs.append(read_lines(tmp_path / "out.en"))
    assert len(outputs[0]) == N_LINES and outputs[0] == outputs[1]
    assert len(set(outputs[0])) >= N_LINES // 2  # varied sentences: a shuffled vocabulary would show
    # int8 without a data folder: nothing to check the quantization on, said in one line
    proc = run([tool("fairseq-kd"), *convert, "-s", "es", "-t", "en", "--quantization", "int8",
                "--out", tmp_path / "int8", "--strict"], check=False)
    assert "no data folder, the dictionaries are the checkpoint's own" in kd_error(proc, "export")
    assert not (tmp_path / "int8").exists()


def test_embedded_dictionaries_are_written_back_as_the_files_they_came_from(tiny_data, tmp_path):
    """An export's symbols (fairseq's specials, the pieces, a symbol repeated with
    #fairseq:overwrite) load back from the files written for the converter."""
    from fairseq.data import Dictionary

    from fairseq_kd.deploy.export import write_dictionary_files
    from fairseq_kd.errors import KDError

    dict_file = tiny_data / "bin" / "dict.en.txt"
    symbols = Dictionary.load(str(dict_file)).symbols
    repeated = symbols + [symbols[5]]
    write_dictionary_files({"src": symbols, "tgt": repeated}, str(tmp_path), "es", "en")
    assert Dictionary.load(str(tmp_path / "dict.es.txt")).symbols == symbols
    assert Dictionary.load(str(tmp_path / "dict.en.txt")).symbols == repeated
    # the pieces in the original file's order: the converter maps row i to symbol i
    pieces = [line.rsplit(" ", 1)[0] for line in dict_file.read_text(encoding="utf-8").splitlines()]
    assert [line.rsplit(" ", 1)[0] for line in (tmp_path / "dict.es.txt").read_text().splitlines()] == pieces
    with pytest.raises(KDError, match="does not start with fairseq's specials"):
        write_dictionary_files({"src": symbols[1:], "tgt": symbols}, str(tmp_path), "es", "en")


def test_evaluate_records_the_ct2_row(memorized, tmp_path):
    data, model = memorized
    ref = tmp_path / "ref.en"
    ref.write_text("".join(post(r) + "\n" for r in read_lines(data / "raw" / "train.en")), encoding="utf-8")
    assert cli.main(["evaluate", "--data", str(data), "--gen-subset", "train", "--checkpoint", str(model),
                     "--name", "m", "--ref", str(ref), "--results", str(tmp_path / "r.json"), "--cpu",
                     "--beam", "2", "--max-len-a", "1.2", "--max-len-b", "5",
                     "--backend", "ctranslate2", "--quantization", "int8"]) == 0
    system, = json.loads((tmp_path / "r.json").read_text())["systems"]
    assert system["name"] == "m (ct2 int8)" and system["quantization"] == "int8"
    refs = read_lines(ref)
    for label in ("greedy", "beam"):
        hyps = read_lines(tmp_path / f"r.m.ct2-int8.{label}.txt")
        assert len(hyps) == N_LINES
        assert system[label]["bleu"] == round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
        assert system[label]["sentences_per_s"] > 0


def test_raw_text_scoring_equals_the_binarized_path(memorized, model_folder, tmp_path):
    """evaluate --model-dir (raw text through the folder's own SentencePiece model, as translate)
    gives the binarized CTranslate2 path's hypotheses and BLEU for the same float32 model and settings:
    re-encoding the detokenized source gives the binarized pieces back, and no source is cut."""
    data, model = memorized
    ref, src = tmp_path / "ref.en", tmp_path / "src.es"
    ref.write_text("".join(post(r) + "\n" for r in read_lines(data / "raw" / "train.en")), encoding="utf-8")
    src.write_text("".join(post(r) + "\n" for r in read_lines(data / "raw" / "train.es")), encoding="utf-8")
    common = ["--name", "m", "--ref", str(ref), "--results", str(tmp_path / "r.json"), "--cpu", "--beam", "2",
              "--max-len-a", "1.2", "--max-len-b", "5", "--latency", "4"]
    assert cli.main(["evaluate", "--data", str(data), "--gen-subset", "train", "--checkpoint", str(model),
                     "--backend", "ctranslate2", "--quantization", "float32", *common]) == 0
    assert cli.main(["evaluate", "--model-dir", str(model_folder), "--src-text", str(src), *common]) == 0
    binarized, raw = json.loads((tmp_path / "r.json").read_text())["systems"]
    assert raw["name"] == "m (ct2 float32 raw text)" and raw["quantization"] == "float32"
    assert raw["truncated_sources"] == 0 and raw["params"] == binarized["params"]
    refs = read_lines(ref)
    for label in ("greedy", "beam"):
        hyps = read_lines(tmp_path / f"r.m.ct2-float32-raw-text.{label}.txt")
        assert hyps == read_lines(tmp_path / f"r.m.ct2-float32.{label}.txt")
        assert raw[label]["bleu"] == binarized[label]["bleu"] == round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
        for row in (raw, binarized):
            latency = row[label]["latency_ms"]
            assert latency["sentences"] == 4 and 0 < latency["median_ms"] <= latency["p90_ms"]
            assert latency["threads"] == 1  # --latency-threads' default, recorded


def test_latency_gets_its_own_threads_and_throughput_every_core(monkeypatch):
    """On CPU the throughput translator runs a batch per core (one thread each) and the latency
    translator one sentence on --latency-threads threads, whatever OMP_NUM_THREADS says."""
    from types import SimpleNamespace

    from fairseq_kd import evaluation
    from fairseq_kd.deploy import ct2

    made = []

    def load_translator(model_dir, device="cpu", device_index=0, threads=1, parallel=1):
        made.append((device, threads, parallel))
        return object()

    monkeypatch.setattr(ct2, "load_translator", load_translator)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    evaluation.ct2_translators("model", SimpleNamespace(cpu=True, latency=4, latency_threads=3))
    assert sorted(made) == [("cpu", 1, 2), ("cpu", 3, 1)]


def test_model_dir_inputs_are_one_line_errors(model_folder, tiny_data, tmp_path, capsys):
    ref = tmp_path / "ref.en"
    ref.write_text("a\nb\n")
    (tmp_path / "one.es").write_text("a\n")
    base = ["evaluate", "--name", "m", "--ref", str(ref), "--results", str(tmp_path / "r.json"), "--cpu"]
    for extra, message in [([], "--data and --checkpoint are required (or --model-dir and --src-text)"),
                           (["--model-dir", str(model_folder)], "--model-dir needs --src-text"),
                           (["--model-dir", str(model_folder), "--src-text", str(tmp_path / "one.es")],
                            "--src-text has 1 lines, --ref 2")]:
        assert cli.main(base + extra) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines


def long_input(model_folder, memorized, tmp_path):
    """(input file, the model's maximum in pieces): three raw lines, the second longer than the maximum."""
    import sentencepiece
    import torch

    data, model = memorized
    cfg = torch.load(model, map_location="cpu", weights_only=False)["cfg"]["model"]
    maximum = cfg.max_source_positions - 1  # room for </s>
    spm = sentencepiece.SentencePieceProcessor(model_file=str(model_folder / "sentencepiece.model"))
    raw = [post(line) for line in read_lines(data / "raw" / "train.es")]
    long = raw[0]
    while len(spm.encode(long, out_type=str)) <= maximum:
        long += " " + raw[0]
    path = tmp_path / "in.es"
    path.write_text(f"{raw[1]}\n{long}\n{raw[2]}\n", encoding="utf-8")
    return path, maximum


def test_translate_reports_truncated_inputs(model_folder, memorized, tmp_path):
    path, maximum = long_input(model_folder, memorized, tmp_path)
    short = ["--beam", "1", "--max-len-a", "0", "--max-len-b", "5", "--threads", "1"]
    proc = run([tool("fairseq-kd"), "translate", "--model", model_folder, "--input", path,
                "--output", tmp_path / "out.en", "--no-progress-bar", *short])
    assert proc.stderr.strip().splitlines()[-1] == (
        f"1 of 3 inputs were longer than the model's maximum of {maximum} pieces and were truncated")
    assert len(read_lines(tmp_path / "out.en")) == 3
    line = kd_error(run([tool("fairseq-kd"), "translate", "--model", model_folder, "--input", path, "--output",
                         tmp_path / "refused.en", "--refuse-long", *short], check=False), "translate")
    assert f"1 of 3 inputs are longer than the model's maximum of {maximum} pieces (the first is line 2" in line
    assert not (tmp_path / "refused.en").exists()


def test_latency_times_each_sentence_alone_after_warmup():
    import numpy

    from fairseq_kd.deploy.ct2 import latency_ms, latency_summary

    class Recorder:
        def __init__(self):
            self.calls = []

        def translate_batch(self, batch, **options):
            self.calls.append((batch, options["max_decoding_length"], options["beam_size"]))

    recorder = Recorder()
    sources = [["a"] * n for n in (3, 1, 4, 2, 5)]
    times = latency_ms(recorder, sources, warmup=2, beam=3, max_len_a=2.0, max_len_b=1)
    assert len(times) == 5 and all(t >= 0 for t in times)
    # two untimed, then each alone, its own maximum length (2 x (tokens + </s>) + 1)
    assert recorder.calls == [([s], 2 * (len(s) + 1) + 1, 3) for s in sources[:2] + sources]
    sample = [5.0, 1.0, 3.0, 9.0, 2.0, 7.0, 4.0]
    summary = latency_summary(sample)
    assert summary == {"sentences": 7, "median_ms": round(float(numpy.median(sample)), 2),
                       "p90_ms": round(float(numpy.percentile(sample, 90)), 2)}


# ------------------------------------------------------------------ export's quantization check
# The memorized model's split is "train"; its outputs run long (GREEDY's note), hence the max length.
CHECK_LINES = 40
CHECK_DECODING = ["--check-beam", "2", "--check-max-len-a", "1.2", "--check-max-len-b", "5"]


def export_args(memorized, tiny_data, out, quantization, *options):
    data, model = memorized
    return ["export", "--path", model, "--format", "ctranslate2", "--quantization", quantization, "--data", data,
            "--spm-model", tiny_data / "pieces" / "spm.model", "--out", out, *options]


def export_ct2(memorized, tiny_data, out, quantization, *options, check=True):
    """`fairseq-kd export --format ctranslate2` of the memorized model in a process of its own."""
    return run([tool("fairseq-kd"), *export_args(memorized, tiny_data, out, quantization, *options)], check=check)


def export_here(capsys, memorized, tiny_data, out, quantization, *options):
    """(exit status, stdout, stderr lines) of the same export run in this process (no start-up cost)."""
    status = cli.main(export_args(memorized, tiny_data, out, quantization, *options))
    captured = capsys.readouterr()
    return status, captured.out, captured.err.strip().splitlines()


@pytest.fixture(scope="module")
def checked_int8(memorized, tiny_data, tmp_path_factory):
    """(folder, export's output): an int8 export checked on the first 40 training lines with a
    margin it cannot meet (-100 BLEU), without --strict: kept, with a warning."""
    out = tmp_path_factory.mktemp("checked") / "int8"
    proc = export_ct2(memorized, tiny_data, out, "int8", "--check-split", "train", "--check-lines", CHECK_LINES,
                      *CHECK_DECODING, "--check-margin", "-100")
    return out, proc


def test_quantization_check_scores_what_both_folders_translate(checked_int8, model_folder, memorized, tmp_path):
    """The recorded BLEU of float32 and int8 are sacreBLEU's of what `fairseq-kd translate` makes
    of the slice's raw text with the float32 folder and the int8 folder, with the stated settings."""
    folder, proc = checked_int8
    data, _ = memorized
    check = json.loads((folder / "fairseq_kd.json").read_text())["quantization_check"]
    assert {k: check[k] for k in ("split", "lines", "beam", "lenpen", "max_len_a", "max_len_b", "margin")} == {
        "split": "train", "lines": CHECK_LINES, "beam": 2, "lenpen": 1.0, "max_len_a": 1.2, "max_len_b": 5,
        "margin": -100.0}
    sources = [post(line) for line in read_lines(data / "raw" / "train.es")[:CHECK_LINES]]
    refs = [post(line) for line in read_lines(data / "raw" / "train.en")[:CHECK_LINES]]
    (tmp_path / "in.es").write_text("".join(s + "\n" for s in sources), encoding="utf-8")
    metric, bleu = sacrebleu.BLEU(), {}
    for name, model in (("float32", model_folder), ("int8", folder)):
        run([tool("fairseq-kd"), "translate", "--model", model, "--input", tmp_path / "in.es", "--output",
             tmp_path / f"{name}.en", "--beam", "2", "--lenpen", "1.0", "--max-len-a", "1.2", "--max-len-b", "5"])
        bleu[name] = metric.corpus_score(read_lines(tmp_path / f"{name}.en"), [refs])
    assert check["bleu_float32"] == round(bleu["float32"].score, 2)
    assert check["bleu_quantized"] == round(bleu["int8"].score, 2)
    assert check["bleu_delta"] == round(check["bleu_quantized"] - check["bleu_float32"], 2)
    assert check["bleu_signature"] == str(metric.get_signature())
    assert check["compute_types"]["float32"] == "float32" and "int8" in check["compute_types"]["int8"]
    # an unmeetable margin without --strict: a warning, the folder kept, the verdict recorded
    assert check["verdict"] == "fail" and "more than --check-margin -100.0" in check["reasons"][0]
    assert "fails the quantization check" in proc.stderr and "(--strict refuses it)" in proc.stderr
    summary, = [line for line in proc.stdout.splitlines() if line.startswith("quantization check")]
    assert ("(train, first 40 lines, beam 2, lenpen 1.0, max length 1.2 x source + 5, on cpu)" in summary
            and f"BLEU float32 {check['bleu_float32']}, int8 {check['bleu_quantized']}" in summary)


def test_strict_refuses_and_writes_nothing(memorized, tiny_data, model_folder, tmp_path, capsys):
    """--strict with a margin no model meets: a one-line error, exit status 2, no folder at --out
    and nothing half-made beside it; an earlier export at --out stays as it was."""
    strict = ["--check-split", "train", "--check-lines", "8", *CHECK_DECODING, "--check-margin", "-100",
              "--strict"]
    proc = export_ct2(memorized, tiny_data, tmp_path / "out" / "int8", "int8", *strict, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [proc.stderr.strip().splitlines()[-1]], proc.stderr[-3000:]
    assert errors[0].startswith("fairseq-kd export: error: --strict: the int8 model loses ")
    assert "nothing written to" in errors[0]
    assert os.listdir(tmp_path / "out") == []
    earlier = tmp_path / "earlier"
    shutil.copytree(model_folder, earlier)
    status, _, _ = export_here(capsys, memorized, tiny_data, earlier, "int8", *strict)
    assert status == 2
    assert json.loads((earlier / "fairseq_kd.json").read_text())["quantization"] == "float32"
    assert sorted(os.listdir(tmp_path)) == ["earlier", "out"]


def test_float32_and_no_split_skip_the_check_and_say_so(memorized, tiny_data, model_folder, tmp_path, capsys):
    skipped = json.loads((model_folder / "fairseq_kd.json").read_text())["quantization_check"]
    assert skipped["verdict"] == "skipped" and "float32 is the reference" in skipped["reason"]
    status, out, _ = export_here(capsys, memorized, tiny_data, tmp_path / "f32", "float32", "--strict")
    assert status == 0 and "quantization check skipped: float32 is the reference" in out  # nothing to refuse
    # the memorized data has no valid split: skipped with a note, unless one is asked for
    status, out, _ = export_here(capsys, memorized, tiny_data, tmp_path / "int8", "int8")
    assert status == 0 and "quantization check skipped:" in out and "no binarized 'valid' split" in out
    for options, message in [(["--check-split", "valid"], "--check-split: no binarized 'valid' split"),
                             (["--strict"], "--strict needs the check"),
                             (["--no-check", "--strict"], "not with --no-check")]:
        status, _, err = export_here(capsys, memorized, tiny_data, tmp_path / "refused", "int8", *options)
        assert status == 2 and len(err) == 1 and err[0].startswith("fairseq-kd export: error: ") and message in err[0]
    assert not (tmp_path / "refused").exists()


def test_degenerate_outputs_are_empty_or_looping():
    from fairseq_kd.deploy.quantization_check import is_degenerate, output_shares

    assert is_degenerate("") and is_degenerate("the the the the")
    assert is_degenerate("and he said of the land of the land of the land of the land")
    assert not is_degenerate("the the the") and not is_degenerate("And God said, Let there be light")
    assert not is_degenerate("of the land of the land of the land")  # three times is still language
    shares = output_shares(["", "a b a b a b a b", "a fine line", ""], [["x"], ["y"], ["z"], []])
    assert shares == {"empty": round(1 / 3, 4), "degenerate": round(2 / 3, 4)}  # the empty source is left out


def test_gibberish_fails_the_check_even_within_the_bleu_margin():
    """Far more looping outputs than float32 fail the check on their own (here with a margin that
    any BLEU loss meets); a model that merely differs a little passes."""
    from fairseq_kd.deploy.quantization_check import CheckSettings, score

    settings = CheckSettings(split="valid", lines=20, beam=5, lenpen=1.0, max_len_a=1.5, max_len_b=10,
                             margin=100.0, device="cpu", strict=False)
    refs = [f"in the beginning God created verse {i}" for i in range(20)]
    sources = [ref.split() for ref in refs]
    looping = refs[:16] + ["and and and and"] * 4
    entry = score({"float32": refs, "int8": looping}, sources, refs, "int8", settings, {})
    assert entry["verdict"] == "fail" and entry["outputs"]["int8"]["degenerate"] == 0.2
    assert entry["reasons"] == ["20.0% of its outputs are empty or repetitive against 0.0% in float32"]
    slightly_off = refs[:19] + ["in the beginning God made verse 19"]
    entry = score({"float32": refs, "int8": slightly_off}, sources, refs, "int8", settings, {})
    assert entry["verdict"] == "pass" and entry["reasons"] == [] and entry["identical_lines"] == 0.95
