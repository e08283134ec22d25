"""Is a quantized CTranslate2 export still the model?  Its BLEU against float32's on a slice of a split.

Quantizing usually costs a student a fraction of a BLEU point (the shipped
teacher: see docs/deploy.md), but some students turn to gibberish in int8,
and a BLEU loss blamed on int8 is often a beam mismatch instead: float32
scored with one beam, int8 with another.  So ``fairseq-kd export --format
ctranslate2 --quantization Q`` translates the first lines of a binarized
split (valid by default) with the float32 conversion of the same checkpoint
and with the folder it just wrote, with one set of decoding settings (beam,
length penalty, maximum length) for both, through the folder's own
translation path (:meth:`fairseq_kd.deploy.ct2.ModelFolder.translate_pieces`,
as ``fairseq-kd translate``), and scores both with sacreBLEU against the
split's detokenized target side.  The check fails when Q loses more than a
margin of BLEU, or when Q's share of empty or repetitive outputs (the cheap
signature of gibberish) is far above float32's.  A failure is a warning, or
with ``--strict`` a refusal; the numbers go into the folder's metadata.
"""
import dataclasses

from fairseq_kd.errors import KDError, require

REFERENCE = "float32"
DEFAULT_SPLIT = "valid"
# 500 lines: on the shipped teacher the int8 - float32 BLEU difference of the first 500 valid
# lines is within a few tenths of the whole split's (docs/deploy.md), at half the decoding time.
DEFAULT_LINES = 500
# BLEU points Q may lose against float32 before the check fails; docs/deploy.md measures the
# shipped teacher's int8 loss on valid (well below it) and explains the choice.
DEFAULT_MARGIN = 1.0
# Q fails when its share of degenerate outputs exceeds float32's by more than this: a healthy
# quantization changes a handful of lines, a broken one a large part of them.
DEGENERATE_MARGIN = 0.05
# Repetitive: some n-gram (n <= MAX_NGRAM words) repeated REPEATS times in a row, e.g.
# "of the of the of the of the"; real sentences practically never do that, looping decoders do.
MAX_NGRAM = 4
REPEATS = 4


@dataclasses.dataclass
class CheckSettings:
    """What the check translates and how; the fields are export's --check-* options."""
    split: str
    lines: int
    beam: int
    lenpen: float
    max_len_a: float
    max_len_b: int
    margin: float
    device: str  # "cpu" or "cuda"
    strict: bool

    def decoding(self):
        """The decoding options both models translate with (:func:`fairseq_kd.deploy.ct2.decoding_options`)."""
        return dict(beam=self.beam, lenpen=self.lenpen, max_len_a=self.max_len_a, max_len_b=self.max_len_b)

    def describe(self, lines):
        return (f"{self.split}, first {lines} lines, beam {self.beam}, lenpen {self.lenpen}, max length "
                f"{self.max_len_a} x source + {self.max_len_b}, on {self.device}")


# ------------------------------------------------------------------ planning
def has_split(data, split, src, tgt):
    """Whether ``data`` holds the binarized ``split`` for ``src``-``tgt``."""
    from fairseq_kd.corpus.data import pair_prefix

    try:
        pair_prefix(data, split, src, tgt)
    except KDError:
        return False
    return True


def check_plan(args, data, src, tgt):
    """(settings, None) when the export's check runs, else (None, why it is skipped).

    It runs by default for every quantization but float32 (what it compares
    against) when ``data`` holds the split (None: no data folder, the checkpoint's own
    dictionaries); an explicit --check-split must be
    there, and --strict needs the check to run.
    """
    if args.quantization == REFERENCE:
        return None, f"{REFERENCE} is the reference the check compares a quantized model against"
    if args.no_check:
        require(not args.strict, "--strict refuses a model that fails the check: not with --no-check")
        return None, "--no-check"
    split = args.check_split or DEFAULT_SPLIT
    if data is None or not has_split(data, split, src, tgt):
        missing = (f"no binarized '{split}' split for {src}-{tgt} in {data}" if data else
                   f"no binarized '{split}' split: no data folder, the dictionaries are the checkpoint's own")
        require(not (args.check_split or args.strict),
                f"--check-split: {missing}" + (" (--strict needs the check; give --check-split or --data)"
                                               if args.strict else ""))
        hint = "give --check-split, or --data with one" if data else "give --data"
        return None, f"{missing} ({hint})"
    require(args.check_lines >= 1, f"--check-lines must be >= 1, got {args.check_lines}")
    require(args.check_beam >= 1, f"--check-beam must be >= 1, got {args.check_beam}")
    return CheckSettings(split=split, lines=args.check_lines, beam=args.check_beam, lenpen=args.check_lenpen,
                         max_len_a=args.check_max_len_a, max_len_b=args.check_max_len_b,
                         margin=args.check_margin, device=args.check_device, strict=args.strict), None


def skipped_check(reason):
    """``check(folder)`` of a check that does not run: its metadata entry says why."""
    return lambda folder: {"verdict": "skipped", "reason": reason}


# ------------------------------------------------------------------ outputs
def repeats_itself(words, max_n=MAX_NGRAM, times=REPEATS):
    """Whether some n-gram (n <= ``max_n``) occurs ``times`` times in a row in ``words``."""
    for n in range(1, max_n + 1):
        for start in range(len(words) - n * times + 1):
            gram = words[start:start + n]
            if all(words[start + k * n:start + (k + 1) * n] == gram for k in range(1, times)):
                return True
    return False


def is_degenerate(hypothesis):
    """An empty translation, or one that loops (:func:`repeats_itself`)."""
    words = hypothesis.split()
    return not words or repeats_itself(words)


