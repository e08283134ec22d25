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


def run(args):
    from fairseq_kd.pruning import format_report, prune_checkpoint, save_pruned, sparsity_report

    check_output_paths(args)
    state, masks, weights = prune_checkpoint(args.path, args.ratio, args.per_layer, args.include_embeddings)
    save_pruned(state, masks, args.out, mask_path(args.out, args.mask_out))
    mode = "per layer" if args.per_layer else "class-blind"
    print(format_report(sparsity_report(weights)))
    print(f"pruned {args.ratio:.2%} ({mode}) of {len(weights)} tensors; wrote {args.out} and "
          f"{mask_path(args.out, args.mask_out)}")
    return 0
