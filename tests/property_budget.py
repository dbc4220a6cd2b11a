"""How many examples a property test draws.

The full run (CI's `python3 -m pytest`) draws each test's whole count. A run
that leaves the slow tests out (`-m "not slow"`, the quick feedback while
working) draws an eighth of it, at least 25: the same properties, a smaller
search. PERFTEST_FUZZ_EXAMPLES=N sets every count (a deeper search).
"""

from __future__ import annotations

import os

QUICK = False  # set by conftest.py when the run leaves the slow tests out


def examples(full: int) -> int:
    """The number of examples to draw for a test whose full count is `full`."""
    if wanted := os.environ.get("PERFTEST_FUZZ_EXAMPLES"):
        return int(wanted)
    return max(25, full // 8) if QUICK else full
