"""The work folder of a corpus build (OUT/SPLIT.work): the settings a resumed run must share,
and one saved file per finished chunk, so an interrupted run resumes where it stopped."""
import functools
import glob
import json
import os

from fairseq_kd.atomic_io import write_atomic
from fairseq_kd.checksum import file_sha256
from fairseq_kd.corpus import select
from fairseq_kd.corpus.data import chunk_ranges
from fairseq_kd.errors import require

# Settings that change the output: a resumed run must use the same ones.
OUTPUT_SETTINGS = ("path", "data", "split", "source_lang", "target_lang", "beam", "lenpen",
                   "unkpen", "max_len_a", "max_len_b", "min_len", "seq_inter", "post_process",
                   "max_source_tokens", "long_inputs", "chunk_size", "fp16")
# Recorded only for the ctranslate2 backend, so runs begun before it existed still resume.
CT2_SETTINGS = ("backend", "quantization")
# The selection options (select.DEFAULTS) are recorded only where they differ from their
# defaults, for the same reason; the --filter options act at the merge and bind nothing.
# --keep binds only upwards: a line's kept candidates are its first distinct ones in ranked
# order (select.first_distinct), so the m kept under --keep m are the first m of those kept
# under any larger --keep, and chunks saved with a larger one serve a smaller one.


class WorkDir:
    """OUT/SPLIT.work: settings.json and one chunk-XXXXXX.json per finished chunk."""

    def __init__(self, args, n_lines):
        self.path = work_path(args)
        self.chunks = chunk_ranges(n_lines, args.chunk_size)
        self.args, self.n_lines = args, n_lines

    @functools.cached_property
    def settings(self):
        """This run's settings, computed when :meth:`prepare` compares them, not by every
        worker that opens the folder to save chunks: the teacher's checksum reads its file."""
        return self.run_settings(self.args, self.n_lines)

    def run_settings(self, args, n_lines):
        settings = {k: getattr(args, k) for k in OUTPUT_SETTINGS}
        settings["data"] = os.path.abspath(args.data)
        settings["path"] = ":".join(os.path.abspath(p) for p in args.path.split(":") if p)
        settings["n_lines"] = n_lines
        settings["teacher_fingerprint"] = [file_fingerprint(p) for p in args.path.split(":") if p]
        if args.backend != "fairseq":
            settings.update({k: getattr(args, k) for k in CT2_SETTINGS})
        settings.update(select.saved_settings(args))
        return settings

    def legacy_fingerprints(self):
        """The teacher fingerprints earlier versions saved for this run's teacher files, in
        the order of ``settings["teacher_fingerprint"]``."""
        return [legacy_fingerprint(p) for p in self.args.path.split(":") if p]

    def prepare(self):
        """Check the saved settings against this run's and record this run's.

        Sets ``self.keep``: how many candidates per line the chunks hold and the
        chunks still to translate must keep (this run's --keep, or the larger one
        of a folder whose settings differ in nothing else).
        """
        os.makedirs(self.path, exist_ok=True)
        settings_file = os.path.join(self.path, "settings.json")
        self.keep = saved_keep(self.settings)
        if os.path.exists(settings_file):
            with open(settings_file) as f:
                old = json.load(f)
            upgraded = upgrade_fingerprints(old, self.settings, self.legacy_fingerprints())
            changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
            if changed == ["keep"] and saved_keep(old) > self.keep and has_saved_chunk(self.path):
                self.keep = saved_keep(old)  # its chunks hold more candidates: the merge keeps the first
                if upgraded:
                    write_atomic(settings_file, json.dumps(old, indent=1))
                return
            # Settings of a run that saved no chunk (e.g. one that failed at start) bind nothing.
            require(not changed or not has_saved_chunk(self.path),
                    f"{self.path} holds a run with other settings ({', '.join(changed)}); "
                    "use another --out or delete that folder")
            if not changed and not upgraded:
                return
        write_atomic(settings_file, json.dumps(self.settings, indent=1))

    def chunk_file(self, c):
        return os.path.join(self.path, f"chunk-{c:06d}.json")

    def is_done(self, c):
        return os.path.exists(self.chunk_file(c))

    def pending(self, chunk_ids):
        return [c for c in chunk_ids if not self.is_done(c)]

    def save(self, c, result):
        write_atomic(self.chunk_file(c), json.dumps(result, ensure_ascii=False))

    def load(self, c):
        with open(self.chunk_file(c), encoding="utf-8") as f:
            return json.load(f)


def saved_keep(settings):
    """The --keep of a work folder's settings (recorded only where it is not the default)."""
    return settings.get("keep", select.DEFAULTS["keep"])


def work_path(args):
    return os.path.join(args.out, f"{args.split}.work")


def has_saved_chunk(path):
    return bool(glob.glob(os.path.join(path, "chunk-*.json")))


def chunks_hold_scores(path):
    """Whether the chunks saved in the work folder ``path`` hold the teacher's scores and
    hypothesis lists, as ``--filter score`` and ``--keep`` need (an earlier version's chunks
    hold only the chosen lines); False when there is none."""
    files = glob.glob(os.path.join(path, "chunk-*.json"))
    for name in files:
        with open(name, encoding="utf-8") as f:
            if "hyps" not in json.load(f):
                return False
    return bool(files)


def require_teacher_file(path):
    require(os.path.isfile(path), f"--path: teacher checkpoint not found: {path}")


def file_fingerprint(path):
    """What identifies a teacher checkpoint: its size and SHA-256.  Not its modification time,
    which a fresh clone or a copy changes while the weights stay the same."""
    require_teacher_file(path)
    return f"{os.path.getsize(path)}:sha256:{file_sha256(path)}"


def legacy_fingerprint(path):
    """The fingerprint earlier versions saved: path, size and modification time."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}"


def upgrade_fingerprints(old, settings, legacy):
    """Replace in the saved settings ``old`` each earlier version's teacher fingerprint that
    still matches its file (``legacy``: what that version would save for this run's files) by
    the checksum this version records; whether any was.  One that no longer matches stays,
    and the run is refused as before."""
    saved, new = old.get("teacher_fingerprint"), settings["teacher_fingerprint"]
    if not isinstance(saved, list) or len(saved) != len(new) or len(legacy) != len(new):
        return False
    upgraded = False
    for i, fingerprint in enumerate(saved):
        if ":sha256:" not in fingerprint and fingerprint == legacy[i]:
            saved[i] = new[i]
            upgraded = True
    return upgraded
