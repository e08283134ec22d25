"""fairseq-kd corpus against stock fairseq-generate and fairseq-preprocess; sharding, resume, Seq-Inter."""
import contextlib
import filecmp
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import sacrebleu

import helpers
from fairseq_kd import cli
from fairseq_kd.checksum import file_sha256
from helpers import run, tool

# Short outputs keep the tiny (degenerate) teacher's beam search fast; the same
# settings are given to fairseq-generate.
DECODE = ["--beam", "4", "--max-len-a", "0", "--max-len-b", "12"]


def stock_nbest(data_bin, teacher, split, nbest, post_process=None, decode=DECODE):
    """{id: [hypothesis strings, best first]} and {id: target} from stock fairseq-generate."""
    cmd = [tool("fairseq-generate"), data_bin, "--user-dir", helpers.USER_DIR, "--path", teacher,
           "--gen-subset", split, "--cpu", *decode, "--nbest", nbest, "--batch-size", "64",
           # without this fairseq-generate drops the last partial batch (measured: 56 of 60 lines)
           "--required-batch-size-multiple", "1"]
    if post_process:
        cmd += ["--post-process", post_process]
    out = run(cmd).stdout
    hyps, refs = {}, {}
    for line in out.splitlines():
        if line.startswith("H-"):
            i, _, text = line[2:].split("\t")
            hyps.setdefault(int(i), []).append(text)
        elif line.startswith("T-"):
            i, text = line[2:].split("\t")
            refs[int(i)] = text
    return hyps, refs


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def corpus(data_bin, teacher, out, *args, check=True):
    """``fairseq-kd corpus`` in this process (the same entry point, without a second start-up).

    One worker unless ``args`` says otherwise: on CPU the default is one per core,
    each a new process to start.  The fairseq backend unless ``args`` name
    another: these tests hold it to fairseq-generate's output line for line
    (on CPU the default, auto, would choose CTranslate2).
    """
    workers = [] if "--workers" in args else ["--workers", "1"]
    backend = [] if "--backend" in args else ["--backend", "fairseq"]
    argv = ["corpus", str(data_bin), "--path", str(teacher), "--out", str(out), "-s", "es", "-t", "en",
            "--cpu", "--no-progress-bar", *DECODE, *workers, *backend, *map(str, args)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(argv)
    result = Result(code, stdout.getvalue(), stderr.getvalue())
    if check:
        assert code == 0, result.stderr[-3000:]
    return result


def read_lines(path):
    return Path(path).read_text(encoding="utf-8").split("\n")[:-1]


def binarize(tiny_data, dest, split, src_lines, tgt_lines):
    """A binarized split from pieces lines, with the tiny data's dictionaries."""
    raw = Path(dest) / "raw"
    raw.mkdir(parents=True)
    (raw / f"{split}.es").write_text("".join(l + "\n" for l in src_lines), encoding="utf-8")
    (raw / f"{split}.en").write_text("".join(l + "\n" for l in tgt_lines), encoding="utf-8")
    bin_dir = tiny_data / "bin"
    run([tool("fairseq-preprocess"), "-s", "es", "-t", "en", f"--{'train' if split == 'train' else 'valid'}pref",
         raw / split, "--destdir", dest, "--srcdict", bin_dir / "dict.es.txt",
         "--tgtdict", bin_dir / "dict.en.txt", "--workers", "1"])
    return Path(dest)


@pytest.fixture(scope="module")
def odd_lines_data(tiny_data, tmp_path_factory):
    """A 'train' split of 30 valid-set lines where line 3 is empty and line 7 is very long."""
    src = read_lines(tiny_data / "pieces" / "valid.sp.es")[:30]
    tgt = read_lines(tiny_data / "pieces" / "valid.sp.en")[:30]
    src[3] = ""
    src[7] = " ".join([src[7]] * 10)  # > 200 tokens
    return binarize(tiny_data, tmp_path_factory.mktemp("odd"), "train", src, tgt)


@pytest.fixture(scope="module")
def unsharded(odd_lines_data, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("unsharded")
    proc = corpus(odd_lines_data, tiny_teacher, out, "--chunk-size", "4", "--max-source-tokens", "200")
    return out, proc.stdout


def test_output_equals_fairseq_generate_and_preprocess(tiny_data, tiny_teacher, tmp_path):
    out = tmp_path / "distilled"
    corpus(tiny_data / "bin", tiny_teacher, out, "--split", "valid", "--formats", "bin,pieces,text",
           "--post-process", "sentencepiece", "--copy-splits", "test")
    hyps, _ = stock_nbest(tiny_data / "bin", tiny_teacher, "valid", 1)
    pieces = read_lines(out / "valid.en")
    assert len(pieces) == 60
    assert pieces == [hyps[i][0] for i in range(60)]  # identical to the H- lines, in order
    text = read_lines(out / "valid.text.en")
    assert text == [h.replace(" ", "").replace("\u2581", " ").strip() for h in pieces]
    # bin == fairseq-preprocess with the same dictionaries on the pieces output
    ref = tmp_path / "preprocessed"
    run([tool("fairseq-preprocess"), "-s", "es", "-t", "en", "--validpref", out / "valid",
         "--destdir", ref, "--srcdict", tiny_data / "bin" / "dict.es.txt",
         "--tgtdict", tiny_data / "bin" / "dict.en.txt", "--workers", "1"])
    for name in ["valid.es-en.es.bin", "valid.es-en.es.idx", "valid.es-en.en.bin", "valid.es-en.en.idx",
                 "dict.es.txt", "dict.en.txt"]:
        assert filecmp.cmp(out / name, ref / name, shallow=False), name
    assert filecmp.cmp(out / "test.es-en.en.bin", tiny_data / "bin" / "test.es-en.en.bin", shallow=False)


def test_every_line_kept_in_order_with_empty_and_long_sources(unsharded, odd_lines_data, tiny_teacher):
    out, stdout = unsharded
    hyps, refs = stock_nbest(odd_lines_data, tiny_teacher, "train", 1)  # stock skips nothing here
    lines = read_lines(out / "train.en")
    src = read_lines(out / "train.es")
    assert len(lines) == len(src) == 30
    assert lines[3] == "" and src[3] == ""
    gold = read_lines(odd_lines_data / "raw" / "train.en")
    assert lines[7] == gold[7]  # long source -> gold target (--long-inputs reference)
    for i in set(range(30)) - {3, 7}:
        assert lines[i] == hyps[i][0], i
    report = json.loads((out / "train.report.json").read_text())
    assert report["empty_sources"] == [3] and report["long_sources"] == [7]
    assert report["lines"] == 30 and report["translated"] == 28
    assert "1 empty sources, 1 long sources" in stdout


def test_long_inputs_truncate_translates_the_prefix(odd_lines_data, tiny_teacher, tmp_path):
    corpus(odd_lines_data, tiny_teacher, tmp_path, "--max-source-tokens", "200", "--long-inputs", "truncate",
           "--formats", "pieces")
    lines = read_lines(tmp_path / "train.en")
    gold = read_lines(odd_lines_data / "raw" / "train.en")
    assert len(lines) == 30 and lines[7] != gold[7]


def test_sharded_runs_merge_to_the_unsharded_output(unsharded, odd_lines_data, tiny_teacher, tmp_path):
    ref, _ = unsharded
    sharded = tmp_path / "sharded"
    for shard in (2, 0, 1):  # any order, e.g. separate cluster jobs
        proc = corpus(odd_lines_data, tiny_teacher, sharded, "--chunk-size", "4", "--max-source-tokens", "200",
                      "--num-shards", "3", "--shard-id", shard)
        assert "run again without --shard-id to merge" in proc.stdout
    assert not (sharded / "train.en").exists()
    proc = corpus(odd_lines_data, tiny_teacher, sharded, "--chunk-size", "4", "--max-source-tokens", "200")
    assert "resuming: 8 of 8 chunks already done" in proc.stdout
    for name in ("train.en", "train.es", "train.es-en.en.bin", "train.es-en.en.idx"):
        assert filecmp.cmp(sharded / name, ref / name, shallow=False), name


@pytest.mark.slow
def test_worker_processes_merge_to_the_unsharded_output(unsharded, odd_lines_data, tiny_teacher, tmp_path):
    ref, _ = unsharded
    run([tool("fairseq-kd"), "corpus", odd_lines_data, "--path", tiny_teacher, "--out", tmp_path,
         "-s", "es", "-t", "en", "--cpu", "--no-progress-bar", *DECODE, "--chunk-size", "4",
         "--max-source-tokens", "200", "--workers", "2", "--num-shards", "3",  # 2 processes, 3 shards
         "--backend", "fairseq"])
    for name in ("train.en", "train.es", "train.es-en.en.bin", "train.es-en.en.idx"):
        assert filecmp.cmp(tmp_path / name, ref / name, shallow=False), name


def corpus_command(data, teacher, out, *args):
    """A ``fairseq-kd corpus`` process translating one sentence per batch (slow enough to kill midway)."""
    return [tool("fairseq-kd"), "corpus", data, "--path", teacher, "--out", out, "-s", "es", "-t", "en",
            "--cpu", "--no-progress-bar", *DECODE, "--max-source-tokens", "200", "--batch-size", "1",
            "--backend", "fairseq", *map(str, args)]


def kill_midway(cmd, work):
    """Start ``cmd``, SIGKILL it once 2 chunks are saved; the saved chunks' mtimes."""
    proc = subprocess.Popen([str(c) for c in cmd], env=helpers.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(work.glob("chunk-*.json"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {p.name: p.stat().st_mtime_ns for p in work.glob("chunk-*.json")}


def test_resume_after_killed_run(unsharded, odd_lines_data, tiny_teacher, tmp_path):
    ref, _ = unsharded
    cmd = corpus_command(odd_lines_data, tiny_teacher, tmp_path, "--chunk-size", 2, "--workers", 1)
    work = tmp_path / "train.work"
    done = kill_midway(cmd, work)
    assert 2 <= len(done) < 15, "the run was not interrupted midway"
    assert not (tmp_path / "train.en").exists()
    out = run(cmd).stdout
    assert f"resuming: {len(done)} of 15 chunks already done" in out
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("chunk-*.json") if p.name in done} == done
    for name in ("train.en", "train.es-en.en.bin", "train.es-en.en.idx"):
        assert filecmp.cmp(tmp_path / name, ref / name, shallow=False), name


def test_killed_run_leaves_no_worker_behind(unsharded, odd_lines_data, tiny_teacher, tmp_path):
    """Workers die with the killed command instead of writing chunks beside the rerun."""
    ref, _ = unsharded
    cmd = corpus_command(odd_lines_data, tiny_teacher, tmp_path, "--chunk-size", 1, "--workers", 2)
    work = tmp_path / "train.work"
    done = kill_midway(cmd, work)
    assert 2 <= len(done) < 30, "the run was not interrupted midway"
    time.sleep(3)  # an orphaned worker translates a chunk in well under a second
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("chunk-*.json")} == done
    run(cmd)
    assert filecmp.cmp(tmp_path / "train.en", ref / "train.en", shallow=False)


def test_seq_inter_keeps_the_max_sentence_bleu_hypothesis(tiny_data, tiny_teacher, tmp_path):
    nbest = 4
    hyps, _ = stock_nbest(tiny_data / "bin", tiny_teacher, "test", nbest)
    # Gold targets that favour a lower-ranked hypothesis: sentence i's gold is its (i % 4)-th best.
    src = read_lines(tiny_data / "pieces" / "test.sp.es")
    gold = [hyps[i][i % nbest] for i in range(len(src))]
    data = binarize(tiny_data, tmp_path / "data", "train", src, gold)
    for name in ("dict.es.txt", "dict.en.txt"):
        assert filecmp.cmp(data / name, tiny_data / "bin" / name, shallow=False)
    corpus(data, tiny_teacher, tmp_path / "out", "--seq-inter", nbest, "--formats", "pieces")
    chosen = read_lines(tmp_path / "out" / "train.en")
    expected = []
    for i in range(len(src)):
        scores = [sacrebleu.sentence_bleu(h, [gold[i]]).score for h in hyps[i]]
        expected.append(hyps[i][scores.index(max(scores))])  # first of the best on ties
    assert chosen == expected
    assert sum(c != hyps[i][0] for i, c in enumerate(chosen)) >= len(src) // 2  # not just the 1-best


def test_bad_input_is_one_line_error(tiny_data, tiny_teacher, tmp_path):
    proc = run([tool("fairseq-kd"), "corpus", tiny_data / "bin", "--path", tmp_path / "nope.pt",
                "--out", tmp_path / "o", "-s", "es", "-t", "en"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert re.search(r"fairseq-kd corpus: error: --path: teacher checkpoint not found: .*nope.pt", proc.stderr)
    proc = corpus(tiny_data / "bin", tiny_teacher, tmp_path / "o", "--split", "dev", check=False)
    assert "fairseq-kd corpus: error: no binarized split 'dev'" in proc.stderr
    corpus(tiny_data / "bin", tiny_teacher, tmp_path / "o2", "--split", "test", "--formats", "pieces")
    proc = corpus(tiny_data / "bin", tiny_teacher, tmp_path / "o2", "--split", "test", "--beam", "2", check=False)
    assert "holds a run with other settings (beam)" in proc.stderr
    assert os.path.exists(tmp_path / "o2" / "test.en")


def test_bad_output_settings_are_refused_before_decoding(tiny_data, tiny_teacher, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data / "bin", data)
    before = sorted(p.name for p in data.iterdir())
    proc = corpus(data, tiny_teacher, data, "--split", "test", check=False)
    assert "--out must differ from the data folder with the bin format" in proc.stderr
    assert sorted(p.name for p in data.iterdir()) == before  # nothing written into the data
    (tmp_path / "afile").write_text("x")
    proc = corpus(data, tiny_teacher, tmp_path / "afile", "--split", "test", check=False)
    assert f"--out {tmp_path / 'afile'} is a file, not a folder" in proc.stderr
    proc = corpus(data, tiny_teacher, tmp_path / "o", "--split", "test", "--max-source-tokens", "100000",
                  check=False)
    assert re.search(r"--max-source-tokens 100000 exceeds the teacher's maximum source positions \(\d+\)",
                     proc.stderr)


def test_failed_start_does_not_bind_the_settings(tiny_data, tiny_teacher, tmp_path, monkeypatch):
    """A run that saved no chunk (wrong teacher file) leaves the folder free for the corrected command."""
    out = tmp_path / "o"
    proc = corpus(tiny_data / "bin", tiny_data / "bin" / "dict.en.txt", out, "--split", "test", check=False)
    assert proc.returncode != 0 and "dict.en.txt" in proc.stderr
    corpus(tiny_data / "bin", tiny_teacher, out, "--split", "test", "--formats", "pieces")
    assert (out / "test.en").exists()
    # the same teacher named by a relative path is the same setting: the rerun resumes (nothing to do)
    monkeypatch.chdir(tiny_teacher.parent)
    proc = corpus(tiny_data / "bin", tiny_teacher.name, out, "--split", "test", "--formats", "pieces")
    assert "chunks already done" in proc.stdout


def test_a_teacher_is_known_by_its_checksum_not_its_file_time(tiny_data, tiny_teacher, tmp_path):
    """A fresh clone or copy gives the teacher another modification time: the run still resumes.
    Other bytes are another teacher; an earlier version's fingerprint (path, size, time) is
    trusted while it still matches the file, and replaced by the checksum."""
    from fairseq_kd.corpus import work

    teacher, out = tmp_path / "teacher.pt", tmp_path / "o"
    shutil.copyfile(tiny_teacher, teacher)
    args = ["--split", "test", "--formats", "pieces"]
    corpus(tiny_data / "bin", teacher, out, *args)
    settings_file = out / "test.work" / "settings.json"
    fingerprint = json.loads(settings_file.read_text())["teacher_fingerprint"]
    assert fingerprint == [f"{teacher.stat().st_size}:sha256:{file_sha256(teacher)}"]
    os.utime(teacher, (1e9, 1e9))
    assert "chunks already done" in corpus(tiny_data / "bin", teacher, out, *args).stdout
    # an earlier version's folder: upgraded while its fingerprint matches the file
    settings = json.loads(settings_file.read_text())
    settings_file.write_text(json.dumps({**settings, "teacher_fingerprint": [work.legacy_fingerprint(teacher)]}))
    assert "chunks already done" in corpus(tiny_data / "bin", teacher, out, *args).stdout
    assert json.loads(settings_file.read_text())["teacher_fingerprint"] == fingerprint
    settings_file.write_text(json.dumps({**settings, "teacher_fingerprint": [work.legacy_fingerprint(teacher)]}))
    os.utime(teacher, (2e9, 2e9))  # touched since: nothing says it is the same teacher
    proc = corpus(tiny_data / "bin", teacher, out, *args, check=False)
    assert "holds a run with other settings (teacher_fingerprint)" in proc.stderr
    settings_file.write_text(json.dumps(settings))
    with open(teacher, "ab") as f:
        f.write(b"\0")
    proc = corpus(tiny_data / "bin", teacher, out, *args, check=False)
    assert "holds a run with other settings (teacher_fingerprint)" in proc.stderr
