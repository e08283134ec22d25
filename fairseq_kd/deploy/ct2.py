"""CTranslate2: fairseq checkpoints converted (and cached), shippable model folders, raw-text translation.

Conversion goes through the plain export (:mod:`fairseq_kd.deploy.export`)
and CTranslate2's own fairseq converter with the plugin loaded, so
``transformer_student_*``, ``transformer`` and ``transformer_iwslt_de_en``
checkpoints (training or exported) all convert, and the export stays
convertible by the stock converter.

Decoding matches fairseq's SequenceGenerator: the decoder starts from
``</s>``, ``</s>`` is appended to the source, the maximum length is
``a * source tokens (with </s>) + b`` per batch, the length penalty divides
by the length to that power.  One known difference: a beam hypothesis cut at
the maximum length is scored without the ``</s>`` fairseq forces there, so
beam search can rank such (degenerate) hypotheses differently.
"""
import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time

from fairseq_kd.errors import KDError, require

QUANTIZATIONS = ("float32", "int8", "int8_float16", "float16")
MODEL_INFO = "fairseq_kd.json"
SPM_MODEL = "sentencepiece.model"
USER_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_ENV = "FAIRSEQ_KD_CACHE"
# Sentences per batch on CPU, where each of the translator's threads decodes a
# batch of its own: small length-sorted batches keep every thread busy to the
# end.  Measured on 2 cores (beam 5, the CPU study's teacher, 2,000 test
# verses; benchmarks/README.md): 8-24 sentences decoded 1.5-1.7x faster than
# the ~300 that --max-tokens 12000 allows.
CPU_BATCH_SIZE = 24
GPU_BATCH_SIZE = 128


def default_batch_size(device):
    """Sentences per CTranslate2 batch on ``device`` ("cpu" or "cuda") when none is given."""
    return CPU_BATCH_SIZE if device == "cpu" else GPU_BATCH_SIZE


# ---------------------------------------------------------------- conversion
def cache_root():
    """Where converted teachers are kept: $FAIRSEQ_KD_CACHE/ct2, else ~/.cache/fairseq_kd/ct2."""
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fairseq_kd")
    return os.path.join(base, "ct2")


def dictionary_files(dict_dir, src, tgt):
    files = [os.path.join(dict_dir, f"dict.{lang}.txt") for lang in (src, tgt)]
    for f in files:
        require(os.path.isfile(f), f"missing dictionary {f}")
    return files


def convert(checkpoint, dict_dir, src, tgt, out_dir, quantization="float32"):
    """Convert a fairseq checkpoint into a CTranslate2 model folder ``out_dir``.

    Written beside ``out_dir`` and renamed into place, so a killed conversion
    leaves no half model, and concurrent ones of the same model both succeed.
    """
    from ctranslate2.converters import FairseqConverter

    from fairseq_kd.deploy.export import write_export

    require(quantization in QUANTIZATIONS,
            f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization}")
    dictionary_files(dict_dir, src, tgt)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".converting-") as tmp:
        exported = os.path.join(tmp, "exported.pt")
        write_export(checkpoint, exported)
        converter = FairseqConverter(exported, dict_dir, source_lang=src, target_lang=tgt, user_dir=USER_DIR)
        try:
            converter.convert(os.path.join(tmp, "model"), quantization=quantization, force=True)
        except (ValueError, NotImplementedError) as e:  # the converter's unsupported options
            raise KDError(f"CTranslate2 cannot convert {checkpoint}: {str(e).strip().splitlines()[-1]}") from e
        try:
            os.replace(os.path.join(tmp, "model"), out_dir)
        except OSError:
            require(os.path.isfile(os.path.join(out_dir, "model.bin")),
                    f"cannot write the converted model to {out_dir}")
    return out_dir


