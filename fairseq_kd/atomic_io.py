"""Atomic file writes: a killed or concurrent process never leaves half a file.

Resumable tools (``fairseq-kd corpus``, ``cache-teacher``) decide what is done
from what is on disk, so every such file is written to a temporary name (unique
per process) and renamed into place.
"""
import os


def write_lines(path, lines):
    """Write ``lines`` (without newlines), one per line, streaming."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
