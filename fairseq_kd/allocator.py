"""Host-memory allocator settings for CPU beam search.

fairseq's incremental decoding allocates and frees large tensors at every
step (the self-attention key/value caches are concatenated and reordered,
each time into a new tensor of size O(step)).  With glibc's default settings
every such tensor above the mmap threshold (at most 32 MiB) is a fresh
``mmap`` whose pages are faulted in and zeroed, then unmapped when freed.
Decoding 500 sentences with a 256-dim teacher on 2 cores spent 25 of its 120
CPU seconds in the kernel that way.  Serving every block from the heap and
keeping freed memory removes that cost without changing a single number of
the computation: the outputs are identical.
"""
import ctypes
import logging
import sys

logger = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

# Keep freed memory instead of trimming the heap back after every step.
TRIM_THRESHOLD = 2 ** 31 - 1
# Grow the heap in large steps (address space only: pages are touched when used).
TOP_PAD = 256 * 1024 * 1024


def keep_freed_memory():
    """Tell glibc to serve every block from the heap and keep freed memory.

    ``M_MMAP_MAX = 0`` rather than a higher mmap threshold: glibc caps that
    threshold at 32 MiB, and a batch of a few hundred sentences times the beam
    has larger caches.  Returns True when the settings took effect (Linux with
    glibc), False elsewhere, where nothing changes.  The cost is that the
    process keeps its peak heap size until it exits, which suits a worker
    that decodes a corpus; call it only in such processes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    if not ok:
        logger.warning("mallopt refused the allocator settings; decoding on CPU may be slower")
    return ok
