"""Evaluate one checkpoint on a binarized split: decode (greedy and beam), score, record.

The work of ``fairseq-kd evaluate`` (:mod:`fairseq_kd.cli.evaluate` describes
it for users).  Decoding is ``fairseq-generate`` in a child process, whose
own speed line gives the translation speed (loading excluded), or the
checkpoint converted to CTranslate2 (:mod:`fairseq_kd.deploy.ct2`);
hypotheses are scored with sacreBLEU (BLEU, chrF) and the system is recorded
in a results file (:mod:`fairseq_kd.results`) with the device it was timed on.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

from fairseq_kd.errors import require
from fairseq_kd.results import FP16_NOTE, check_same_device, record_system, results_to_update

SPEED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s \(([\d.]+) sentences/s")
# The line naming the exception at the end of a Python traceback, e.g. "RuntimeError: ...".
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")
FAILURE_LINES = 3
# The folder fairseq-generate loads the plugin from (--user-dir)
PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass
class Evaluation:
    """One system's evaluation; the fields are ``fairseq-kd evaluate``'s options."""
    data: str  # fairseq binary data folder
    checkpoint: str
    name: str  # the system's name in the results file
    ref: str  # detokenized reference of the split
    results: str  # JSON file to update
    gen_subset: str
    beam: int  # beam size of the beam-search run (the other is greedy)
    batch_size: int
    max_len_a: float
    max_len_b: int
    post_process: str  # fairseq --post-process that detokenizes hypotheses
    cpu: bool
    fp16: bool
    no_user_dir: bool  # stock fairseq-generate, without the plugin (exported checkpoints)
    backend: str  # "fairseq" or "ctranslate2"
    quantization: str  # the CTranslate2 model's weights
    model_dir: str  # a model folder of fairseq-kd export --format ctranslate2, scored from raw text
    src_text: str  # with model_dir: the raw source text it translates
    latency: int  # CTranslate2: sentences timed one at a time (batch size 1); 0 for none
    latency_threads: int = 1  # CPU threads on the one sentence whose latency is timed
    teacher_ct2: str = None  # a CTranslate2 converter's folder (an external teacher), scored from raw text
    source_prefix: str = None  # with teacher_ct2: tokens every source starts with
    target_prefix: str = None  # with teacher_ct2: tokens every translation starts with

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f.name, f.default) for f in dataclasses.fields(cls)})

    @property
    def system_name(self):
        """The results row: NAME, NAME (ct2 QUANTIZATION) for the converted checkpoint, or
        NAME (ct2 QUANTIZATION raw text) for a model folder scored from raw text; an external
        teacher (teacher_ct2) is NAME: it has no other row."""
        if self.teacher_ct2:
            return self.name
        if self.model_dir:
            return f"{self.name} (ct2 {self.quantization} raw text)"
        return f"{self.name} (ct2 {self.quantization})" if self.backend == "ctranslate2" else self.name


def hypotheses_file(results, name, label):
    """RESULTS.NAME.LABEL.txt, the row's name made a file name ("a (ct2 int8)" -> "a.ct2-int8")."""
    stem = re.sub(r"\s*\((.*)\)$", lambda m: "." + m.group(1).replace(" ", "-"), name)
    return f"{os.path.splitext(results)[0]}.{stem}.{label}.txt"


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def cpu_model(cpuinfo="/proc/cpuinfo"):
    """The processor's name as the system reports it ("" where it does not): part of a CPU
    row's device, so that one results file never mixes speeds of two kinds of machine (a
    cloud VM may come back on another host between sessions)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    import platform

    return platform.processor()


def decoding_device(spec):
    """What fairseq-generate decodes on (a GPU whenever it sees one, unless --cpu)."""
    import torch

    if spec.cpu or not torch.cuda.is_available():
        require(not spec.fp16, "--fp16 needs a GPU (no --cpu, and CUDA available)")
        from fairseq_kd.processes import usable_cores

        threads = os.environ.get("OMP_NUM_THREADS")
        details = [cpu_model(), f"{usable_cores()} cores", f"OMP_NUM_THREADS={threads}" if threads else ""]
        return f"CPU ({', '.join(d for d in details if d)})"
    return torch.cuda.get_device_name() + (FP16_NOTE if spec.fp16 else "")


def failure_lines(stderr):
    """Why a child failed, from its stderr: the plugin's one-line error, else the
    line naming its last exception (and the next few), else its last lines."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    plugin = [line for line in lines if line.startswith("fairseq_kd: error:")]
    if plugin:
        return plugin[-1:]
    starts = [i for i, line in enumerate(lines) if EXCEPTION_LINE.match(line)]
    first = starts[-1] if starts else max(len(lines) - FAILURE_LINES, 0)
    return lines[first:first + FAILURE_LINES]


