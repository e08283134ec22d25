"""Write a student checkpoint that stock fairseq loads without --user-dir (no training-only state).

The exported file holds the student's weights, its model hyper-parameters as
fairseq's plain ``transformer`` architecture (every value explicit, so
``transformer_student_*`` presets are not needed) and a ``translation`` task
config, all as plain Python containers (loadable by torch's weights-only
unpickler, i.e. by stock fairseq under torch >= 2.6).  Dropped: optimizer
state, criterion parameters (gates, projections), the plugin's task and
criterion options, training options, and the trainer's progress.  Only the
minimal bookkeeping fairseq's loader requires is kept.

  fairseq-kd export --path student/checkpoint_best.pt --out student.pt
  fairseq-generate DATA --path student.pt --task translation --required-batch-size-multiple 1 ...
"""
import argparse
import os
from dataclasses import fields

from fairseq_kd.errors import require

# Set by fairseq's base_architecture but not declared by TransformerModel.add_args.
EXTRA_MODEL_KEYS = ("decoder_input_dim",)


def add_arguments(p):
    p.add_argument("--path", required=True, help="student checkpoint (from fairseq-train)")
    p.add_argument("--out", required=True, help="exported checkpoint to write")


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


def export_state(state):
    """A loadable, inference-only checkpoint dict built from a training checkpoint."""
    from omegaconf import OmegaConf

    from fairseq_kd.checkpoint import checkpoint_cfg

    cfg = checkpoint_cfg(state)
    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    model = {k: v for k, v in state["model"].items()}
    num_updates = (state.get("optimizer_history") or [{}])[-1].get("num_updates", 0)
    return {
        "cfg": {"_name": None, "model": transformer_hyperparameters(plain["model"]),
                "task": translation_task_config(plain["task"])},
        "model": model,
        # fairseq's loader requires these two entries; they carry no training state.
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": None,
                               "lr_scheduler_state": {}, "num_updates": num_updates}],
        "extra_state": {"train_iterator": None},
    }


def run(args):
    import torch

    from fairseq_kd.checkpoint import load_checkpoint_state

    require(os.path.abspath(args.out) != os.path.abspath(args.path), "--out must differ from --path")
    state = load_checkpoint_state(args.path)
    exported = export_state(state)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(exported, args.out)
    torch.load(args.out, map_location="cpu", weights_only=True)  # stock fairseq's loader must accept it
    dropped = sorted(k for k in state if k not in exported and state[k] is not None)
    before, after = os.path.getsize(args.path), os.path.getsize(args.out)
    print(f"wrote {args.out}: {after / 1e6:.2f} MB (was {before / 1e6:.2f} MB, "
          f"{after / before:.1%}); dropped {', '.join(dropped) or 'nothing'}; "
          f"arch transformer, task translation")
    return 0
