"""A trained model as a user gets it: a folder to ship, checked, and its README.

The recipes' ``ship`` step (the teacher, ``examples/teacher`` in this repository)
and ``ship_students`` step (``examples/students/NAME``) write one folder per model:

* the model file (``fairseq-kd export --half --portable``: float16 weights, stock
  fairseq loads it without the plugin, no path of the machine that trained it);
* ``spm.model`` and ``dict.txt``: the SentencePiece model and joined dictionary
  that encode its data;
* ``evaluation.json``: the test split scored from the model file with stock
  fairseq (``fairseq-kd evaluate --no-user-dir``), and ``evaluation.check.json``:
  the first test pairs scored from the folder alone, which the repository's tests
  reproduce from a clean clone;
* ``README.md``: how the model was made;
* a student's ``training.json`` too: its validation curve and hours in training
  updates (:func:`fairseq_kd.curves.training_record`), so that a study can put the
  shipped student beside the ones it trains without its work folder.

Here: :func:`portable_results` (a results file naming the model by its file name
in the folder), :func:`folder_problems` (what keeps a folder from shipping),
:func:`portable_text` (paths of the machine out of a line of options),
:func:`stop_reason` (why a fairseq-train log's training ended) and
:func:`student_readme` (a shipped student's README).  Neither fairseq nor
torch is imported at module level.
"""
import dataclasses
import datetime
import json
import os
import re
import shlex

from fairseq_kd.atomic_io import write_atomic
from fairseq_kd.errors import KDError, require
from fairseq_kd.results import read_results

# What a shipped folder holds besides its model file, and nothing else.
FOLDER_FILES = ("spm.model", "dict.txt", "README.md", "evaluation.json", "evaluation.check.json")
TRAINING_RECORD = "training.json"
STUDENT_FILES = FOLDER_FILES + (TRAINING_RECORD,)
RESULTS_FILES = ("evaluation.json", "evaluation.check.json")
# Fields of a results entry that name files (fairseq_kd.evaluation.evaluate).
PATH_FIELDS = ("checkpoint", "model_dir", "src_text", "teacher_ct2")


def portable_results(path):
    """Rewrite the results file ``path`` so that each system names its files by their
    path relative to the file's folder (``student.pt``), not by an absolute path."""
    folder = os.path.dirname(os.path.abspath(path))
    results = read_results(path)
    for system in results["systems"]:
        for field in PATH_FIELDS:
            if isinstance(system.get(field), str):
                system[field] = os.path.relpath(os.path.abspath(system[field]), folder)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    return results


def absolute_paths(value, where):
    """(where, value) of every string in a JSON-like ``value`` that is an absolute path."""
    if isinstance(value, str):
        return [(where, value)] if os.path.isabs(value.split(os.pathsep)[0]) else []
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return []
    return [found for key, item in items for found in absolute_paths(item, f"{where}.{key}")]


