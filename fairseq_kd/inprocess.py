"""fairseq's training objects built in process, and randomly initialised checkpoints.

For code that needs a task, a model and a criterion without running
``fairseq-train`` (the benchmarks, the tests): they are built exactly as
``fairseq-train`` builds them, from its command-line arguments.  The cost of
a training step does not depend on the weights, so a random teacher saved
as the trainer saves checkpoints serves step-cost measurements.
"""
import os

# the package itself, as fairseq's --user-dir
USER_DIR = os.path.dirname(os.path.abspath(__file__))


def build_training(data_bin, *args):
    """(cfg, task, model, criterion) built in process exactly as fairseq-train would (on CPU)."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    ns = options.parse_args_and_arch(
        parser, [str(data_bin), "--user-dir", USER_DIR, "--cpu", *map(str, args)]
    )
    cfg = convert_namespace_to_omegaconf(ns)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return cfg, task, model, criterion


def transformer_args(layers, heads, dim=32):
    """Arguments of a vanilla fairseq transformer with ``layers`` encoder and decoder layers."""
    return ["--arch", "transformer", "--share-all-embeddings",
            "--encoder-layers", layers, "--decoder-layers", layers,
            "--encoder-embed-dim", dim, "--decoder-embed-dim", dim,
            "--encoder-ffn-embed-dim", 2 * dim, "--decoder-ffn-embed-dim", 2 * dim,
            "--encoder-attention-heads", heads, "--decoder-attention-heads", heads]


def random_model(data_bin, layers, heads, seed=0, dim=32, *extra):
    """(cfg, task, model): a randomly initialised transformer (``extra``: more model options)."""
    import torch

    torch.manual_seed(seed)
    cfg, task, model, _ = build_training(data_bin, "--task", "translation",
                                         *transformer_args(layers, heads, dim), *extra)
    return cfg, task, model


def save_random_checkpoint(data_bin, path, layers, heads, seed=0, dim=32, *extra):
    """A randomly initialised transformer saved as fairseq's trainer saves checkpoints."""
    import torch
    from omegaconf import OmegaConf

    cfg, _, model = random_model(data_bin, layers, heads, seed, dim, *extra)
    torch.save({
        "args": None, "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "model": model.state_dict(),
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "adam",
                               "lr_scheduler_state": {}, "num_updates": 0}],
        "extra_state": {"train_iterator": {"epoch": 1}},
    }, path)
    return path