def cached_model(checkpoint, dict_dir, src, tgt, quantization="float32", cache_dir=None):
    """The CTranslate2 model of a checkpoint, converted on first use.

    Keyed by the checksums of the checkpoint and the dictionaries and by the
    quantization: a retrained teacher (same path, new weights) converts again.
    """
    from fairseq_kd.checksum import file_sha256

    require(os.path.isfile(checkpoint), f"checkpoint not found: {checkpoint}")
    key = hashlib.sha256(":".join(
        [file_sha256(checkpoint), *map(file_sha256, dictionary_files(dict_dir, src, tgt)), src, tgt]
    ).encode()).hexdigest()[:24]
    out = os.path.join(cache_dir or cache_root(), f"{key}-{quantization}")
    if not os.path.isfile(os.path.join(out, "model.bin")):
        convert(checkpoint, dict_dir, src, tgt, out, quantization)
    return out


# ---------------------------------------------------------------- translating
def load_translator(model_dir, device="cpu", device_index=0, threads=1, parallel=1):
    """A CTranslate2 translator: ``parallel`` batches at once, each on ``threads`` threads (CPU).

    The model computes in the type it was converted to ("default"; CTranslate2
    falls back to a supported one, e.g. float16 -> float32 on CPU): never
    "auto", which would quantize a float32 model on its own.
    """
    import ctranslate2

    require(os.path.isfile(os.path.join(model_dir, "model.bin")),
            f"{model_dir} holds no CTranslate2 model (model.bin)")
    if device == "cuda":
        require(ctranslate2.get_cuda_device_count() > 0, "--device cuda: CTranslate2 sees no CUDA device")
    return ctranslate2.Translator(model_dir, device=device, device_index=device_index,
                                  compute_type="default", inter_threads=parallel,
                                  intra_threads=threads)


def cpu_threads():
    """Threads CTranslate2 gets on CPU: OMP_NUM_THREADS, else every usable core."""
    from fairseq_kd.processes import usable_cores

    return int(os.environ.get("OMP_NUM_THREADS") or usable_cores())


def throughput_translator(model_dir, device="cpu"):
    """A translator for many sentences: on CPU as many batches at once as :func:`cpu_threads`,
    one thread each (length-sorted batches keep every core busy); on a GPU one at a time."""
    if device == "cuda":
        return load_translator(model_dir, "cuda")
    return load_translator(model_dir, "cpu", threads=1, parallel=cpu_threads())


def decoding_options(beam, nbest=1, lenpen=1.0, min_len=1, max_len_a=0.0, max_len_b=200, longest_source=0,
                     **sampling):
    """translate_batch options equivalent to fairseq-generate's for one batch.

    ``longest_source`` counts tokens with the ``</s>`` CTranslate2 appends,
    as fairseq's ``src_lengths`` do.  ``sampling``: CTranslate2's own
    sampling_topk, sampling_topp, sampling_temperature, passed as they are.
    """
    return dict(beam_size=beam, num_hypotheses=nbest, length_penalty=lenpen,
                min_decoding_length=min_len, max_input_length=0,
                max_decoding_length=max(1, int(max_len_a * longest_source + max_len_b)), **sampling)


def translate_batches(translator, batches, target_prefix=(), scores=False, **options):
    """Translate batches of token lists; yields each batch's hypotheses (token lists, best first).

    All batches are queued at once, so a translator with ``parallel`` > 1
    works on several of them at the same time; results come in order.
    ``target_prefix``: tokens every hypothesis starts with (a multilingual
    model's target language), returned with them.  With ``scores`` each
    hypothesis comes as (tokens, score): the log-probability normalised by
    length ** length_penalty, as fairseq's hypothesis score.
    """
    pending = [translator.translate_batch(batch, asynchronous=True, target_prefix=prefixes(target_prefix, batch),
                                          return_scores=scores,
                                          **decoding_options(longest_source=max(map(len, batch)) + 1, **options))
               for batch in batches]
    for results in pending:
        done = [r.result() for r in results]
        yield [list(zip(r.hypotheses, r.scores)) if scores else r.hypotheses for r in done]


def prefixes(target_prefix, batch):
    """translate_batch's target_prefix: the same tokens for every source of ``batch``, or None."""
    return [list(target_prefix)] * len(batch) if target_prefix else None


