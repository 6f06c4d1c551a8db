"""The overhead benchmark stays runnable (tiny settings; the numbers themselves live in BENCHMARKS.md)."""
from benchmarks import gal_overhead


def test_overhead_benchmark_runs_and_reports_a_ratio():
    result = gal_overhead.main(["--batch", "4", "--pairs", "2", "--warmup", "1", "--arch", "8"])
    assert result["plain_median_s"] > 0 and result["gal_median_s"] > 0
    assert result["median_pair_ratio"] > 0 and result["pairs"] == 2
