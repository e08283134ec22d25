"""Host-memory allocator settings for CPU beam search.

fairseq's incremental decoding allocates and frees large tensors at every
step (the self-attention key/value caches are concatenated and reordered,
each time into a new tensor of size O(step)).  With glibc's default settings
every such tensor above the mmap threshold is a fresh ``mmap`` whose pages are
faulted in and zeroed, then returned to the kernel when freed.  On a 256-dim
teacher decoding on CPU this made a third of the process's CPU time system
time; serving these blocks from the heap and keeping freed memory removes it
without changing a single number of the computation (outputs are identical).
"""
import ctypes
import logging
import sys

logger = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# The largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD = 32 * 1024 * 1024
# Keep freed memory instead of trimming the heap back after every step.
TRIM_THRESHOLD = 2 ** 31 - 1
TOP_PAD = 256 * 1024 * 1024


def keep_freed_memory():
    """Tell glibc to serve tensors below 32 MiB from the heap and keep freed memory.

    Returns True when the settings took effect (Linux with glibc), False
    elsewhere, where nothing changes.  The cost is that the process keeps its
    peak heap size until it exits, which suits a worker that decodes a corpus.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    if not ok:
        logger.warning("mallopt refused the allocator settings; decoding on CPU may be slower")
    return ok
