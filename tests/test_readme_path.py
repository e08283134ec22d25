"""(slow) The README's one-screen path, run line by line as a user would, on a
Bible slice: encode, binarize, corpus, train, export, translate.

The only changes to the README's lines: the corpus folder (``D=``) is the slice,
and training stops after a few updates (``--max-update``) instead of by
--patience.
"""
import os
import re
import subprocess

import pytest

from helpers import BIN, REPO, bible_slice, env

pytestmark = pytest.mark.slow


def readme_block(marker):
    """The shell lines between ``<!-- MARKER -->`` and ``<!-- /MARKER -->`` of the README."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```\n<!-- /{marker} -->", text, re.S)
    assert m, f"README has no '{marker}' block"
    return m.group(1)


def test_readme_one_screen_path_runs_as_written(tmp_path):
    script = readme_block("one-screen path")
    corpus = tmp_path / "corpus"
    bible_slice(corpus, {"train": 300, "valid": 20, "test": 10})
    script, n = re.subn(r"^D=\S+", f"D={corpus}", script, flags=re.M)
    assert n == 1
    script, n = re.subn(r"--warmup-updates 1000", "--warmup-updates 10 --max-update 12 --cpu", script)
    assert n == 1
    for name in ("fairseq_kd", "examples"):  # the README's lines run from the repository root
        os.symlink(REPO / name, tmp_path / name)
    e = env()
    e["PATH"] = f"{BIN}{os.pathsep}{e['PATH']}"
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=e,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kd = tmp_path / "kd"
    train_lines = (corpus / "train.es").read_text(encoding="utf-8").count("\n")
    assert (kd / "distilled" / "train.en").read_text(encoding="utf-8").count("\n") == train_lines
    assert (kd / "student" / "checkpoint_best.pt").is_file()
    assert (kd / "student_ct2" / "model.bin").is_file()
    # the README's last line printed the student's translation of its one Spanish line
    echo = script.strip().splitlines()[-1]
    sentence = re.match(r'echo "(.*)" \| fairseq-kd translate --model kd/student_ct2$', echo).group(1)
    again = subprocess.run([str(BIN / "fairseq-kd"), "translate", "--model", str(kd / "student_ct2")],
                           input=sentence + "\n", env=e, capture_output=True, text=True, check=True)
    assert again.stdout.count("\n") == 1
    assert proc.stdout.endswith(again.stdout)
