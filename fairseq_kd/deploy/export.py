"""A student checkpoint that stock fairseq and CTranslate2's converter load without the plugin.

The exported file holds the student's weights, its model hyper-parameters as
fairseq's plain ``transformer`` architecture (every value explicit, so
``transformer_student_*`` presets are not needed) and a ``translation`` task
config, all as plain Python containers (loadable by torch's weights-only
unpickler, i.e. by stock fairseq under torch >= 2.6).  Dropped: optimizer
state, criterion parameters (gates, projections), the plugin's task and
criterion options, training options, and the trainer's progress.  Only the
minimal bookkeeping fairseq's loader requires is kept.

It also keeps the model's dictionaries (their symbols, under
``state["fairseq_kd"]["dictionaries"]``, an entry stock fairseq never reads):
a fairseq checkpoint stores only embedding sizes, and once the data folder it
was trained on is gone nothing else says which symbol each row embeds.  The
teacher check (:mod:`fairseq_kd.teacher`) compares them with a student's.
"""
import argparse
import os
from collections import OrderedDict
from dataclasses import fields

import torch

from fairseq_kd.errors import KDError, require

# Set by fairseq's base_architecture but not declared by TransformerModel.add_args.
EXTRA_MODEL_KEYS = ("decoder_input_dim",)
# The plugin's own entry of an exported checkpoint; stock fairseq ignores unknown entries.
PLUGIN_KEY = "fairseq_kd"
SIDES = ("src", "tgt")
# Which embedding holds each side's vocabulary (a fairseq encoder-decoder).
EMBEDDINGS = {"src": "encoder.embed_tokens.weight", "tgt": "decoder.embed_tokens.weight"}
SIDE_NAMES = {"src": "source", "tgt": "target"}


def transformer_hyperparameters(model_cfg):
    """The student's ``transformer`` hyper-parameters, all explicit, as a plain dict."""
    from fairseq.models import ARCH_MODEL_REGISTRY
    from fairseq.models.transformer import TransformerModel, base_architecture

    values = vars(model_cfg) if isinstance(model_cfg, argparse.Namespace) else dict(model_cfg)
    arch = values.get("arch") or values.get("_name")
    require(ARCH_MODEL_REGISTRY.get(arch) is TransformerModel,
            f"only fairseq transformer students can be exported (this checkpoint's arch is {arch})")
    parser = argparse.ArgumentParser(add_help=False)
    TransformerModel.add_args(parser)
    declared = {a.dest for a in parser._actions} | set(EXTRA_MODEL_KEYS)
    ns = argparse.Namespace(**{k: v for k, v in values.items() if k in declared})
    base_architecture(ns)  # fill anything left implicit with fairseq's defaults
    hparams = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(ns).items()}
    hparams.update(_name="transformer", arch="transformer")
    return hparams


def translation_task_config(task_cfg):
    """The task config reduced to fairseq's own ``translation`` options."""
    from fairseq.tasks.translation import TranslationConfig

    values = vars(task_cfg) if isinstance(task_cfg, argparse.Namespace) else dict(task_cfg)
    known = {f.name for f in fields(TranslationConfig)}
    config = {k: v for k, v in values.items() if k in known}
    config["_name"] = "translation"
    return config


def converter_model_config(hparams, task_config):
    """``cfg["model"]`` as both fairseq and CTranslate2's fairseq converter read it.

    fairseq reads the entries (a mapping); CTranslate2's converter reads
    ``checkpoint["cfg"]["model"]`` as a legacy ``Namespace`` (attributes,
    including ``task`` and the task's options, which it sets and passes to
    ``fairseq.tasks.setup_task``).  An ``OrderedDict`` is both: its entries
    are the model's hyper-parameters, its attributes those plus the task's,
    and torch's weights-only unpickler restores an ``OrderedDict``'s
    attributes (state dicts keep their ``_metadata`` there), so the file
    stays loadable without allow-listing any class.
    """
    config = OrderedDict(hparams)
    for key, value in {**task_config, **hparams, "task": "translation"}.items():
        setattr(config, key, value)
    return config


def half_precision(weights):
    """Floating-point tensors as float16, others unchanged: half the file size.

    fairseq builds the model in float32 and ``load_state_dict`` copies the
    float16 values into it, so inference sees each weight rounded to 11
    significant bits (relative error <= 2^-11) and nothing else changes.
    Tied weights (shared embeddings: one storage in a CPU checkpoint, equal
    copies in one saved from fp16) become one float16 tensor, which
    ``torch.save`` stores once.
    """
    out, seen = {}, {}  # seen: shape -> [(float32 tensor, its float16 tensor)]
    for key, value in weights.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        same_shape = seen.setdefault(tuple(value.shape), [])
        tied = next((h for v, h in same_shape if v is value or torch.equal(v, value)), None)
        out[key] = tied if tied is not None else value.half()
        if tied is None:
            same_shape.append((value, out[key]))
    return out