# One child runs fairseq-generate once per decoding (what the fairseq-generate script runs),
# each run's output after a marker line: a child per decoding would pay Python's start and
# fairseq's imports (about 4 s on 2 CPU cores) twice per system.  The child imports no
# fairseq_kd unless the command line's --user-dir does: stock fairseq, as before.
# fairseq's imports set up logging to stderr before fairseq-generate's own basicConfig would
# (a no-op then), so the child sends it to stdout, in order with each run's hypotheses.
GENERATE_RUNS = """
import json, logging, sys
runs, marker = json.loads(sys.argv[1]), sys.argv[2]
from fairseq_cli.generate import cli_main
logging.basicConfig(stream=sys.stdout, level=logging.INFO, force=True,
                    format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
for argv in runs:
    print(marker, flush=True)
    sys.argv = ["fairseq-generate", *argv]
    cli_main()
    sys.stdout.flush()
"""
RUN_MARKER = "=== fairseq_kd.evaluation: next fairseq-generate run"


def generate_args(spec, beam):
    """fairseq-generate's command line (without the program) for one decoding of ``spec``."""
    args = [spec.data, "--path", spec.checkpoint,
            "--gen-subset", spec.gen_subset, "--beam", str(beam), "--nbest", "1",
            "--batch-size", str(spec.batch_size),
            # otherwise fairseq-generate drops the last partial batch silently
            "--required-batch-size-multiple", "1",
            "--max-len-a", str(spec.max_len_a), "--max-len-b", str(spec.max_len_b),
            "--post-process", spec.post_process]
    if not spec.no_user_dir:
        args += ["--user-dir", PLUGIN_DIR]
    args += ["--cpu"] if spec.cpu else []
    args += ["--fp16"] if spec.fp16 else []
    return args


def generate(spec, beams, hyp_paths):
    """fairseq-generate with each beam of ``beams`` (one child process for all); write each
    run's hypotheses in input order to its path of ``hyp_paths``; return a (sentences,
    sentences/s) for each run."""
    proc = subprocess.run([sys.executable, "-c", GENERATE_RUNS,
                           json.dumps([generate_args(spec, beam) for beam in beams]), RUN_MARKER],
                          capture_output=True, text=True)
    require(proc.returncode == 0,
            f"fairseq-generate failed on {spec.checkpoint} (exit status {proc.returncode}):\n  "
            + "\n  ".join(failure_lines(proc.stderr)))
    outputs = proc.stdout.split(RUN_MARKER + "\n")[1:]
    require(len(outputs) == len(beams), f"fairseq-generate ran {len(outputs)} times, not {len(beams)}")
    return [generated(output, hyp_path) for output, hyp_path in zip(outputs, hyp_paths)]


