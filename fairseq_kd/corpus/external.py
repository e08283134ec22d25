"""An external teacher: any CTranslate2 model folder translating raw text into a distilled text corpus.

Sequence-level KD needs nothing of the teacher but its translations, so any
model CTranslate2 runs (OPUS-MT, Marian, M2M100, NLLB, a fairseq model) can be
a Seq-KD teacher.  ``fairseq-kd corpus RAW_DIR --teacher-ct2 DIR`` reads the
plain-text split RAW_DIR/SPLIT.SRC, tokenizes it with the teacher's own
SentencePiece model(s), decodes with beam search (or the N best for
Seq-Inter, chosen by sentence BLEU against RAW_DIR/SPLIT.TGT) and writes
detokenized text; the student trains its own vocabulary on it afterwards.

What is the teacher's (:class:`TeacherLayout`, read from the folder as the
converters write it):

* ``ct2-opus-mt-converter`` / ``ct2-marian-converter`` (with the OPUS-MT
  model's ``source.spm`` and ``target.spm`` copied beside, as CTranslate2's
  documentation does), and ``ct2-transformers-converter --copy_files
  source.spm target.spm`` of a Marian model: ``source.spm`` and ``target.spm``;
* ``ct2-transformers-converter --copy_files sentencepiece.bpe.model`` of an
  M2M100 or NLLB model (or ``spm.model``/``sentencepiece.model``, e.g. a
  fairseq model's copied beside a ``ct2-fairseq-converter`` folder): one
  SentencePiece model for both sides;
* the special tokens from the folder's ``config.json`` (``</s>`` appended to
  the source unless the model adds it itself, ``add_source_eos``) and the
  language codes the user names: ``--source-prefix`` tokens start every
  source (M2M100/NLLB: ``__de__``/``deu_Latn``; multilingual OPUS-MT:
  ``>>deu<<``), ``--target-prefix`` tokens start every translation
  (M2M100/NLLB: the target language) and are removed from it.  A
  vocabulary with language codes and no code named is refused.

The chunks, shards, workers and resume are ``fairseq-kd corpus``'s own
(:mod:`fairseq_kd.corpus.build`); :class:`ExternalTranslator` is a
:class:`~fairseq_kd.corpus.translators.ChunkTranslator` whose "pieces" are
already detokenized text.  Every check runs before anything is written.
"""
import json
import logging
import os
import re
import shutil
import struct

from fairseq_kd.atomic_io import write_atomic, write_lines
from fairseq_kd.checksum import file_sha256
from fairseq_kd.corpus import select
from fairseq_kd.corpus.merging import kept_pairs
from fairseq_kd.corpus.translators import ChunkTranslator, ct2_decoder
from fairseq_kd.corpus.work import WorkDir
from fairseq_kd.errors import require

logger = logging.getLogger("fairseq_kd.corpus")

# SentencePiece files, as each converter leaves them beside the model
SEPARATE_SPM = ("source.spm", "target.spm")  # ct2-opus-mt/marian-converter; Marian with --copy_files
SHARED_SPM = ("sentencepiece.bpe.model", "spm.model", "sentencepiece.model")  # M2M100, NLLB; fairseq
VOCABULARY_FILES = {"source": ("shared_vocabulary", "source_vocabulary"),
                    "target": ("shared_vocabulary", "target_vocabulary")}
# Language-code tokens of multilingual vocabularies: M2M100 (__de__), NLLB (deu_Latn),
# and OPUS-MT's target-language tokens, which go on the source side (>>deu<<)
LANGUAGE_CODE = re.compile(r"^(__[a-z]{2,3}(_[A-Za-z]+)?__|[a-z]{3}_[A-Z][a-z]{3})$")
OPUS_TARGET_TOKEN = re.compile(r"^>>[A-Za-z_]+<<$")
# Source tokens a line may have when the model stores no position table (learned or
# sinusoidal positions are stored for most): CTranslate2's own default input limit
DEFAULT_MAX_SOURCE = 1024
# Settings that change the distilled text: a resumed run must use the same ones
OUTPUT_SETTINGS = ("split", "source_lang", "target_lang", "source_prefix", "target_prefix", "beam",
                   "lenpen", "max_len_a", "max_len_b", "min_len", "seq_inter", "max_source_tokens",
                   "long_inputs", "chunk_size")