# ------------------------------------------------------------- dictionaries
def dictionary_files_in(folder, src, tgt):
    """``{"src": file, "tgt": file}``: ``folder``'s dict.SRC.txt and dict.TGT.txt, else its
    joined dict.txt for both sides (as examples/teacher ships it); None when it has neither."""
    if not folder or not os.path.isdir(folder):
        return None
    per_language = [os.path.join(folder, f"dict.{lang}.txt") for lang in (src, tgt) if lang]
    if len(per_language) == 2 and all(map(os.path.isfile, per_language)):
        return dict(zip(SIDES, per_language))
    joined = os.path.join(folder, "dict.txt")
    return dict.fromkeys(SIDES, joined) if os.path.isfile(joined) else None


def describe_files(files):
    """How messages name a ``{"src": file, "tgt": file}`` pair (one file when joined)."""
    return files["src"] if files["src"] == files["tgt"] else f"{files['src']} and {files['tgt']}"


def read_symbols(dict_file):
    """The symbols of a fairseq dictionary file, in index order (fairseq's specials first)."""
    from fairseq.data import Dictionary

    require(os.path.isfile(dict_file), f"dictionary file not found: {dict_file}")
    try:
        return Dictionary.load(dict_file).symbols
    except Exception as e:  # fairseq raises ValueError, RuntimeError or a bare Exception
        raise KDError(f"{dict_file} is not a fairseq dictionary: {str(e).strip().splitlines()[0]}") from e


def symbols_of_files(files):
    """``{"src": symbols, "tgt": symbols}`` of dictionary files; a joined file is read once
    and both sides share its list (pickled once in an export)."""
    src = read_symbols(files["src"])
    return {"src": src, "tgt": src if files["tgt"] == files["src"] else read_symbols(files["tgt"])}


def embedded_dictionaries(state):
    """The ``{"src": symbols, "tgt": symbols}`` an export embeds, or None (any other checkpoint)."""
    found = (state.get(PLUGIN_KEY) or {}).get("dictionaries")
    if found is None:
        return None
    require(isinstance(found, dict) and all(isinstance(found.get(s), list) for s in SIDES),
            f"the checkpoint's {PLUGIN_KEY} entry holds no source and target symbol lists")
    return found


def checkpoint_languages(task_cfg, folder, langs=(None, None)):
    """(source, target) languages: ``langs`` where given, else the checkpoint's task's,
    else as named by ``folder``'s binarized files (None where none tells)."""
    from fairseq.data import data_utils

    src = langs[0] or task_cfg.get("source_lang")
    tgt = langs[1] or task_cfg.get("target_lang")
    if not (src and tgt) and folder and os.path.isdir(folder):
        src, tgt = data_utils.infer_language_pair(folder)
    return src, tgt


def checkpoint_dictionaries(state, cfg, data=None, langs=(None, None)):
    """(where from, ``{"src": symbols, "tgt": symbols}``) of the dictionaries to embed in an
    export of ``state``, or None when none can be found.

    In order: the folder ``data`` (the user's ``--data``; it must hold them), the
    dictionaries ``state`` already embeds (re-exporting an export), and the data
    folder the checkpoint was trained on.  ``langs``: (source, target) named by
    the user.  They must have one symbol per row of the model's embeddings.
    """
    if data:
        src, tgt = checkpoint_languages(cfg.task, data, langs)
        files = dictionary_files_in(data, src, tgt)
        require(files, f"--data {data} holds neither dict.{src or 'SRC'}.txt and dict.{tgt or 'TGT'}.txt "
                       f"nor dict.txt{'' if src and tgt else ' (or give -s and -t)'}")
        found = describe_files(files), symbols_of_files(files)
    elif embedded_dictionaries(state) is not None:
        found = "embedded in the checkpoint", embedded_dictionaries(state)
    else:
        folder = str(cfg.task.get("data") or "").split(os.pathsep)[0]
        files = dictionary_files_in(folder, *checkpoint_languages(cfg.task, folder, langs))
        if files is None:
            return None
        found = describe_files(files), symbols_of_files(files)
    origin, symbols = found
    for side in SIDES:
        weight = state["model"].get(EMBEDDINGS[side])
        require(weight is None or weight.size(0) == len(symbols[side]),
                f"the {SIDE_NAMES[side]} dictionary ({origin}) has {len(symbols[side])} entries but "
                f"the model embeds {weight.size(0) if weight is not None else 0}: not this model's "
                f"dictionary (give --data with the right ones)")
    return origin, symbols