def generated(output, hyp_path):
    """One fairseq-generate run's hypotheses, from its output, into ``hyp_path`` in input
    order; returns (sentences, sentences/s)."""
    hyps = {}
    for line in output.splitlines():
        if line.startswith("H-"):
            idx, _, text = (line[2:].split("\t") + [""])[:3]
            hyps[int(idx)] = text
    speed = SPEED.search(output)
    require(speed is not None, "fairseq-generate printed no speed line")
    with open(hyp_path, "w", encoding="utf-8") as f:
        f.write("".join(hyps[i] + "\n" for i in sorted(hyps)))
    return len(hyps), float(speed.group(4))


def ct2_device(spec):
    """Where CTranslate2 translates: the GPU whenever it sees one, unless --cpu."""
    return "cpu" if spec.cpu or not cuda_available_to_ct2() else "cuda"


def ct2_translators(model_dir, spec):
    """(throughput translator, latency translator or None) of a CTranslate2 model, on the evaluation's cores.

    Throughput translates as many batches at once as there are cores, one
    thread each; latency (one sentence at a time) on ``spec.latency_threads``
    threads (default 1, as ``fairseq-kd translate`` runs each batch: on the
    2-core VM two threads on one sentence took 16x as long as one).
    """
    from fairseq_kd.deploy.ct2 import load_translator, throughput_translator

    device = ct2_device(spec)
    if not spec.latency:
        return throughput_translator(model_dir, device), None
    latency = (load_translator(model_dir, "cuda") if device == "cuda"
               else load_translator(model_dir, "cpu", threads=spec.latency_threads, parallel=1))
    return throughput_translator(model_dir, device), latency


def cuda_available_to_ct2():
    import ctranslate2

    return ctranslate2.get_cuda_device_count() > 0


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


@dataclasses.dataclass
class Ct2Decoder:
    """How a CTranslate2 row translates: its translators, its sources (token lists) and its detokenizer."""
    translator: object
    latency_translator: object  # None: no latency measured
    sources: list
    detokenize: object  # hypotheses (token lists) -> their text
    options: dict = dataclasses.field(default_factory=dict)  # more translate options (target_prefix)

    def translate(self, spec, beam, hyp_path):
        """Translate every source, as :func:`generate`: (sentences, sentences/s).

        The speed counts translation and detokenizing (what a user of
        ``fairseq-kd translate`` waits for), not loading.
        """
        from fairseq_kd.deploy.ct2 import translate_in_order

        started = time.perf_counter()
        hyps = self.detokenize(translate_in_order(self.translator, self.sources, spec.batch_size, beam=beam,
                                                  max_len_a=spec.max_len_a, max_len_b=spec.max_len_b,
                                                  **self.options))
        speed = len(hyps) / max(time.perf_counter() - started, 1e-9)
        write_lines(hyp_path, hyps)
        return len(hyps), round(speed, 2)

    def latency(self, spec, beam):
        """Median and p90 milliseconds per sentence over the first ``spec.latency`` non-empty sources."""
        from fairseq_kd.deploy.ct2 import latency_ms, latency_summary

        sources = [s for s in self.sources if s][: spec.latency]
        summary = latency_summary(latency_ms(self.latency_translator, sources, beam=beam,
                                             max_len_a=spec.max_len_a, max_len_b=spec.max_len_b, **self.options))
        return {**summary, "threads": spec.latency_threads} if ct2_device(spec) == "cpu" else summary


def binarized_decoder(spec):
    """The checkpoint converted to CTranslate2 (cached), translating the binarized split."""
    from fairseq.data import data_utils

    from fairseq_kd.deploy.ct2 import binarized_sources, cached_model

    src, tgt = data_utils.infer_language_pair(spec.data)
    require(src and tgt, f"--data: cannot tell the languages from the file names in {spec.data}")
    model = cached_model(spec.checkpoint, spec.data, src, tgt, spec.quantization)
    return Ct2Decoder(*ct2_translators(model, spec), binarized_sources(spec.data, spec.gen_subset, src, tgt),
                      lambda hyps: [data_utils.post_process(" ".join(h), spec.post_process) for h in hyps])


