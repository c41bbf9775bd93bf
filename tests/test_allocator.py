"""The allocator setting (npgpt/allocator.py): arrays freed by one step are reused by the next without
page faults; with NPGPT_KEEP_MEMORY=0 nothing is changed (and the faults come back)."""
import os
import subprocess
import sys
import textwrap

import pytest

from npgpt.allocator import _glibc

pytestmark = pytest.mark.skipif(not _glibc(), reason="glibc's mallopt")

# a training-step-like pattern: allocate and touch 24 MiB of arrays, drop them, again; page faults per round
PROBE = textwrap.dedent("""
    import resource, numpy as np, npgpt
    from npgpt import allocator
    def round_():
        arrays = [np.ones((1 << 20,), np.float32) for _ in range(6)]    # 6 x 4 MiB, each written
        return sum(float(a[-1]) for a in arrays)
    for _ in range(3):
        round_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        round_()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
    print(allocator.kept(), faults)
""")


def _probe(keep):
    env = dict(os.environ, NPGPT_KEEP_MEMORY="1" if keep else "0",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept == "True", float(faults)


def test_freed_memory_is_reused_without_page_faults():
    kept, faults = _probe(keep=True)
    assert kept
    pages = 6 * (4 << 20) // 4096           # 6144 pages a round if every array were faulted in anew
    assert faults < 0.05 * pages


def test_switch_off_leaves_malloc_alone():
    """The same pattern with the setting off faults pages in again every round (glibc trims the freed
    top of the heap), which is what the setting exists to avoid."""
    kept, faults = _probe(keep=False)
    assert not kept
    assert faults > 0.2 * (6 * (4 << 20) // 4096)
