"""A student checkpoint that stock fairseq and CTranslate2's converter load without the plugin.

The exported file holds the student's weights, its model hyper-parameters as
fairseq's plain ``transformer`` architecture (every value explicit, so
``transformer_student_*`` presets are not needed) and a ``translation`` task
config, all as plain Python containers (loadable by torch's weights-only
unpickler, i.e. by stock fairseq under torch >= 2.6).  Dropped: optimizer
state, criterion parameters (gates, projections), the plugin's task and
criterion options, training options, and the trainer's progress.  Only the
minimal bookkeeping fairseq's loader requires is kept.
"""
import argparse
from collections import OrderedDict
from dataclasses import fields

import torch

from fairseq_kd.errors import require

# Set by fairseq's base_architecture but not declared by TransformerModel.add_args.
EXTRA_MODEL_KEYS = ("decoder_input_dim",)


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


def export_state(state, half=False):
    """A loadable, inference-only checkpoint dict built from a training checkpoint
    (``half``: floating-point weights stored as float16)."""
    from omegaconf import OmegaConf

    from fairseq_kd.checkpoint import checkpoint_cfg

    cfg = checkpoint_cfg(state)
    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    task = translation_task_config(plain["task"])
    num_updates = (state.get("optimizer_history") or [{}])[-1].get("num_updates", 0)
    return {
        # CTranslate2's converter reads checkpoint["args"] first (None: use cfg)
        "args": None,
        "cfg": {"_name": None, "model": converter_model_config(transformer_hyperparameters(plain["model"]), task),
                "task": task},
        "model": half_precision(state["model"]) if half else dict(state["model"].items()),
        # fairseq's loader requires these two entries; they carry no training state.
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": None,
                               "lr_scheduler_state": {}, "num_updates": num_updates}],
        "extra_state": {"train_iterator": None},
    }


def write_export(path, out, half=False):
    """Export checkpoint ``path`` to ``out``; returns (training state, exported state)."""
    import os

    import torch

    from fairseq_kd.checkpoint import load_checkpoint_state

    state = load_checkpoint_state(path)
    exported = export_state(state, half)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(exported, out)
    torch.load(out, map_location="cpu", weights_only=True)  # stock fairseq's loader must accept it
    return state, exported