# fairseq-kd corpus options that mean nothing for a CTranslate2 folder translating raw text
FAIRSEQ_ONLY = {"path": "--path", "unkpen": "--unkpen", "post_process": "--post-process",
                "quantization": "--quantization", "fp16": "--fp16"}
WHY_FAIRSEQ_ONLY = {
    "path": "the teacher is --teacher-ct2",
    "unkpen": "CTranslate2 has no unknown-word penalty",
    "post_process": "the teacher's own SentencePiece model detokenizes",
    "quantization": "the folder computes in the type it was converted to (the converter's --quantization)",
    "fp16": "the folder computes in the type it was converted to (the converter's --quantization)",
}


# ---------------------------------------------------------------- the teacher's folder
def read_vocabulary(model_dir, side):
    """The tokens of the ``side`` ("source" or "target") vocabulary, as the converter wrote it."""
    for stem in VOCABULARY_FILES[side]:
        path = os.path.join(model_dir, stem + ".json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        path = os.path.join(model_dir, stem + ".txt")
        if os.path.isfile(path):  # CTranslate2 < 3 wrote one token a line
            with open(path, encoding="utf-8", newline="\n") as f:
                return [line.rstrip("\n") for line in f]
    require(False, f"--teacher-ct2 {model_dir}: no {side} vocabulary (shared_vocabulary.json or "
            f"{side}_vocabulary.json): not a folder of a CTranslate2 converter")


def sentencepiece_files(model_dir):
    """(source model, target model) of the folder: source.spm/target.spm, else one shared model."""
    separate = [os.path.join(model_dir, f) for f in SEPARATE_SPM]
    if all(map(os.path.isfile, separate)):
        return tuple(separate)
    shared = [os.path.join(model_dir, f) for f in SHARED_SPM if os.path.isfile(os.path.join(model_dir, f))]
    require(shared, f"--teacher-ct2 {model_dir}: no SentencePiece model: expected source.spm and target.spm "
            f"(copy them from the OPUS-MT model beside a ct2-opus-mt-converter folder, or "
            f"ct2-transformers-converter --copy_files source.spm target.spm), "
            f"or one of {', '.join(SHARED_SPM)} (ct2-transformers-converter --copy_files "
            "sentencepiece.bpe.model; copy a fairseq model's spm.model beside its ct2-fairseq-converter folder)")
    return shared[0], shared[0]


def prefix_tokens(spec):
    """'--source-prefix'/'--target-prefix' as tokens: space-separated, none when empty."""
    return (spec or "").split()


class TeacherLayout:
    """How a converted folder reads and writes text: tokenizer files, special and prefix tokens."""

    def __init__(self, model_dir, source_prefix=None, target_prefix=None):
        require(os.path.isdir(model_dir), f"--teacher-ct2: folder not found: {model_dir}")
        require(os.path.isfile(os.path.join(model_dir, "model.bin")),
                f"--teacher-ct2 {model_dir} holds no CTranslate2 model (model.bin)")
        self.path = model_dir
        self.config = self._config()
        self.source_vocab = set(read_vocabulary(model_dir, "source"))
        self.target_vocab = set(read_vocabulary(model_dir, "target"))
        self.source_spm, self.target_spm = sentencepiece_files(model_dir)
        self.source_prefix = prefix_tokens(source_prefix)
        self.target_prefix = prefix_tokens(target_prefix)
        self.eos = self.config.get("eos_token", "</s>")
        self.bos = self.config.get("bos_token", "<s>")
        self._check_prefixes()

    def _config(self):
        path = os.path.join(self.path, "config.json")
        if not os.path.isfile(path):  # folders of CTranslate2 < 3 have none: the defaults
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    @property
    def kind(self):
        """The layout in words, for logs and the report."""
        spm = "source.spm/target.spm" if self.source_spm != self.target_spm else os.path.basename(self.source_spm)
        return f"{spm}, " + ("multilingual" if self.language_codes() else "one language pair")

    def language_codes(self):
        """The target vocabulary's language codes (M2M100, NLLB), else OPUS-MT's >>xxx<< tokens."""
        codes = sorted(t for t in self.target_vocab if LANGUAGE_CODE.match(t))
        return codes if len(codes) > 1 else sorted(t for t in self.source_vocab if OPUS_TARGET_TOKEN.match(t))

    def _check_prefixes(self):
        """A multilingual model needs its language codes named; named tokens must be in the vocabulary."""
        codes = self.language_codes()
        examples = ", ".join(codes[:4]) + (", ..." if len(codes) > 4 else "")
        if codes and OPUS_TARGET_TOKEN.match(codes[0]):
            require(self.source_prefix, f"--teacher-ct2 {self.path} is multilingual ({len(codes)} target-language "
                    f"tokens: {examples}): name the target language with --source-prefix, e.g. {codes[0]}")
        elif codes:
            require(self.target_prefix and self.source_prefix,
                    f"--teacher-ct2 {self.path} is multilingual ({len(codes)} language codes: {examples}): "
                    "name both languages, e.g. --source-prefix __de__ --target-prefix __en__ (M2M100) or "
                    "deu_Latn / eng_Latn (NLLB)")
        for option, tokens, vocab in (("--source-prefix", self.source_prefix, self.source_vocab),
                                      ("--target-prefix", self.target_prefix, self.target_vocab)):
            unknown = [t for t in tokens if t not in vocab]
            require(not unknown, f"{option} {' '.join(unknown)}: not in the vocabulary of {self.path}"
                    + (f" (its codes: {examples})" if codes else
                       " (it has no language codes: a one-pair model needs no prefix)"))

    def source_tokens(self, pieces, max_tokens=0):
        """A source line's tokens as the model reads them: [<s>] prefix pieces </s>.

        ``max_tokens`` > 0 cuts the pieces so that the whole fits, keeping the
        prefix and ``</s>`` (--long-inputs truncate).
        """
        head = ([self.bos] if self.config.get("add_source_bos") else []) + self.source_prefix
        tail = [] if self.config.get("add_source_eos") else [self.eos]
        if max_tokens > 0:
            pieces = pieces[: max(max_tokens - len(head) - len(tail) - self.appended(), 0)]
        return head + pieces + tail

    def appended(self):
        """Tokens CTranslate2 adds to a source itself (config.json's add_source_bos/eos)."""
        return int(bool(self.config.get("add_source_bos"))) + int(bool(self.config.get("add_source_eos")))

    def size(self, pieces):
        """Source tokens the model reads for a line of ``pieces`` (what --max-source-tokens counts)."""
        return len(self.source_tokens(pieces)) + self.appended()

    def strip_target(self, tokens):
        """A hypothesis without the target prefix CTranslate2 returns with it."""
        n = len(self.target_prefix)
        return tokens[n:] if tokens[:n] == self.target_prefix else tokens


class TeacherTokenizer:
    """The layout's SentencePiece models: raw source line -> pieces, target pieces -> raw text."""

    def __init__(self, layout):
        import sentencepiece

        self.layout = layout
        self.source = sentencepiece.SentencePieceProcessor(model_file=layout.source_spm)
        self.target = (self.source if layout.target_spm == layout.source_spm
                       else sentencepiece.SentencePieceProcessor(model_file=layout.target_spm))

    def encode(self, line):
        return self.source.encode(line.strip(), out_type=str)

    def decode(self, tokens):
        return self.target.decode_pieces(self.layout.strip_target(list(tokens))).strip()


def model_variables(model_dir):
    """(name, shape) of every variable stored in a CTranslate2 model.bin (aliases of shared weights
    not repeated), read from the header of each: the format of ctranslate2.specs.ModelSpec.save."""
    with open(os.path.join(model_dir, "model.bin"), "rb") as f:
        def read(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def read_string():
            return f.read(read("H"))[:-1].decode("utf-8")

        read("I")  # binary version
        read_string()  # model name
        read("I")  # revision
        variables = []
        for _ in range(read("I")):
            name = read_string()
            shape = [read("I") for _ in range(read("B"))]
            read("B")  # dtype
            f.seek(read("I"), os.SEEK_CUR)
            variables.append((name, shape))
    return variables


def parameter_count(model_dir):
    """Parameters of a CTranslate2 model (shared weights once); quantization scales and
    precomputed sinusoidal positions are not parameters."""
    total = 0
    for name, shape in model_variables(model_dir):
        if not (name.endswith("_scale") or "position_encodings" in name):
            n = 1
            for dim in shape:
                n *= dim
            total += n
    return total


def max_source_positions(model_dir):
    """Source tokens the model has positions for: the rows of its position tables (a longer
    source fails in CTranslate2; the encoder's is often an alias of the decoder's), else
    CTranslate2's own input limit."""
    rows = [shape[0] for name, shape in model_variables(model_dir) if "position_encodings" in name and shape]
    return min(rows) if rows else DEFAULT_MAX_SOURCE


def teacher_files(model_dir):
    """The files of the teacher's folder that decide its output, those it has."""
    return [(name, path) for name in ["model.bin", "config.json", *SEPARATE_SPM, *SHARED_SPM]
            if os.path.isfile(path := os.path.join(model_dir, name))]


def teacher_fingerprint(model_dir):
    """Name, size and SHA-256 of each file that decides the teacher's output.  Not their
    modification times, which a copy or a fresh download changes while the teacher stays."""
    return [f"{name}:{os.path.getsize(path)}:sha256:{file_sha256(path)}" for name, path in teacher_files(model_dir)]


def legacy_teacher_fingerprint(model_dir):
    """The fingerprint earlier versions saved: name, size and modification time of each file."""
    return [f"{name}:{(st := os.stat(path)).st_size}:{int(st.st_mtime)}" for name, path in teacher_files(model_dir)]


# ---------------------------------------------------------------- the raw split
def read_text(path):
    """The lines of a text file, split on "\\n" only (as wc -l counts them)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


def count_lines(path):
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def raw_file(args, split, lang):
    return os.path.join(args.data, f"{split}.{lang}")


def check_raw_split(args, split, need_target=False):
    """RAW_DIR/SPLIT.SRC exists and, when SPLIT.TGT does, has as many lines; whether the target exists."""
    src, tgt = raw_file(args, split, args.source_lang), raw_file(args, split, args.target_lang)
    require(os.path.isfile(src), f"no source text {src} (RAW_DIR holds plain text SPLIT.LANG files)")
    has_target = os.path.isfile(tgt)
    require(has_target or not need_target, f"{tgt} not found: {need_target} needs the gold target")
    if has_target:
        n_src, n_tgt = count_lines(src), count_lines(tgt)
        require(n_src == n_tgt, f"{src} has {n_src} lines but {tgt} has {n_tgt}")
    return has_target


class RawSplit:
    """The source lines of RAW_DIR/SPLIT.SRC tokenized for the teacher, and the gold target when present.

    Offers what :class:`ChunkTranslator` reads of a split: ``sizes`` (tokens
    the model reads; 1 for an empty line, which is not translated),
    ``reference(i)`` and ``len``.
    """

    def __init__(self, args, tokenizer):
        self.tokenizer = tokenizer
        self.sources = read_text(raw_file(args, args.split, args.source_lang))
        tgt = raw_file(args, args.split, args.target_lang)
        self.references = read_text(tgt) if os.path.isfile(tgt) else None
        self.pieces = [tokenizer.encode(line) if line.strip() else [] for line in self.sources]
        self.sizes = [tokenizer.layout.size(p) if p else 1 for p in self.pieces]
        self.max_source = max_source_positions(tokenizer.layout.path)

    def __len__(self):
        return len(self.sources)

    def reference(self, i, post_process=None):
        require(self.references is not None, "no gold target beside the source: "
                "--seq-inter and --long-inputs reference need it")
        return self.references[i].strip()


# ---------------------------------------------------------------- translating
class ExternalTranslator(ChunkTranslator):
    """The folder's CTranslate2 translator; each hypothesis is returned detokenized."""

    def __init__(self, args, data, tokenizer, device, device_index=0):
        super().__init__(args, data, data.max_source)
        self.tokenizer = tokenizer
        self.translator, self.options = ct2_decoder(args, args.teacher_ct2, device, device_index, self.beam,
                                                    self.nbest)
        self.options["target_prefix"] = tokenizer.layout.target_prefix

    def translate_batches(self, batches):
        from fairseq_kd.deploy.ct2 import translate_batches

        layout = self.tokenizer.layout
        cut = self.max_source if self.args.long_inputs == "truncate" else 0
        sources = [[layout.source_tokens(self.data.pieces[i], cut) for i in batch] for batch in batches]
        for hyps in translate_batches(self.translator, sources, scores=True, **self.options):
            yield [[(self.tokenizer.decode(h), score) for h, score in nbest] for nbest in hyps]


def open_split(args):
    """The raw split and its work folder, for :func:`fairseq_kd.corpus.build.translate_shard`."""
    tokenizer = TeacherTokenizer(TeacherLayout(args.teacher_ct2, args.source_prefix, args.target_prefix))
    data = RawSplit(args, tokenizer)
    return data, ExternalWorkDir(args, len(data))


def make_translator(args, data, device, device_index=0):
    """The worker's translator (:func:`fairseq_kd.corpus.build.make_translator` picks the device)."""
    return ExternalTranslator(args, data, data.tokenizer, device, device_index)


class ExternalWorkDir(WorkDir):
    """OUT/SPLIT.work of an external teacher: its settings name the teacher's folder and the raw text."""

    def run_settings(self, args, n_lines):
        settings = {k: getattr(args, k) for k in OUTPUT_SETTINGS}
        settings.update(teacher_ct2=os.path.abspath(args.teacher_ct2), data=os.path.abspath(args.data),
                        n_lines=n_lines, teacher_fingerprint=teacher_fingerprint(args.teacher_ct2))
        settings.update(select.saved_settings(args))
        return settings

    def legacy_fingerprints(self):
        return legacy_teacher_fingerprint(self.args.teacher_ct2)


# ---------------------------------------------------------------- the corpus
def check_external_args(args):
    """Everything an external teacher cannot do, and its inputs: all before anything is written."""
    from fairseq_kd.corpus.translators import AUTO

    for key, option in FAIRSEQ_ONLY.items():
        given = getattr(args, key, None)
        require(not given, f"{option} is not an option of --teacher-ct2: {WHY_FAIRSEQ_ONLY[key]}")
    require(args.backend in (AUTO, "ctranslate2"), "--teacher-ct2 decodes with CTranslate2, not --backend fairseq")
    args.backend = "ctranslate2"
    args.ct2_model = args.teacher_ct2  # already converted: nothing for prepare_backend to do
    args.formats = args.formats or "text"
    require(args.formats == "text", f"--teacher-ct2 writes the text format only (a raw corpus; the student's "
            f"vocabulary is made from it afterwards), got --formats {args.formats}")
    require(os.path.isdir(args.data), f"raw text folder not found: {args.data}")
    require(os.path.realpath(args.data) != os.path.realpath(args.out),
            "--out must differ from the raw text folder: the distilled SPLIT.TGT would replace the gold one")
    # --long-inputs reference needs the gold target too, but only for a line found long while decoding
    need = "--seq-inter" if args.seq_inter else False
    check_raw_split(args, args.split, need)
    for other in copy_splits(args):
        if os.path.isfile(raw_file(args, other, args.source_lang)):
            check_raw_split(args, other, "--copy-splits")
    return TeacherLayout(args.teacher_ct2, args.source_prefix, args.target_prefix)


def copy_splits(args):
    return [s for s in args.copy_splits.split(",") if s and s != args.split]


def copy_file(src, dest):
    """Copy under a temporary name and rename: a killed copy leaves no half file."""
    tmp = f"{dest}.tmp{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def merge(args, data, work, layout, seconds):
    """OUT as a raw corpus: SPLIT.TGT the teacher's text (the kept pairs, after --select, --keep
    and --filter, as for a fairseq teacher), SPLIT.SRC their sources, the gold --copy-splits
    copied; OUT/SPLIT.report.json counts every line not translated, OUT/SPLIT.filtered.tsv
    holds every filtered pair (nothing is dropped silently)."""
    src, tgt, split = args.source_lang, args.target_lang, args.split
    # the filters count whitespace-separated words here: sources and translations are plain text
    ids, lines, untranslated, entries = kept_pairs(args, work, data.sources)
    failed = sorted({i for i, h in zip(ids, lines) if not h and i not in untranslated})
    write_lines(os.path.join(args.out, f"{split}.{src}"), (data.sources[i] for i in ids))
    write_lines(os.path.join(args.out, f"{split}.{tgt}"), lines)
    for other in copy_splits(args):
        files = [raw_file(args, other, lang) for lang in (src, tgt)]
        if not all(map(os.path.isfile, files)):
            logger.warning(f"--copy-splits: no split '{other}' ({src} and {tgt}) in {args.data}")
            continue
        for f in files:
            copy_file(f, os.path.join(args.out, os.path.basename(f)))
    report = {**entries, "empty_translations": failed,
              "max_source_tokens": args.max_source_tokens or data.max_source,
              "teacher_ct2": os.path.abspath(args.teacher_ct2), "layout": layout.kind,
              "source_prefix": layout.source_prefix, "target_prefix": layout.target_prefix,
              "seconds": round(seconds, 1)}
    write_atomic(os.path.join(args.out, f"{split}.report.json"), json.dumps(report, indent=1))
    return report