def model_problems(path):
    """What is wrong with a shipped model file: not a weights-only fairseq checkpoint,
    weights not float16, an absolute path in its config."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any reason it does not load is the problem
        return [f"{os.path.basename(path)} does not load weights-only (stock fairseq): {str(e).splitlines()[0]}"]
    problems = [f"{os.path.basename(path)}: weight {key} is {value.dtype}, not float16 (fairseq-kd export --half)"
                for key, value in state.get("model", {}).items()
                if value.is_floating_point() and value.dtype != torch.float16][:3]
    cfg = state.get("cfg") or {}
    config = {"task": dict(cfg.get("task") or {}), "model": dict(cfg.get("model") or {})}
    problems += [f"{os.path.basename(path)}: cfg{where} is a path of the machine: {value}"
                 for where, value in absolute_paths(config, "")]
    return problems


def folder_problems(folder, model_file, max_bytes=None, machine_paths=(), files=FOLDER_FILES):
    """Why the folder ``folder`` cannot ship (an empty list: it can).

    It must hold ``model_file`` and ``files`` (a teacher's :data:`FOLDER_FILES`, a
    student's :data:`STUDENT_FILES`), nothing else; the model
    file at most ``max_bytes``, float16, loadable weights-only, no absolute path in
    its config; results files that name ``model_file`` by that name and hold no
    absolute path; and no file may contain any of ``machine_paths`` (the work
    folder, the repository, the home folder of the machine that wrote it).
    """
    expected = {model_file, *files}
    present = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    problems = [f"{name} is missing" for name in sorted(expected - present)]
    problems += [f"{name} should not be shipped (only {', '.join(sorted(expected))})"
                 for name in sorted(present - expected)]
    model = os.path.join(folder, model_file)
    if os.path.isfile(model):
        size = os.path.getsize(model)
        if max_bytes is not None and size > max_bytes:
            problems.append(f"{model_file} is {size / 2**20:.1f} MiB, over {max_bytes / 2**20:.1f} MiB")
        problems += model_problems(model)
    for name in RESULTS_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
        problems += [f"{name}: {where[1:]} is a path of the machine: {value}"
                     for where, value in absolute_paths(results, "")]
        problems += [f"{name}: system {s.get('name')} was scored from {s.get('checkpoint')}, not {model_file}"
                     for s in results.get("systems", []) if s.get("checkpoint") != model_file]
    for name in sorted(present & expected):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        problems += [f"{name} contains the path {path}" for path in machine_paths
                     if path and path != os.sep and path.encode() in data]
    return problems


def varint(data, i):
    """The protobuf varint at ``data[i:]`` and the index after it."""
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def encode_varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def proto_fields(data):
    """(field number, wire type, the field's bytes, its payload for length-delimited fields)
    of a serialized protobuf message, in order."""
    i = 0
    while i < len(data):
        start = i
        key, i = varint(data, i)
        number, wire, payload = key >> 3, key & 7, None
        if wire == 0:
            _, i = varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = varint(data, i)
            payload, i = data[i:i + size], i + size
        else:
            raise KDError(f"not a SentencePiece model: protobuf wire type {wire}")
        require(i <= len(data), "not a SentencePiece model: a truncated protobuf field")
        yield number, wire, data[start:i], payload


def length_delimited(number, payload):
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload


# sentencepiece_model.proto: ModelProto.trainer_spec = 2; TrainerSpec.input = 1, model_prefix = 2
TRAINER_SPEC, TRAINER_PATHS = 2, (1, 2)


def portable_spm_model(data):
    """A SentencePiece model (its serialized ``ModelProto``) without the paths of the machine
    that trained it: SentencePiece records its training files and output prefix in the
    model's ``trainer_spec``, kept here as file names.  Nothing that encodes or decodes
    changes (pieces, scores, normalizer are untouched)."""
    def trainer_spec(payload):
        return b"".join(length_delimited(number, os.path.basename(sub.decode("utf-8")).encode("utf-8"))
                        if number in TRAINER_PATHS and wire == 2 else field
                        for number, wire, field, sub in proto_fields(payload))

    return b"".join(length_delimited(number, trainer_spec(payload)) if number == TRAINER_SPEC and wire == 2
                    else field for number, wire, field, payload in proto_fields(data))


def write_portable_spm_model(path):
    """Rewrite the SentencePiece model ``path`` in place with :func:`portable_spm_model`."""
    with open(path, "rb") as f:
        data = portable_spm_model(f.read())
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


ABSOLUTE_PATH = re.compile(r"(?:(?<=^)|(?<=[\s=:'\"`(]))/[^\s:'\"`)]+")


def portable_text(text, roots):
    """``text`` with each absolute path made relative to the first of ``roots`` (the work
    folder, the repository) that holds it, else cut to its file name."""
    roots = sorted((os.path.abspath(r) for r in roots if r), key=len, reverse=True)

    def portable(match):
        path = match.group(0)
        for root in roots:
            if path == root:
                return "."
            if path.startswith(root.rstrip(os.sep) + os.sep):
                return os.path.relpath(path, root)
        return os.path.basename(path.rstrip(os.sep)) or path

    return ABSOLUTE_PATH.sub(portable, text)


# fairseq-train's log lines that say why a run stopped (fairseq_cli/train.py)
STOP_LINES = (
    (re.compile(r"early stop since valid performance hasn't improved for last (\d+) runs"),
     lambda m: f"early stopping: no better validation in {m.group(1)} validations (--patience {m.group(1)})"),
    (re.compile(r"Stopping training due to cumulative_training_time: [\d.]+ > stop_time_hours: ([\d.]+)"),
     lambda m: f"the clock: --stop-time-hours {m.group(1)} reached"),
    (re.compile(r"Stopping training due to num_updates: \d+ >= max_update: (\d+)"),
     lambda m: f"--max-update {m.group(1)} reached"),
    (re.compile(r"stop training as learning rate reached"), lambda m: "--stop-min-lr reached"),
)
DONE_LINE = re.compile(r"done training in [\d.]+ seconds")


def stop_reason(log, stale=None, patience=None):
    """Why the training that wrote the fairseq-train log ``log`` stopped.

    The last run in the log decides (a resumed run appends to it): the reason it
    logged, else (it finished without one) --max-epoch.  ``stale`` (epochs from the
    best checkpoint to the last) reaching ``patience`` is early stopping whatever the
    log says: fairseq counts --patience afresh in every run (translation_kd's checkpoints
    keep the count, older ones and other tasks do not), and the recipes do not resume a
    run whose best checkpoint is that old.
    """
    reason, pending = None, None
    with open(log, encoding="utf-8", errors="replace") as f:
        for line in f:
            for pattern, text in STOP_LINES:
                m = pattern.search(line)
                if m:
                    pending = text(m)
            if DONE_LINE.search(line):
                reason, pending = pending or "--max-epoch reached", None
    if patience and stale not in (None, "") and int(stale) >= int(patience):
        return (f"early stopping: no better validation in the {stale} epochs after the best "
                f"(--patience {patience})")
    return reason or "unknown: no run in the training log finished"


@dataclasses.dataclass
class StudentShipment:
    """What a shipped student's README says beyond what its files hold; the recipe's
    ``ship_students`` step fills it from its settings."""
    name: str  # the method (a name of the recipe's METHODS, or pruned_NAME)
    recipe: str
    step: str  # the recipe's step that trained it (students; prune for a pruned student)
    profile: str
    pair: str  # "es -> en"
    commit: str
    train_command: list  # fairseq-train's command line as the recipe ran it
    corpus: str  # what the student trained on, in words
    teacher: str  # the teacher it learned from, in words ("" for none: the baseline)
    model_args: str  # the student's model options (STUDENT_ARGS)
    checkpoint_choice: str  # the checkpoint used: best, last or avgN (the mean of the last N)
    stale: str  # epochs from the best checkpoint to the last ("" when unknown)
    patience: str  # --patience of the run ("" for none)
    machine: str
    jobs: str  # students trained at a time (STUDENT_JOBS)
    train_pairs: int
    vocab: int  # entries of the dictionary
    vocabulary: str  # where the SentencePiece model and dictionary come from, in words
    test: str  # the test reference, named without a path of the machine
    test_lines: int
    roots: tuple = ()  # folders whose paths become relative in the README (work, repository)


AVERAGED = re.compile(r"avg(\d+)")


def checkpoint_words(kind, label):
    """The checkpoint a student is used from (checkpoint_KIND.pt), in words."""
    if averaged := AVERAGED.fullmatch(kind):
        return f"the mean of its last {averaged.group(1)} checkpoints (`fairseq-kd average`)"
    return {"best": f"the one with the best valid {label}", "last": "the last one saved"}.get(kind, kind)


def checkpoint_facts(checkpoint, curve):
    """(epoch, updates, hours of fairseq's cumulative wall time) of a training checkpoint;
    the epoch from the log's validation at its updates, else from its data iterator."""
    from fairseq_kd.checkpoint import load_checkpoint_state

    state = load_checkpoint_state(checkpoint)
    extra = state.get("extra_state") or {}
    updates = (state.get("optimizer_history") or [{}])[-1].get("num_updates", 0)
    if updates in curve.validations:
        epoch = curve.validations[updates]["epoch"]
    else:  # saved at the end of its epoch, its iterator already at the next one
        epoch = ((extra.get("train_iterator") or {}).get("epoch", 1)) - 1
    return epoch, updates, extra.get("previous_training_time", 0.0) / 3600


# A model counts as pruned when more than this share of its parameters is zero: any model
# has a few exact zeros (float16 rounds the tiniest weights to 0), a pruned one has many.
PRUNED_ZEROS = 0.01


def is_pruned(system):
    """Whether a results entry is a pruned model (see PRUNED_ZEROS)."""
    return system.get("nonzero_params", system["params"]) < (1 - PRUNED_ZEROS) * system["params"]


def parameters_words(system):
    """A results entry's parameters, in words; a pruned model's non-zero ones too (its zeros
    are stored: the file is as large as the dense model's)."""
    words = f"{system['params'] / 1e6:.1f}M parameters"
    if is_pruned(system):
        nonzero = system["nonzero_params"]
        words += f", {nonzero / 1e6:.2f}M of them non-zero (pruned)"
    return words


def scores_line(system, decoding):
    d = system[decoding]
    return f"sacreBLEU {d['bleu']}, chrF {d['chrf']}, {d['sentences_per_s']} sentences/s"


def student_readme(folder, model_file, checkpoint, train_log, curve, s):
    """The README.md of a shipped student: its method and fairseq-train options, the
    checkpoint shipped and the training to it, its validation curve, why training stopped,
    the machine, its test scores (from the folder's results files) and its teacher.

    ``checkpoint`` is the training checkpoint the model file was exported from,
    ``train_log`` its fairseq-train log (``--log-format simple``) and ``curve`` that log
    read (:func:`fairseq_kd.curves.read_log`), ``s`` a :class:`StudentShipment`.  No path
    of the machine is written (``s.roots``).
    """
    from fairseq_kd.curves import best_point, logged_metric

    metric = logged_metric(curve)
    label = "BLEU" if metric == "bleu" else "loss"
    epoch, updates, wall_hours = checkpoint_facts(checkpoint, curve)
    update_hours = sum(stats.get("train_wall", 0.0) for e, stats in curve.epochs.items() if e <= epoch) / 3600
    points = curve.points(metric)
    best_update, best = best_point(curve, metric)
    last_update = points[-1][0]
    by_epoch = {}
    for _, stats in sorted(curve.validations.items()):
        by_epoch[stats["epoch"]] = stats[metric]  # the last validation of each epoch
    at_checkpoint = curve.validations.get(updates, {}).get(metric)
    results = read_results(os.path.join(folder, "evaluation.json"))
    check = read_results(os.path.join(folder, "evaluation.check.json"))
    system, checked = results["systems"][0], check["systems"][0]
    require(system["name"] == s.name == checked["name"],
            f"{folder}: its results files score {system['name']} and {checked['name']}, not {s.name}")
    command = portable_text(shlex.join(s.train_command), s.roots)
    choice = checkpoint_words(s.checkpoint_choice, label)
    averaged = AVERAGED.fullmatch(s.checkpoint_choice) is not None
    teacher = portable_text(s.teacher, s.roots) if s.teacher else "none: no KD, the gold targets only"
    rows = [
        ("method", f"`{s.name}`: trained on {portable_text(s.corpus, s.roots)}"),
        ("teacher it learned from", teacher),
        ("fairseq-train", f"`{command}`"),
        ("model", f"`{s.model_args}`, {parameters_words(system)}, stored as float16 "
                  f"(`fairseq-kd export --half --portable`)"),
        ("data", f"{s.train_pairs} training pairs, encoded by `spm.model` and `dict.txt` ({s.vocab} "
                 f"entries): {portable_text(s.vocabulary, s.roots)}"),
        ("checkpoint", f"`checkpoint_{s.checkpoint_choice}.pt`, {choice} (the one the recipe's export and "
                       f"evaluate steps use too): {'the newest of them at ' if averaged else ''}"
                       f"epoch {epoch}, {updates} updates"
                       + (f", valid {label} {at_checkpoint:.2f}" if at_checkpoint is not None and not averaged
                          else "")),
        ("training to it", f"{update_hours:.2f} h in training updates (fairseq's `train_wall`, validation "
                           f"excluded), {wall_hours:.2f} h of fairseq's cumulative wall time; the students "
                           f"trained {s.jobs} at a time on the machine (STUDENT_JOBS={s.jobs})"),
        ("machine", s.machine),
        (f"valid {label}", f"best {best:.2f}, first reached at update {best_update} (epoch "
                           f"{curve.validations[best_update]['epoch']}); "
                           f"last validation at update {last_update} (epoch "
                           f"{curve.validations[last_update]['epoch']}), "
                           f"{sum(u > best_update for u, _ in points)} after the best"),
        (f"valid {label} by epoch", ", ".join(f"{v:.2f}" for _, v in sorted(by_epoch.items()))),
        ("stopped by", stop_reason(train_log, s.stale, s.patience)),
    ]
    rows += [("test, greedy", scores_line(system, "greedy")),
             (f"test, beam {system['beam']['beam']}", scores_line(system, "beam"))]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""# Student: {s.name}, {s.recipe}, PROFILE={s.profile} ({s.pair})

Trained by `PROFILE={s.profile} recipes/{s.recipe}/run.sh` (its `{s.step}` step) with the settings
below; shipped on {datetime.date.today()} by `run.sh ship_students` at git {s.commit}.

| | |
|---|---|
{table}

Test: `{s.test}`, {s.test_lines} sentences, scored from this folder's `{model_file}` by stock
fairseq (no plugin) on {results['device']}: `evaluation.json`.
BLEU signature `{results['bleu_signature']}`.
`evaluation.check.json`: the first {checked['sentences']} test pairs scored the same way from this
folder alone (greedy BLEU {checked['greedy']['bleu']}, beam BLEU {checked['beam']['bleu']}), which
`tests/test_shipped_students.py` reproduces from a clean clone.
`training.json`: the validations above and the hours in training updates, as data
(`fairseq-kd curves --log {s.name}=training.json`; a study adopts this student with `STUDENTS_FROM`).
"""


def write_training_record(folder, curve, s):
    """``folder``/training.json: the student's curve, read from its fairseq-train log
    (:func:`fairseq_kd.curves.training_record`), validation BLEU when it was logged."""
    from fairseq_kd.curves import LOG_SOURCE, write_record

    write_record(os.path.join(folder, TRAINING_RECORD), curve, f"checkpoint_{s.checkpoint_choice}.pt", LOG_SOURCE)


def finish_student_folder(folder, model_file, checkpoint, train_log, shipment, machine_paths=()):
    """Finish the folder of a student being shipped, once its model file, vocabulary and
    results files are in it: the results files made portable (:func:`portable_results`),
    README.md (:func:`student_readme`) and training.json (:func:`write_training_record`)
    written, then the folder checked
    (:func:`folder_problems`, every problem in one :class:`KDError`).  Returns the README."""
    from fairseq_kd.curves import read_log

    for name in RESULTS_FILES:
        portable_results(os.path.join(folder, name))
    curve = read_log(train_log, shipment.name)  # the README and training.json, from one reading
    readme = student_readme(folder, model_file, checkpoint, train_log, curve, shipment)
    write_atomic(os.path.join(folder, "README.md"), readme)
    write_training_record(folder, curve, shipment)
    problems = folder_problems(folder, model_file, machine_paths=machine_paths, files=STUDENT_FILES)
    require(not problems, f"{folder} is not fit to ship:\n  " + "\n  ".join(problems))
    return readme