def folder_decoder(spec, folder, entry, report):
    """A model folder translating raw text exactly as ``fairseq-kd translate`` does: its own
    SentencePiece model, sources cut to the model's maximum (counted in ``entry`` and reported)."""
    from fairseq_kd.deploy.ct2 import sentencepiece_postprocess

    pieces = folder.encode(read_lines(spec.src_text))
    long = folder.too_long(pieces)
    entry["truncated_sources"] = len(long)
    if long:
        report(folder.truncation_note(len(long), len(pieces)))
    return Ct2Decoder(*ct2_translators(folder.path, spec), [p[: folder.max_source] for p in pieces],
                      lambda hyps: [sentencepiece_postprocess(h) for h in hyps])


def external_decoder(spec, entry, report):
    """An external teacher (a CTranslate2 converter's folder) translating raw text exactly as
    ``fairseq-kd corpus --teacher-ct2`` does: its tokenizer, language codes and source limit
    (longer sources cut to it, counted in ``entry`` and reported)."""
    from fairseq_kd.corpus.external import TeacherLayout, TeacherTokenizer, max_source_positions

    tokenizer = TeacherTokenizer(TeacherLayout(spec.teacher_ct2, spec.source_prefix, spec.target_prefix))
    limit = max_source_positions(spec.teacher_ct2)
    lines = read_lines(spec.src_text)
    pieces = [tokenizer.encode(line) if line.strip() else [] for line in lines]
    long = [i for i, p in enumerate(pieces) if tokenizer.layout.size(p) > limit]
    entry["truncated_sources"] = len(long)
    if long:
        report(f"{len(long)} of {len(lines)} inputs were longer than the teacher's maximum of {limit} "
               "tokens and were truncated")
    sources = [tokenizer.layout.source_tokens(p, limit) if p else [] for p in pieces]
    return Ct2Decoder(*ct2_translators(spec.teacher_ct2, spec), sources,
                      lambda hyps: [tokenizer.decode(h) for h in hyps],
                      {"target_prefix": tokenizer.layout.target_prefix})


# fairseq state-dict entries that are buffers, not parameters (module versions, the
# sinusoidal positions' device tracker)
BUFFER_SUFFIXES = ("version", "_float_tensor")


def unique_parameter_count(state_dict, model_cfg=None, nonzero=False):
    """The number of parameters in ``state_dict``, each tied tensor counted once
    (``nonzero``: only those that are not zero, what a pruned model still holds).

    Ties are read from the model config's ``share_*`` flags, and from shared
    storage for other architectures (:func:`fairseq_kd.pruning.canonical_names`):
    storage alone misses them in checkpoints of GPU or fp16 runs, which fairseq
    moves to the CPU tensor by tensor (one copy per key).
    """
    import torch

    from fairseq_kd.pruning import canonical_names

    canonical = canonical_names(state_dict, model_cfg)
    size = (lambda t: int(torch.count_nonzero(t))) if nonzero else (lambda t: t.numel())
    return sum(size(value) for key, value in state_dict.items()
               if canonical[key] == key and not key.endswith(BUFFER_SUFFIXES))


def parameter_counts(checkpoint):
    """(parameters, non-zero parameters) of the model in a checkpoint, tied embeddings counted
    once; the checkpoint is read once."""
    from fairseq_kd.checkpoint import checkpoint_model_cfg, load_checkpoint_state

    state = load_checkpoint_state(checkpoint)
    cfg = checkpoint_model_cfg(state)
    return unique_parameter_count(state["model"], cfg), unique_parameter_count(state["model"], cfg, nonzero=True)


def count_parameters(checkpoint, nonzero=False):
    """Parameters of the model in a checkpoint (tied embeddings counted once; ``nonzero``:
    those that are not zero)."""
    return parameter_counts(checkpoint)[1 if nonzero else 0]