def translate_in_order(translator, sources, batch_size, progress=lambda n: None, **options):
    """The best hypothesis (tokens) of every source (tokens), in input order.

    Sources are batched by length (little padding, as fairseq-generate); an
    empty source gives an empty hypothesis.  ``progress(n)`` after n sources.
    """
    todo = sorted((i for i, s in enumerate(sources) if s), key=lambda i: len(sources[i]))
    batches = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
    out = [[] for _ in sources]
    progress(len(sources) - len(todo))
    hypotheses = translate_batches(translator, [[sources[i] for i in b] for b in batches], **options)
    for batch, hyps in zip(batches, hypotheses):
        for i, h in zip(batch, hyps):
            out[i] = h[0]
        progress(len(batch))
    return out


def latency_ms(translator, sources, warmup=3, target_prefix=(), **options):
    """Milliseconds each of ``sources`` (token lists) takes translated alone, in order.

    Batch size 1, one sentence after the other: the interactive case, which
    throughput (big length-sorted batches, several at once) says nothing
    about.  The first ``warmup`` sources are translated once untimed before,
    so that one-off allocations do not count as a sentence's latency.
    """
    def translate(source):
        translator.translate_batch([source], target_prefix=prefixes(target_prefix, [source]),
                                   **decoding_options(longest_source=len(source) + 1, **options))

    for source in sources[:warmup]:
        translate(source)
    times = []
    for source in sources:
        started = time.perf_counter()
        translate(source)
        times.append((time.perf_counter() - started) * 1000)
    return times


def latency_summary(times_ms):
    """{"sentences", "median_ms", "p90_ms"} of per-sentence latencies (p90 interpolated, as numpy's)."""
    require(len(times_ms) >= 2, f"latency needs at least 2 sentences, got {len(times_ms)}")
    p90 = statistics.quantiles(times_ms, n=10, method="inclusive")[8]
    return {"sentences": len(times_ms), "median_ms": round(statistics.median(times_ms), 2),
            "p90_ms": round(p90, 2)}


def binarized_split(data_dir, split, src, tgt, limit=None):
    """(sources, targets): the tokens (without </s>) of a binarized split's first ``limit``
    lines (None: all), in order; targets is None when the split has no target side."""
    from fairseq_kd.corpus.data import SplitData

    data = SplitData(argparse.Namespace(data=data_dir, source_lang=src, target_lang=tgt, split=split))
    count = len(data) if limit is None else min(limit, len(data))

    def tokens(dataset, dictionary):
        return [[dictionary.symbols[t] for t in dataset[i][:-1].tolist()] for i in range(count)]

    return tokens(data.src, data.src_dict), (None if data.tgt is None else tokens(data.tgt, data.tgt_dict))


def binarized_sources(data_dir, split, src, tgt):
    """The source tokens (without </s>) of a binarized split, in order."""
    return binarized_split(data_dir, split, src, tgt)[0]


# ---------------------------------------------------------------- model folders
def sentencepiece_postprocess(pieces):
    """fairseq's ``--post-process sentencepiece``: what evaluate scores."""
    return "".join(pieces).replace("\u2581", " ").strip()


def check_replaceable(out_dir):
    """``out_dir`` may become a model folder: absent, empty, or an earlier model folder
    (replaced), never a file or a folder of other files."""
    require(not os.path.isfile(out_dir), f"--out {out_dir} is a file, not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        require(os.path.isfile(os.path.join(out_dir, MODEL_INFO)),
                f"--out {out_dir} is a folder of other files, not an earlier model folder")


def write_info(folder, info):
    """Write a model folder's MODEL_INFO."""
    with open(os.path.join(folder, MODEL_INFO), "w") as f:
        json.dump(info, f, indent=1)


