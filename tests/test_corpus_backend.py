"""fairseq-kd corpus's backends: what --backend auto (the default) chooses and logs, resuming
across that choice, and the fairseq backend's vocabulary projection (one matrix product per
decoding step, as in fairseq-generate, not one per hypothesis)."""
import contextlib
import filecmp
import io
import json
import logging

import pytest
import torch

from fairseq_kd import cli
from fairseq_kd.corpus import build
from fairseq_kd.errors import KDError
from test_seq_kd_corpus import DECODE, corpus


@pytest.fixture(autouse=True)
def ct2_cache(tmp_path, monkeypatch):
    """Converted teachers go to a fresh cache, not the user's."""
    monkeypatch.setenv("FAIRSEQ_KD_CACHE", str(tmp_path / "ct2_cache"))


@pytest.fixture
def corpus_log(caplog):
    caplog.set_level(logging.INFO, logger="fairseq_kd.corpus")
    return caplog


def parse(out, *extra, path="teacher.pt"):
    """``fairseq-kd corpus`` arguments as the command line parses them (its real defaults)."""
    argv = ["corpus", "DATA", "--path", str(path), "--out", str(out), "-s", "es", "-t", "en", *map(str, extra)]
    return cli.build_parser(["corpus"]).parse_args(argv)


def auto_line(backend, reason):
    return f"--backend auto: decoding with {backend}: {reason}; --backend fairseq or ctranslate2 chooses one"


def test_default_is_auto_which_decodes_with_ctranslate2_on_cpu(tiny_data, tiny_teacher, tmp_path, corpus_log):
    common = ["corpus", tiny_data / "bin", "--path", tiny_teacher, "-s", "es", "-t", "en", "--cpu",
              "--no-progress-bar", "--split", "valid", "--formats", "pieces", *DECODE]
    with contextlib.redirect_stdout(io.StringIO()):  # no --backend: the default a new user gets
        assert cli.main([*common, "--out", tmp_path / "default"]) == 0
    assert auto_line("ctranslate2 (float32)", build.AUTO_CPU_REASON) in corpus_log.text
    settings = json.loads((tmp_path / "default" / "valid.work" / "settings.json").read_text())
    assert (settings["backend"], settings["quantization"]) == ("ctranslate2", "float32")
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main([*common, "--out", tmp_path / "ct2", "--backend", "ctranslate2"]) == 0
    assert filecmp.cmp(tmp_path / "default" / "valid.en", tmp_path / "ct2" / "valid.en", shallow=False)


@pytest.mark.parametrize("extra, path, reason", [
    (["--unkpen", "1"], "teacher.pt", "CTranslate2 has no --unkpen"),
    (["--seq-inter", "4"], "teacher.pt", build.NBEST_REASON),
    (["--select", "mbr", "--candidates", "8"], "teacher.pt", build.NBEST_REASON),
    (["--keep", "2"], "teacher.pt", build.NBEST_REASON),
    ([], "a.pt:b.pt", "CTranslate2 translates with one checkpoint, not an ensemble"),
])
def test_auto_keeps_fairseq_where_ctranslate2_was_not_measured(extra, path, reason, tmp_path):
    assert build.choose_backend(parse(tmp_path, "--cpu", *extra, path=path)) == ("fairseq", reason)
    assert build.choose_backend(parse(tmp_path, "--cpu", path="teacher.pt")) == ("ctranslate2", build.AUTO_CPU_REASON)


def test_auto_samples_with_ctranslate2_on_cpu(tmp_path):
    """Samples have no line-by-line agreement to keep: the faster backend draws them."""
    args = parse(tmp_path, "--cpu", "--select", "mbr", "--candidates", "8", "--sampling", "topp")
    assert build.choose_backend(args) == ("ctranslate2", build.SAMPLING_REASON)


def test_auto_keeps_fairseq_on_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "cuda_device_count", lambda args: 0 if args.cpu else 1)
    backend, reason = build.choose_backend(parse(tmp_path))
    assert backend == "fairseq" and reason.startswith("a GPU is visible")
    assert build.choose_backend(parse(tmp_path, "--cpu"))[0] == "ctranslate2"


def test_auto_decodes_with_fairseq_a_teacher_ctranslate2_cannot_convert(tmp_path, monkeypatch, corpus_log):
    refusal = "CTranslate2 cannot convert teacher.pt: Option --foo is not supported"

    def refuse(args):
        raise KDError(refusal)

    monkeypatch.setattr(build, "prepare_backend", refuse)
    args = parse(tmp_path, "--cpu")
    build.resolve_backend(args)
    assert (args.backend, args.quantization) == ("fairseq", None)
    assert auto_line("fairseq", refusal) in corpus_log.text
    build.check_backend_args(args)
    assert args.batch_size == 1000  # fairseq's batches, not CTranslate2's


def test_quantization_is_refused_when_fairseq_decodes(tmp_path, monkeypatch):
    with pytest.raises(KDError, match="--quantization is an option of --backend ctranslate2"):
        build.check_backend_args(parse(tmp_path, "--backend", "fairseq", "--quantization", "int8"))
    monkeypatch.setattr(build, "cuda_device_count", lambda args: 1)
    args = parse(tmp_path, "--quantization", "int8")  # auto, on a GPU
    build.resolve_backend(args)
    with pytest.raises(KDError, match="this run decodes with fairseq"):
        build.check_backend_args(args)


def test_auto_resumes_a_run_with_the_backend_it_began_with(tiny_data, tiny_teacher, tmp_path, corpus_log):
    """A run begun with fairseq (the default before auto) resumes with fairseq, not CTranslate2."""
    args = ["--split", "valid", "--chunk-size", "20", "--formats", "pieces"]
    corpus(tiny_data / "bin", tiny_teacher, tmp_path / "ref", *args)  # fairseq, in one go
    out = tmp_path / "resumed"
    corpus(tiny_data / "bin", tiny_teacher, out, *args, "--num-shards", "3", "--shard-id", "0")
    proc = corpus(tiny_data / "bin", tiny_teacher, out, *args, "--backend", "auto")
    assert "resuming: 1 of 3 chunks already done" in proc.stdout
    assert auto_line("fairseq", f"the run being resumed in {out / 'valid.work'} used it") in corpus_log.text
    assert filecmp.cmp(out / "valid.en", tmp_path / "ref" / "valid.en", shallow=False)


def test_fairseq_backend_projects_onto_the_vocabulary_in_one_matrix_product(tiny_data, tiny_teacher, tmp_path):
    """As fairseq-generate does: the frozen teacher once made each step B matrix-vector products.

    PyTorch folds the decoder's B x 1 x C features into one matrix product
    only for weights that require grad (see ``unfreeze_for_decoding``); the
    batched form was 4x slower on CPU and its scores differed in the last bits.
    """
    from torch.profiler import ProfilerActivity, profile

    from fairseq_kd.corpus.data import SplitData
    from fairseq_kd.corpus.translators import FairseqTranslator

    args = parse(tmp_path, "--cpu", "--backend", "fairseq", "--split", "valid", *DECODE, path=tiny_teacher)
    args.data = str(tiny_data / "bin")
    build.check_backend_args(args)
    data = SplitData(args)
    translator = FairseqTranslator(args, data, torch.device("cpu"))
    vocab = len(data.tgt_dict)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in translator.translate_chunk(0, 16):
            pass
    projections = [e.name for e in prof.events() if e.name in ("aten::mm", "aten::bmm")
                   and any(vocab in shape for shape in e.input_shapes if isinstance(shape, list))]
    assert projections and set(projections) == {"aten::mm"}
