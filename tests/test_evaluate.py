"""fairseq-kd evaluate / table / plot on the tiny teacher."""
import json
import shutil

import pytest
import torch
from sacrebleu.metrics import BLEU, CHRF

from fairseq_kd import cli
from helpers import USER_DIR, run, tool


def test_evaluate_table_plot(tiny_data, tiny_teacher, tmp_path):
    results = tmp_path / "results.json"
    # no --cpu: the device recorded is the one fairseq-generate used
    base = [tool("fairseq-kd"), "evaluate", "--data", tiny_data / "bin", "--ref", tiny_data / "raw/test.en",
            "--results", results, "--beam", "2", "--batch-size", "16"]
    run(base + ["--checkpoint", tiny_teacher, "--name", "teacher"])
    data = json.loads(results.read_text())
    assert [s["name"] for s in data["systems"]] == ["teacher"]
    assert data["systems"][0]["sentences"] == 40
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU ("
    assert data["device"].startswith(device) and data["systems"][0]["device"] == data["device"]
    refs = (tiny_data / "raw/test.en").read_text().splitlines()
    for label in ("greedy", "beam"):
        hyps = (tmp_path / f"results.teacher.{label}.txt").read_text().splitlines()
        assert len(hyps) == len(refs) == 40  # every sentence, none dropped
        entry = data["systems"][0][label]
        assert entry["bleu"] == round(BLEU().corpus_score(hyps, [refs]).score, 2)
        assert entry["chrf"] == round(CHRF().corpus_score(hyps, [refs]).score, 2)
        assert entry["sentences_per_s"] > 0
    # each decoding's hypotheses are those of a direct fairseq-generate run, in input order
    # (evaluate runs both decodings in one child process, one after the other)
    for label, beam in (("greedy", "1"), ("beam", "2")):
        direct = run([tool("fairseq-generate"), tiny_data / "bin", "--user-dir", USER_DIR, "--path", tiny_teacher,
                      "--gen-subset", "test", "--beam", beam, "--batch-size", "7", "--required-batch-size-multiple",
                      "1", "--max-len-a", "1.5", "--max-len-b", "10", "--post-process", "sentencepiece", "--cpu"])
        by_id = {int(l.split("\t")[0][2:]): l.split("\t")[2] for l in direct.stdout.splitlines() if l.startswith("H-")}
        assert [by_id[i] for i in range(40)] == (tmp_path / f"results.teacher.{label}.txt").read_text().splitlines()
    # parameters: the teacher's unique tensors
    assert data["systems"][0]["params"] == 360_960
    table = run([tool("fairseq-kd"), "table", results]).stdout
    assert "| teacher |" in table and "BLEU signature: `nrefs:1" in table
    run([tool("fairseq-kd"), "plot", results, "--out", tmp_path / "plot.png"])
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def evaluate_error(capsys, tiny_data, checkpoint, tmp_path, *extra, data=None, ref=None):
    """The error lines of a failed ``fairseq-kd evaluate`` run in this process."""
    argv = ["evaluate", "--data", data or tiny_data / "bin", "--ref", ref or tiny_data / "raw/test.en",
            "--checkpoint", checkpoint, "--name", "x", "--results", tmp_path / "results.json",
            "--cpu", "--batch-size", "16", *extra]
    assert cli.main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("fairseq-kd evaluate: error: ")
    return lines


@pytest.mark.parametrize("bad, message", [
    ("ref", "--ref: reference file not found"),
    ("data", "--data: data folder not found"),
    ("split", "--data: no binarized 'dev' split"),
    ("dict", "is not a fairseq checkpoint (no 'model' entry)"),
    ("bytes", "is not a fairseq checkpoint (torch cannot read it: UnpicklingError)"),
])
def test_bad_input_is_one_line_error(capsys, tiny_data, tiny_teacher, tmp_path, bad, message):
    checkpoint, kwargs, extra = tiny_teacher, {}, []
    if bad == "ref":
        kwargs["ref"] = tmp_path / "nope.en"
    elif bad == "data":
        kwargs["data"] = tmp_path / "nope"
    elif bad == "split":
        extra = ["--gen-subset", "dev"]
    elif bad == "dict":
        checkpoint = tmp_path / "dict.pt"
        torch.save({"weights": torch.zeros(2)}, checkpoint)
    else:
        checkpoint = tmp_path / "bytes.pt"
        checkpoint.write_bytes(bytes(range(256)) * 4)
    lines = evaluate_error(capsys, tiny_data, checkpoint, tmp_path, *extra, **kwargs)
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "results.json").exists()


