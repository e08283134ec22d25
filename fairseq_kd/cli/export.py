"""Write a student checkpoint that stock fairseq loads without --user-dir (no training-only state).

--format fairseq (default) writes one checkpoint file: the student's weights,
its hyper-parameters as fairseq's plain ``transformer`` architecture and a
``translation`` task config, as plain Python containers (loadable by torch's
weights-only unpickler, i.e. by stock fairseq under torch >= 2.6, and by
CTranslate2's stock ``ct2-fairseq-converter``).  Dropped: optimizer state,
criterion parameters, the plugin's options, training options and progress.
Kept besides: the model's dictionaries (their symbols, from --data, else from
the data folder it was trained on), which stock fairseq ignores and
``--teacher-path`` compares with a student's when the file serves as a
teacher (the data folder may be long gone by then).

  fairseq-kd export --path student/checkpoint_best.pt --out student.pt
  fairseq-generate DATA --path student.pt --task translation --required-batch-size-multiple 1 ...

--half stores the weights as float16 and --portable leaves out every path of
this machine (the training data folder): the recipes' ship and ship_students
steps export what they ship with both.

--format ctranslate2 writes a model folder to ship: the CTranslate2 model
(--quantization), the SentencePiece model (--spm-model) and fairseq_kd.json
(languages, how it was made).  ``fairseq-kd translate --model OUT`` then
translates raw text with it, without fairseq or torch.  The converter reads the
model's dictionaries from --data, else from those the checkpoint embeds (a
fairseq-kd export, like the teacher and students shipped in examples/, converts
from its file alone), else from the data folder it was trained on.

  fairseq-kd export --path student/checkpoint_best.pt --format ctranslate2 --quantization int8 \\
      --data DATA --spm-model pieces/spm.model --out student_ct2

A quantized export (any --quantization but float32) is checked before it is
moved into place: the first --check-lines lines of the binarized split
--check-split of the data folder (default: the first 500 of valid, when the
folder has it) are translated by the float32 conversion and by the new
model with the same beam, length penalty and maximum length, and scored
with sacreBLEU against the split's target side.  The model fails when it
loses more than --check-margin BLEU (default 1.0) or gives far more empty
or repetitive outputs than float32: a warning, or with --strict a refusal
(exit status 2, --out untouched).  fairseq_kd.json records the numbers
under "quantization_check".  --no-check skips it.
"""
import contextlib
import logging
import os
import tempfile

from fairseq_kd.cli.translate import MAX_LEN_WHY
from fairseq_kd.deploy.ct2 import QUANTIZATIONS
from fairseq_kd.deploy.quantization_check import DEFAULT_LINES, DEFAULT_MARGIN, DEFAULT_SPLIT
from fairseq_kd.errors import require

logger = logging.getLogger(__name__)


def add_arguments(p):
    p.add_argument("--path", required=True, help="student checkpoint (from fairseq-train)")
    p.add_argument("--out", required=True, help="exported checkpoint (fairseq) or model folder (ctranslate2)")
    p.add_argument("--format", choices=["fairseq", "ctranslate2"], default="fairseq",
                   help="fairseq: one checkpoint file (default); ctranslate2: a model folder")
    p.add_argument("--half", action="store_true",
                   help="--format fairseq: store the weights as float16 (half the size, e.g. to ship a "
                        "teacher); fairseq loads them into a float32 model")
    p.add_argument("--portable", action="store_true",
                   help="--format fairseq: a file to ship, holding no path of this machine: the training data "
                        "folder the task config records (and any other absolute path in the config) is left "
                        "empty; fairseq's tools read the data folder from their command line, and the "
                        "dictionaries stay embedded")
    p.add_argument("--data", help="folder with the model's dictionaries, dict.SRC.txt and dict.TGT.txt "
                                  "(--format fairseq also takes a joined dict.txt); embedded in a fairseq "
                                  "export, converted into a ctranslate2 one (default: the dictionaries the "
                                  "checkpoint embeds, as a fairseq-kd export does, else the data folder it "
                                  "was trained on)")
    p.add_argument("-s", "--source-lang", help="of --data's dictionaries (default: the checkpoint's, else "
                                               "from --data's file names)")
    p.add_argument("-t", "--target-lang")
    g = p.add_argument_group("--format ctranslate2")
    g.add_argument("--quantization", choices=QUANTIZATIONS, default="int8",
                   help="weights of the CTranslate2 model (default: int8)")
    g.add_argument("--spm-model", help="the SentencePiece model of the data (fairseq-kd spm's spm.model)")
    c = p.add_argument_group("--format ctranslate2: the quantization check (not for float32)")
    c.add_argument("--no-check", action="store_true", help="do not check the quantized model against float32")
    c.add_argument("--strict", action="store_true",
                   help="refuse a model that fails the check (exit status 2, --out left as it was) "
                        "instead of warning")
    c.add_argument("--check-split", help=f"binarized split of --data to translate (default: {DEFAULT_SPLIT}, "
                                         f"skipped with a note when --data has none)")
    c.add_argument("--check-lines", type=int, default=DEFAULT_LINES,
                   help="its first lines that are translated (default: %(default)s)")
    c.add_argument("--check-margin", type=float, default=DEFAULT_MARGIN,
                   help="BLEU the quantized model may lose against float32 (default: %(default)s)")
    c.add_argument("--check-beam", type=int, default=5,
                   help="beam size both models translate with (default: %(default)s, as fairseq-kd translate)")
    c.add_argument("--check-lenpen", type=float, default=1.0, help="length penalty (default: %(default)s)")
    c.add_argument("--check-max-len-a", type=float, default=1.5,
                   help=f"translations stop at a * source pieces + b (default: %(default)s, as fairseq-kd "
                        f"translate). {MAX_LEN_WHY}")
    c.add_argument("--check-max-len-b", type=int, default=10, help="(default: %(default)s)")
    c.add_argument("--check-device", choices=["cpu", "cuda"], default="cpu",
                   help="where both models translate (default: %(default)s, as fairseq-kd translate)")


