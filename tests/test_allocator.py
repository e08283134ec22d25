"""fairseq_kd.allocator: freed tensors are reused from the heap instead of fresh mmaps."""
import subprocess
import sys

import pytest

from helpers import REPO

# Allocates, touches and frees a tensor that grows by 1 MiB a round (as the
# key/value caches of incremental decoding do) and prints the minor page
# faults of the last 10 rounds, 50-59 MiB (above glibc's largest mmap
# threshold, 32 MiB): each fresh mmap faults in all its pages, a heap block
# that is reused and grown only the new ones.
FAULTS = """
import resource, sys, torch
sys.path.insert(0, {repo!r})
if {tuned}:
    from fairseq_kd.allocator import keep_freed_memory
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(20):
    if i == 10:
        start = faults()
    t = torch.ones((40 + i) * 256 * 1024)  # (40 + i) MiB, written to
    del t
print(faults() - start)
"""


def page_faults_per_round(tuned):
    out = subprocess.run([sys.executable, "-c", FAULTS.format(repo=str(REPO), tuned=tuned)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) / 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_are_reused_not_remapped():
    pages = 50 * 1024 * 1024 // 4096  # of the smallest of the 10 tensors
    default, tuned = page_faults_per_round(tuned=False), page_faults_per_round(tuned=True)
    assert default > pages  # glibc's default: a new mmap, all pages faulted in, every round
    assert tuned < default / 4  # the freed heap block is reused: only its growth is faulted in