def write_model_folder(checkpoint, dict_dir, src, tgt, spm_model, out_dir, quantization, check=None,
                       dictionaries_from=None):
    """A folder to ship: the CTranslate2 model, the SentencePiece model and MODEL_INFO
    (``dictionaries_from``: where MODEL_INFO says the dictionaries came from, default
    ``dict_dir``).

    The folder is made beside ``out_dir`` and moved into place (replacing an
    earlier model folder) only when complete.  ``check(folder)``, when given,
    runs on the complete folder before the move; what it returns becomes
    MODEL_INFO's ``quantization_check`` entry, and if it raises, ``out_dir``
    is left as it was: a refused model never looks like a finished export.
    """
    from fairseq_kd.checksum import file_sha256

    require(os.path.isfile(spm_model), f"--spm-model: SentencePiece model not found: {spm_model}")
    check_replaceable(out_dir)
    started = time.time()
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".exporting-") as tmp:
        folder = os.path.join(tmp, "model")
        convert(checkpoint, dict_dir, src, tgt, folder, quantization)
        shutil.copyfile(spm_model, os.path.join(folder, SPM_MODEL))
        info = {"source_lang": src, "target_lang": tgt, "quantization": quantization,
                "sentencepiece": SPM_MODEL, "max_source_tokens": max_source_positions(checkpoint),
                "made_from": {"checkpoint": os.path.abspath(checkpoint), "sha256": file_sha256(checkpoint),
                              "dictionaries": dictionaries_from or os.path.abspath(dict_dir)},
                "made_by": f"fairseq-kd export --format ctranslate2 (ctranslate2 {ctranslate2_version()})",
                "made_on": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.time() - started, 1)}
        write_info(folder, info)  # the check translates with the folder as fairseq-kd translate would
        if check is not None:
            info["quantization_check"] = check(folder)
            write_info(folder, info)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(folder, out_dir)
    return info


def ctranslate2_version():
    import ctranslate2

    return ctranslate2.__version__


def max_source_positions(checkpoint):
    """Source tokens (with </s>) the model has position embeddings for."""
    from fairseq_kd.checkpoint import checkpoint_cfg, load_checkpoint_state

    cfg = checkpoint_cfg(load_checkpoint_state(checkpoint))
    return int(getattr(cfg.model, "max_source_positions", None) or 1024)


class ModelFolder:
    """A folder written by :func:`write_model_folder`: the translator and its SentencePiece model."""

    def __init__(self, path):
        import sentencepiece

        require(os.path.isdir(path), f"--model: model folder not found: {path}")
        info_file = os.path.join(path, MODEL_INFO)
        require(os.path.isfile(info_file), f"--model: {path} is not a model folder of fairseq-kd export "
                f"--format ctranslate2 (no {MODEL_INFO})")
        with open(info_file) as f:
            self.info = json.load(f)
        spm_file = os.path.join(path, self.info.get("sentencepiece", SPM_MODEL))
        require(os.path.isfile(spm_file), f"--model: {path} lacks its SentencePiece model ({spm_file})")
        self.path = path
        self.spm = sentencepiece.SentencePieceProcessor(model_file=spm_file)
        self.max_source = int(self.info.get("max_source_tokens", 1024)) - 1  # room for </s>

    def encode(self, lines):
        """The SentencePiece pieces of raw lines, whole (:meth:`translate_pieces` cuts long ones)."""
        return [self.spm.encode(line.strip(), out_type=str) for line in lines]

    def too_long(self, pieces):
        """Indices of the sources (pieces) longer than the model's maximum, which get cut."""
        return [i for i, p in enumerate(pieces) if len(p) > self.max_source]

    def truncation_note(self, truncated, total):
        """The line that says how many inputs were cut to the model's maximum."""
        return (f"{truncated} of {total} inputs were longer than the model's maximum of "
                f"{self.max_source} pieces and were truncated")

    def translate_pieces(self, translator, pieces, batch_size, progress=lambda n: None, **options):
        """Sources (pieces) -> raw translations, in order; ``progress(n)`` after each n sources.

        Sources beyond the model's maximum are cut to it: the model has no
        position embeddings past it (:meth:`too_long` finds them beforehand).
        """
        cut = [p[: self.max_source] for p in pieces]
        return [sentencepiece_postprocess(h)
                for h in translate_in_order(translator, cut, batch_size, progress, **options)]

    def translate(self, translator, lines, batch_size, progress=lambda n: None, **options):
        """Raw lines -> raw translations, in order (:meth:`translate_pieces`)."""
        return self.translate_pieces(translator, self.encode(lines), batch_size, progress, **options)