def output_shares(hypotheses, sources):
    """{"empty", "degenerate"}: shares of the non-empty sources whose translation is empty / degenerate."""
    translated = [h for h, s in zip(hypotheses, sources) if s]
    count = max(len(translated), 1)
    return {"empty": round(sum(not h.strip() for h in translated) / count, 4),
            "degenerate": round(sum(map(is_degenerate, translated)) / count, 4)}


# ------------------------------------------------------------------ the check
def split_slice(data, src, tgt, settings):
    """(source pieces, detokenized references) of the first ``settings.lines`` lines of the split."""
    from fairseq_kd.deploy.ct2 import binarized_split, sentencepiece_postprocess

    sources, targets = binarized_split(data, settings.split, src, tgt, settings.lines)
    require(targets is not None, f"--check-split {settings.split}: {data} holds no {tgt} side to score against")
    return sources, [sentencepiece_postprocess(t) for t in targets]


def translate_slice(folder, model_dir, sources, settings):
    """(translations, compute type): ``model_dir``'s model translating ``sources`` through
    ``folder``'s path, as ``fairseq-kd translate --model`` would with the check's settings."""
    from fairseq_kd.deploy.ct2 import default_batch_size, throughput_translator

    translator = throughput_translator(model_dir, settings.device)
    hypotheses = folder.translate_pieces(translator, sources, default_batch_size(settings.device),
                                         **settings.decoding())
    return hypotheses, translator.compute_type


def verdict(entry, settings):
    """The reasons Q fails the check (none: it passes)."""
    reasons = []
    if entry["bleu_delta"] < -settings.margin:
        reasons.append(f"loses {-entry['bleu_delta']:.2f} BLEU, more than --check-margin {settings.margin}")
    q, f32 = entry["outputs"][entry["quantization"]]["degenerate"], entry["outputs"][REFERENCE]["degenerate"]
    if q - f32 > DEGENERATE_MARGIN:
        reasons.append(f"{q:.1%} of its outputs are empty or repetitive against {f32:.1%} in {REFERENCE}")
    return reasons


def score(hypotheses, sources, references, quantization, settings, compute_types):
    """The metadata entry: both models' BLEU (sacreBLEU, with its signature), the difference,
    their output shares, the settings and the verdict."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    # rounded as recorded, so that the recorded difference is that of the recorded scores
    scores = {name: round(bleu.corpus_score(hyps, [references]).score, 2) for name, hyps in hypotheses.items()}
    entry = {"split": settings.split, "lines": len(sources), "beam": settings.beam, "lenpen": settings.lenpen,
             "max_len_a": settings.max_len_a, "max_len_b": settings.max_len_b, "device": settings.device,
             "compute_types": compute_types, "quantization": quantization,
             "bleu_float32": scores[REFERENCE], "bleu_quantized": scores[quantization],
             "bleu_delta": round(scores[quantization] - scores[REFERENCE], 2), "margin": settings.margin,
             "outputs": {name: output_shares(hyps, sources) for name, hyps in hypotheses.items()},
             "identical_lines": round(sum(a == b for a, b in zip(*hypotheses.values())) / max(len(sources), 1), 4),
             "bleu_signature": str(bleu.get_signature())}
    entry["reasons"] = verdict(entry, settings)
    entry["verdict"] = "fail" if entry["reasons"] else "pass"
    return entry


def run_check(folder_dir, checkpoint, data, src, tgt, quantization, settings):
    """Translate the slice with the float32 conversion of ``checkpoint`` (cached) and with the
    model folder ``folder_dir`` (quantization ``quantization``); return :func:`score`'s entry."""
    from fairseq_kd.deploy.ct2 import ModelFolder, cached_model

    folder = ModelFolder(folder_dir)
    sources, references = split_slice(data, src, tgt, settings)
    models = {REFERENCE: cached_model(checkpoint, data, src, tgt, REFERENCE), quantization: folder_dir}
    hypotheses, compute_types = {}, {}
    for name, model_dir in models.items():
        hypotheses[name], compute_types[name] = translate_slice(folder, model_dir, sources, settings)
    return score(hypotheses, sources, references, quantization, settings, compute_types)


def summary(entry, settings):
    """The check's result in one line (what export prints)."""
    q = entry["quantization"]
    shares = entry["outputs"]
    return (f"quantization check ({settings.describe(entry['lines'])}): BLEU {REFERENCE} "
            f"{entry['bleu_float32']}, {q} {entry['bleu_quantized']} ({entry['bleu_delta']:+.2f}, margin "
            f"{settings.margin}); empty or repetitive outputs {shares[REFERENCE]['degenerate']:.1%} / "
            f"{shares[q]['degenerate']:.1%}; {entry['identical_lines']:.0%} of lines identical: "
            + ("pass" if entry["verdict"] == "pass" else "FAIL: " + "; ".join(entry["reasons"])))


def checker(checkpoint, data, src, tgt, quantization, settings, out, report=print, warn=print):
    """``check(folder)`` for :func:`fairseq_kd.deploy.ct2.write_model_folder`: runs the check,
    reports it, and on failure warns, or with ``settings.strict`` refuses (one-line error)."""
    def check(folder_dir):
        entry = run_check(folder_dir, checkpoint, data, src, tgt, quantization, settings)
        report(summary(entry, settings))
        if entry["reasons"]:
            require(not settings.strict, f"--strict: the {quantization} model "
                    f"{'; '.join(entry['reasons'])} ({settings.describe(entry['lines'])}, BLEU {REFERENCE} "
                    f"{entry['bleu_float32']}, {quantization} {entry['bleu_quantized']}); nothing written to {out}")
            warn(f"the {quantization} model fails the quantization check ({'; '.join(entry['reasons'])}); "
                 f"kept in {out} all the same (--strict refuses it)")
        return entry

    return check