def languages_and_data(args, task):
    """(data folder, source, target) of a checkpoint's dictionaries, from the options or
    ``task``, the checkpoint's task config."""
    from fairseq_kd.deploy.export import checkpoint_languages

    data = args.data or (str(task.data).split(os.pathsep)[0] if task.data else None)
    require(data and os.path.isdir(data), f"--data: dictionary folder not found: {data} (give --data)")
    src, tgt = checkpoint_languages(task, data, (args.source_lang, args.target_lang))
    require(src and tgt, f"cannot tell the languages from {data}: give -s and -t")
    return data, src, tgt


@contextlib.contextmanager
def dictionary_folder(args):
    """(folder, source, target, data folder) for the CTranslate2 converter, which reads
    dict.SRC.txt and dict.TGT.txt from a folder: --data when given; else the dictionaries
    a fairseq-kd export embeds (the teacher and students shipped in examples/ are such
    exports, without their data folder), written to a temporary folder, with no data
    folder (None); else the data folder the checkpoint was trained on."""
    from fairseq_kd.checkpoint import checkpoint_cfg, load_checkpoint_state
    from fairseq_kd.deploy.export import checkpoint_languages, embedded_dictionaries, write_dictionary_files

    state = load_checkpoint_state(args.path)
    task = checkpoint_cfg(state).task
    symbols = None if args.data else embedded_dictionaries(state)
    if symbols is None:
        data, src, tgt = languages_and_data(args, task)
        yield data, src, tgt, data
        return
    src, tgt = checkpoint_languages(task, None, (args.source_lang, args.target_lang))
    require(src and tgt, f"{args.path} does not name its languages: give -s and -t")
    with tempfile.TemporaryDirectory(prefix="fairseq-kd-dictionaries-") as folder:
        yield write_dictionary_files(symbols, folder, src, tgt), src, tgt, None


def export_ct2(args):
    from fairseq_kd.deploy.ct2 import write_model_folder
    from fairseq_kd.deploy.quantization_check import check_plan, checker, skipped_check

    require(args.spm_model, "--format ctranslate2 needs --spm-model (the model folder translates raw text)")
    with dictionary_folder(args) as (folder, src, tgt, data):
        origin = os.path.abspath(data) if data else "embedded in the checkpoint"
        settings, reason = check_plan(args, data, src, tgt)
        if settings is None:
            print(f"quantization check skipped: {reason}")
            check = skipped_check(reason)
        else:
            check = checker(args.path, data, src, tgt, args.quantization, settings, args.out,
                            warn=logger.warning)
        info = write_model_folder(args.path, folder, src, tgt, args.spm_model, args.out, args.quantization,
                                  check, dictionaries_from=origin)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out}: CTranslate2 {args.quantization} model, {src}->{tgt}, {size / 1e6:.2f} MB "
          f"in {info['seconds']}s (dictionaries {origin})")


def export_fairseq(args):
    from fairseq_kd.deploy.export import write_export

    state, exported, dictionaries = write_export(args.path, args.out, half=args.half, data=args.data,
                                               langs=(args.source_lang, args.target_lang),
                                               portable=args.portable)
    dropped = sorted(k for k in state if k not in exported and state[k] is not None)
    before, after = os.path.getsize(args.path), os.path.getsize(args.out)
    if dictionaries is None:
        # not an error: a student export serves without them; a teacher export then can
        # only be checked by vocabulary sizes, which a different dictionary may share
        logger.warning(f"{args.out} carries no dictionaries: the checkpoint embeds none and its data "
                       f"folder has no dict files; give --data to embed them (needed to check it as a teacher)")
    print(f"wrote {args.out}: {after / 1e6:.2f} MB (was {before / 1e6:.2f} MB, "
          f"{after / before:.1%}); dropped {', '.join(dropped) or 'nothing'}; "
          f"dictionaries {f'from {dictionaries}' if dictionaries else 'not embedded'}; "
          f"arch transformer, task translation{', float16 weights' if args.half else ''}")


def run(args):
    require(os.path.abspath(args.out) != os.path.abspath(args.path), "--out must differ from --path")
    require(not (args.half and args.format == "ctranslate2"),
            "--half is for --format fairseq; --format ctranslate2 takes --quantization float16")
    require(not (args.portable and args.format == "ctranslate2"), "--portable is for --format fairseq")
    if args.format == "ctranslate2":
        export_ct2(args)
    else:
        export_fairseq(args)
    return 0
