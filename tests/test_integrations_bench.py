"""On a GPU: benchmarks/bench_integrations.py times every function that patch() replaces, for
each installed library, the library's own function against ours, with inputs made on the GPU.

This test checks that the benchmark measures what it names, at small shapes: every case of an
installed library gets a median time from both providers, and the patched provider ran our
replacement (the benchmark turns a FallThroughWarning into a failure). No time is asserted.
The figures at one realistic shape per function come from the benchmark itself, a stage of
benchmarks/gpu_check.sh, and go to benchmarks/RESULTS.md.
"""

import os

import pytest

from tests._helpers import load_script

pytestmark = pytest.mark.cuda

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_integrations.py")


def test_bench_integrations_times_every_replaced_function_on_the_gpu():
    bench = load_script(BENCH, "bench_integrations")
    records = []
    skipped = bench.run("cuda", bench.LIBRARIES, 2, records, quick=True)
    libraries = [lib for lib in bench.LIBRARIES if lib not in skipped]
    if not libraries:
        pytest.skip("no library imports here: %s (tests/install_integrations.sh, or wheels in .whl for "
                    "benchmarks/gpu_check.sh)" % skipped)
    cases = [c for c in bench.cases(bench.shapes("cuda", quick=True)) if c.library in libraries
             and c.library + "." + c.name not in skipped]
    assert cases
    timed = {(r["library"], r["op"], r["provider"]): r["median_s"] for r in records}
    for case in cases:
        for provider in ("original", "patched"):
            seconds = timed.get((case.library, case.label, provider))
            assert isinstance(seconds, float) and seconds > 0, (case.library, case.label, provider, seconds)
