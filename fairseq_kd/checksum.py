"""File checksums: what a teacher cache records of its teachers and what keys a
converted CTranslate2 model, so a changed file is never mistaken for the old one."""
import hashlib


def file_sha256(path, chunk=1 << 24):
    """Hex SHA-256 of a file, read in chunks (checkpoints can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
