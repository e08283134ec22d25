"""Translate raw text with a model folder of fairseq-kd export --format ctranslate2.

Reads raw sentences, one a line (--input files, or stdin), applies the
folder's SentencePiece model, translates with CTranslate2 (beam search, or
greedy with --beam 1) and writes the detokenized translations, one a line in
input order (--output, or stdout; an empty line gives an empty line).
An input longer than the model's maximum source length (in pieces) is
translated from its first pieces only; how many were is said on stderr at
the end, and --refuse-long makes such an input an error instead.
Neither fairseq nor torch is loaded.

  fairseq-kd translate --model student_ct2 < input.es > output.en
  fairseq-kd translate --model student_ct2 --input test.es --output test.en --beam 1 --threads 4
"""
import os
import sys
import time

from fairseq_kd.errors import KDError, require

# Why translate and evaluate bound the output length more tightly than fairseq-kd corpus
# (part of both commands' --max-len-a help).
MAX_LEN_WHY = ("This bound stops a poorly trained student that repeats itself long before "
               "fairseq-generate's default of 200 tokens, so such runaway output does not dominate "
               "the time taken; fairseq-kd corpus keeps fairseq-generate's 0 x source + 200 so that "
               "its output is stock fairseq-generate's (the recipes pass one MAX_LEN_A/MAX_LEN_B, "
               "1.5 and 10 by default, to corpus and evaluate).")

USES_FAIRSEQ = False


def add_arguments(p):
    p.add_argument("--model", required=True, help="model folder (fairseq-kd export --format ctranslate2)")
    p.add_argument("--input", nargs="*", default=None, help="input files (default: stdin)")
    p.add_argument("--output", help="output file (default: stdout)")
    p.add_argument("--beam", type=int, default=5, help="beam size; 1 is greedy (default: %(default)s)")
    p.add_argument("--lenpen", type=float, default=1.0, help="length penalty (default: %(default)s)")
    p.add_argument("--max-len-a", type=float, default=1.5,
                   help=f"translations stop at a * source pieces + b (default: %(default)s). {MAX_LEN_WHY}")
    p.add_argument("--max-len-b", type=int, default=10, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sentences per batch (default: 24 on CPU, 128 on CUDA)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU: batches translated at once, one thread each (default: %(default)s = all cores)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where CTranslate2 translates (default: %(default)s)")
    p.add_argument("--refuse-long", action="store_true",
                   help="fail (translating nothing) when an input is longer than the model's maximum "
                   "source length in pieces, instead of translating its first pieces and saying so")
    p.add_argument("--no-progress-bar", action="store_true",
                   help="no progress bar (one is shown on stderr when reading --input files)")


def read_inputs(paths):
    """Lines of the input files (or stdin), without their newlines."""
    if not paths:
        return sys.stdin.read().splitlines()
    lines = []
    for path in paths:
        require(os.path.isfile(path), f"--input: file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                lines += f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise KDError(f"--input: cannot read {path} as UTF-8 text ({type(e).__name__})") from e
    return lines


def run(args):
    from tqdm import tqdm

    from fairseq_kd.deploy.ct2 import ModelFolder, default_batch_size, load_translator
    from fairseq_kd.processes import usable_cores

    require(args.beam >= 1, f"--beam must be >= 1, got {args.beam}")
    if args.batch_size is None:
        args.batch_size = default_batch_size(args.device)
    require(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    folder = ModelFolder(args.model)
    lines = read_inputs(args.input)
    pieces = folder.encode(lines)
    long = folder.too_long(pieces)
    if long and args.refuse_long:
        raise KDError(f"--refuse-long: {len(long)} of {len(lines)} inputs are longer than the model's maximum "
                      f"of {folder.max_source} pieces (the first is line {long[0] + 1}, "
                      f"{len(pieces[long[0]])} pieces)")
    threads = args.threads or usable_cores()
    translator = load_translator(folder.path, args.device, threads=1,
                                 parallel=threads if args.device == "cpu" else 1)
    started = time.perf_counter()
    with tqdm(total=len(lines), unit="sent", disable=args.no_progress_bar or not args.input or None,
              file=sys.stderr) as bar:
        out = folder.translate_pieces(translator, pieces, args.batch_size, progress=bar.update, beam=args.beam,
                                      lenpen=args.lenpen, max_len_a=args.max_len_a, max_len_b=args.max_len_b)
    seconds = time.perf_counter() - started
    text = "".join(line + "\n" for line in out)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"translated {len(lines)} lines in {seconds:.1f}s ({len(lines) / max(seconds, 1e-9):.1f} "
              f"sentences/s) -> {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if long:  # on stderr, last: where a user sees it after the progress bar and the speed
        print(folder.truncation_note(len(long), len(lines)), file=sys.stderr)
    return 0
