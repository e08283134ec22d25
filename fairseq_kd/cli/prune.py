"""Magnitude-prune a student checkpoint's linear (and optionally embedding) weights to a ratio.

Writes OUT (the checkpoint with the pruned weights zeroed and no optimizer
state) and OUT's mask file (default: OUT with .mask.pt), and prints the
sparsity of every pruned tensor.  Retrain with the mask held:

  fairseq-train DATA --user-dir fairseq_kd --task translation_kd \\
      --prune-mask OUT.mask.pt --restore-file OUT --reset-optimizer ...

--class-blind (default) ranks all selected weights together (Kim & Rush
2016's choice); --per-layer prunes every tensor to the ratio.
"""
import os

from fairseq_kd.errors import require


def add_arguments(p):
    p.add_argument("--path", required=True, help="student checkpoint")
    p.add_argument("--ratio", type=float, required=True, help="fraction of the selected weights to zero, in [0, 1)")
    p.add_argument("--out", required=True, help="pruned checkpoint to write")
    p.add_argument("--mask-out", default=None, help="mask file (default: OUT without .pt + .mask.pt)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--class-blind", dest="per_layer", action="store_false",
                      help="one global magnitude threshold (default)")
    mode.add_argument("--per-layer", dest="per_layer", action="store_true",
                      help="prune every weight tensor to the ratio")
    p.set_defaults(per_layer=False)
    p.add_argument("--include-embeddings", action="store_true",
                   help="prune the embeddings (and tied output projection) too")


def mask_path(out, mask_out=None):
    if mask_out:
        return mask_out
    stem = out[:-3] if out.endswith(".pt") else out
    return stem + ".mask.pt"


def check_output_paths(args):
    """The checkpoint, the pruned checkpoint and the mask are three files: one
    written over another would silently lose it."""
    path, out, mask = (os.path.abspath(p) for p in (args.path, args.out, mask_path(args.out, args.mask_out)))
    require(out != path, "--out must differ from --path")
    require(mask != out, f"--mask-out must differ from --out ({args.out})")
    require(mask != path, f"--mask-out must differ from --path ({args.path})")


def format_report(rows):
    width = max(len(name) for name, *_ in rows)
    lines = [f"{'tensor':<{width}}  {'weights':>9}  {'zeros':>9}  sparsity"]
    for name, n, zeros in rows:
        lines.append(f"{name:<{width}}  {n:>9}  {zeros:>9}  {zeros / n:8.4f}")
    total, zeros = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines.append(f"{'total':<{width}}  {total:>9}  {zeros:>9}  {zeros / total:8.4f}")
    return "\n".join(lines)


def run(args):
    import torch

    from fairseq_kd.checkpoint import load_checkpoint_state
    from fairseq_kd.pruning import apply_masks, magnitude_masks, prunable_weights, sparsity_report

    check_output_paths(args)
    state = load_checkpoint_state(args.path)
    model_cfg = state["cfg"].get("model") if state.get("cfg") is not None else None
    weights = prunable_weights(state["model"], args.include_embeddings, model_cfg)
    require(weights, f"{args.path}: no linear weights found to prune")
    masks = magnitude_masks(weights, args.ratio, args.per_layer)
    apply_masks(state["model"], masks, model_cfg)
    # A pruned model is retrained from a fresh optimizer: old moments would move pruned weights.
    state.pop("last_optimizer_state", None)
    # fairseq restores the training time even with --reset-*: without this, a retraining
    # under --stop-time-hours would count the original training and stop at once.
    if state.get("extra_state"):
        state["extra_state"].pop("previous_training_time", None)
    state["cfg"] = state["cfg"] and _plain(state["cfg"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(state, args.out)
    torch.save(masks, mask_path(args.out, args.mask_out))
    mode = "per layer" if args.per_layer else "class-blind"
    print(format_report(sparsity_report(weights)))
    print(f"pruned {args.ratio:.2%} ({mode}) of {len(weights)} tensors; wrote {args.out} and "
          f"{mask_path(args.out, args.mask_out)}")
    return 0


def _plain(cfg):
    """The omegaconf config back to the containers fairseq saved (its Namespaces kept)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg) if OmegaConf.is_config(cfg) else cfg