def model_folder(spec):
    """The model folder of ``spec.model_dir``; its quantization becomes the row's."""
    from fairseq_kd.deploy.ct2 import ModelFolder

    folder = ModelFolder(spec.model_dir)
    spec.quantization = folder.info.get("quantization", "unknown")
    return folder


def params_checkpoint(spec, folder):
    """The checkpoint whose parameters are counted: --checkpoint, else the folder's source checkpoint."""
    if spec.checkpoint or folder is None:
        return spec.checkpoint
    made_from = folder.info.get("made_from", {}).get("checkpoint", "")
    require(os.path.isfile(made_from), f"--model-dir: the checkpoint it was made from ({made_from or 'none'}) "
            f"is not here; pass --checkpoint to count the model's parameters")
    return made_from


def evaluate(spec, report=print):
    """Decode greedy and with beam ``spec.beam``, score both, and record the system in
    ``spec.results``; ``report`` gets a line per decoding."""
    from sacrebleu.metrics import BLEU, CHRF

    os.makedirs(os.path.dirname(os.path.abspath(spec.results)), exist_ok=True)
    folder = model_folder(spec) if spec.model_dir else None
    device = decoding_device(spec)
    results = results_to_update(spec.results)
    name = spec.system_name
    check_same_device(results, spec.results, name, device)
    refs = read_lines(spec.ref)
    if spec.teacher_ct2:
        from fairseq_kd.corpus.external import parameter_count

        entry = {"name": name, "teacher_ct2": os.path.abspath(spec.teacher_ct2),
                 "params": parameter_count(spec.teacher_ct2), "device": device, "sentences": len(refs),
                 "backend": "ctranslate2", "src_text": os.path.abspath(spec.src_text)}
    else:
        checkpoint = params_checkpoint(spec, folder)
        params, nonzero = parameter_counts(checkpoint)
        entry = {"name": name, "checkpoint": checkpoint, "params": params, "nonzero_params": nonzero,
                 "device": device, "sentences": len(refs)}
    decoder = None
    if spec.teacher_ct2:
        decoder = external_decoder(spec, entry, report)
    elif folder is not None:
        entry.update(backend="ctranslate2", quantization=spec.quantization,
                     model_dir=os.path.abspath(spec.model_dir), src_text=os.path.abspath(spec.src_text))
        decoder = folder_decoder(spec, folder, entry, report)
    elif spec.backend == "ctranslate2":
        entry.update(backend="ctranslate2", quantization=spec.quantization)
        decoder = binarized_decoder(spec)
    bleu, chrf = BLEU(), CHRF()
    decodings = (("greedy", 1), ("beam", spec.beam))
    hyp_paths = [hypotheses_file(spec.results, name, label) for label, _ in decodings]
    fairseq_runs = None if decoder else iter(generate(spec, [beam for _, beam in decodings], hyp_paths))
    for (label, beam), hyp_path in zip(decodings, hyp_paths):
        n, speed = decoder.translate(spec, beam, hyp_path) if decoder else next(fairseq_runs)
        require(n == len(refs), f"{name}: {n} hypotheses for {len(refs)} references")
        hyps = read_lines(hyp_path)
        entry[label] = {"beam": beam, "bleu": round(bleu.corpus_score(hyps, [refs]).score, 2),
                        "chrf": round(chrf.corpus_score(hyps, [refs]).score, 2),
                        "sentences_per_s": speed}
        line = (f"{name} {label}: BLEU {entry[label]['bleu']}, chrF {entry[label]['chrf']}, "
                f"{speed} sentences/s")
        if decoder and spec.latency:
            entry[label]["latency_ms"] = latency = decoder.latency(spec, beam)
            line += (f", {latency['median_ms']} ms median / {latency['p90_ms']} ms p90 per sentence "
                     f"one at a time")
        report(line)
    record_system(spec.results, entry, str(bleu.get_signature()), str(chrf.get_signature()), device)
    return entry