def write_dictionary_files(symbols, folder, src, tgt):
    """Write ``{"src": symbols, "tgt": symbols}`` (an export's embedded dictionaries) back
    as fairseq dictionary files ``folder``/dict.SRC.txt and dict.TGT.txt, which the
    CTranslate2 converter reads; returns ``folder``.

    Each file must load back to exactly its symbols, in order: fairseq's four specials
    first, each later repeat of a symbol flagged ``#fairseq:overwrite`` as fairseq
    itself writes it.  Counts are not embedded (every entry gets 1); nothing that
    translates reads them.
    """
    from fairseq.data import Dictionary

    specials = Dictionary().symbols
    for side, lang in zip(SIDES, (src, tgt)):
        entries = list(symbols[side])
        require(entries[:len(specials)] == specials,
                f"the embedded {SIDE_NAMES[side]} dictionary does not start with fairseq's specials "
                f"{specials}: give --data with its dictionary files")
        seen, lines = set(specials), []
        for symbol in entries[len(specials):]:
            lines.append(f"{symbol} 1" + (" #fairseq:overwrite" if symbol in seen else ""))
            seen.add(symbol)
        path = os.path.join(folder, f"dict.{lang}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        require(Dictionary.load(path).symbols == entries,
                f"the embedded {SIDE_NAMES[side]} dictionary cannot be written back as a fairseq "
                f"dictionary file: give --data with its dictionary files")
    return folder


def with_dictionaries(exported, symbols):
    """``exported`` carrying ``{"src": symbols, "tgt": symbols}`` in its plugin entry."""
    src = list(symbols["src"])
    tgt = src if list(symbols["tgt"]) == src else list(symbols["tgt"])  # joined: pickled once
    exported[PLUGIN_KEY] = {"dictionaries": {"src": src, "tgt": tgt}}
    return exported


# ------------------------------------------------------------------- export
def without_machine_paths(config):
    """``config`` with every value that is an absolute path set to None: the paths of the
    machine that trained the model (the task's data folder, which fairseq's tools never read
    from a checkpoint they are given a data folder for; pretrained embedding files)."""
    return {key: None if isinstance(value, str) and os.path.isabs(value.split(os.pathsep)[0]) else value
            for key, value in config.items()}


def export_state(state, half=False, portable=False):
    """A loadable, inference-only checkpoint dict built from a training checkpoint
    (``half``: floating-point weights stored as float16; ``portable``: no path of this
    machine in it, :func:`without_machine_paths`)."""
    from omegaconf import OmegaConf

    from fairseq_kd.checkpoint import checkpoint_cfg

    cfg = checkpoint_cfg(state)
    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    task = translation_task_config(plain["task"])
    hparams = transformer_hyperparameters(plain["model"])
    if portable:
        task, hparams = without_machine_paths(task), without_machine_paths(hparams)
    num_updates = (state.get("optimizer_history") or [{}])[-1].get("num_updates", 0)
    return {
        # CTranslate2's converter reads checkpoint["args"] first (None: use cfg)
        "args": None,
        "cfg": {"_name": None, "model": converter_model_config(hparams, task),
                "task": task},
        "model": half_precision(state["model"]) if half else dict(state["model"].items()),
        # fairseq's loader requires these two entries; they carry no training state.
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": None,
                               "lr_scheduler_state": {}, "num_updates": num_updates}],
        "extra_state": {"train_iterator": None},
    }


def write_export(path, out, half=False, data=None, langs=(None, None), portable=False):
    """Export checkpoint ``path`` to ``out`` with its dictionaries when they can be
    found (``data``: the folder holding them, ``langs``: its (source, target)
    languages; see :func:`checkpoint_dictionaries`); ``half`` and ``portable`` as
    :func:`export_state`.

    Returns (training state, exported state, where the dictionaries came from or None).
    """
    from fairseq_kd.checkpoint import checkpoint_cfg, load_checkpoint_state

    state = load_checkpoint_state(path)
    exported = export_state(state, half, portable)
    dictionaries = checkpoint_dictionaries(state, checkpoint_cfg(state), data, langs)
    if dictionaries is not None:
        with_dictionaries(exported, dictionaries[1])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(exported, out)
    torch.load(out, map_location="cpu", weights_only=True)  # stock fairseq's loader must accept it
    return state, exported, dictionaries and dictionaries[0]