def test_generate_failure_shows_its_exception_not_its_log(capsys, tiny_data, tiny_teacher, tmp_path):
    # dictionaries 3 entries longer than the checkpoint's embeddings: fairseq-generate fails to load it
    data = tmp_path / "bin"
    shutil.copytree(tiny_data / "bin", data)
    for lang in ("es", "en"):
        with open(data / f"dict.{lang}.txt", "a") as f:
            f.write("".join(f"extra{i} 1\n" for i in range(3)))
    lines = evaluate_error(capsys, tiny_data, tiny_teacher, tmp_path, data=data)
    assert lines[0].endswith(f"fairseq-generate failed on {tiny_teacher} (exit status 1):")
    assert lines[1].strip().startswith("RuntimeError: Error(s) in loading state_dict")
    assert len(lines) <= 4 and "size mismatch" in lines[2]


# another kind of GPU, or a CPU of the same cores and threads but another processor
@pytest.mark.parametrize("elsewhere", ["NVIDIA H100 80GB HBM3", "CPU (Made-up CPU 9000, 2 cores, OMP_NUM_THREADS=1)"])
def test_one_results_file_holds_one_device(capsys, tiny_data, tiny_teacher, tmp_path, elsewhere):
    from fairseq_kd.evaluation import cpu_model

    other = {"name": "elsewhere", "params": 1, "device": elsewhere,
             "greedy": {"beam": 1, "bleu": 1.0, "chrf": 1.0, "sentences_per_s": 900.0},
             "beam": {"beam": 2, "bleu": 1.0, "chrf": 1.0, "sentences_per_s": 300.0}}
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"device": other["device"], "systems": [other]}))
    lines = evaluate_error(capsys, tiny_data, tiny_teacher, tmp_path)
    assert len(lines) == 1
    assert f"results.json holds systems timed on {elsewhere}, this run decodes on CPU (" in lines[0]
    # a CPU row names the processor
    assert lines[0].split("this run decodes on ")[1].startswith(f"CPU ({cpu_model()}, " if cpu_model() else "CPU (")
    assert json.loads(results.read_text())["systems"] == [other]


def test_cpu_model_reads_the_processors_name(tmp_path):
    from fairseq_kd.evaluation import cpu_model

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R)  Xeon(R) Processor\n"
                       "processor\t: 1\nmodel name\t: Intel(R)  Xeon(R) Processor\n")
    assert cpu_model(str(cpuinfo)) == "Intel(R) Xeon(R) Processor"


def _record(path, name):
    from fairseq_kd.results import record_system

    entry = {"name": name, "params": 1, "device": "cpu",
             **{d: {"beam": 1, "bleu": 1.0, "chrf": 1.0, "sentences_per_s": 1.0} for d in ("greedy", "beam")}}
    record_system(path, entry, "bleu-sig", "chrf-sig", "cpu")


def test_evaluations_writing_one_results_file_at_once_keep_every_row(tmp_path, monkeypatch):
    """Two recipe runs sharing a work folder evaluate into one results.json: each write reads
    the file again under a lock, so no row is lost to a concurrent one."""
    import multiprocessing
    import time

    from fairseq_kd import results as results_module
    from fairseq_kd.results import read_results

    read = results_module.results_to_update

    def slow_read(path):  # widens the window between reading and writing the file
        results = read(path)
        time.sleep(0.05)
        return results

    monkeypatch.setattr(results_module, "results_to_update", slow_read)
    path = str(tmp_path / "results.json")
    names = [f"system{i}" for i in range(24)]
    with multiprocessing.get_context("fork").Pool(6) as pool:
        pool.starmap(_record, [(path, n) for n in names])
    results = read_results(path)
    assert sorted(s["name"] for s in results["systems"]) == sorted(names)
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no lock or temporary file left
    _record(path, "system3")  # a system evaluated again replaces its row
    assert [s["name"] for s in read_results(path)["systems"]].count("system3") == 1
