"""The benchmarks stay runnable (tiny settings; the numbers themselves live in BENCHMARKS.md)."""
from benchmarks import gal_overhead


def test_overhead_benchmark_runs_and_reports_a_ratio():
    result = gal_overhead.main(["--batch", "4", "--pairs", "2", "--warmup", "1", "--arch", "8"])
    assert result["plain_median_s"] > 0 and result["gal_median_s"] > 0
    assert result["median_pair_ratio"] > 0 and result["pairs"] == 2


def test_classification_throughput_benchmark_runs_the_real_trainer(capsys):
    import json

    from benchmarks import classification_throughput

    classification_throughput.main(["--model", "test_efficientnet", "--image-size", "32", "--batch", "8",
                                    "--steps", "1", "--pairs", "1"])
    result = json.loads(capsys.readouterr().out)
    assert result["plain_images_per_s"] > 0 and result["gal_images_per_s"] > 0
    assert result["median_pair_ratio"] > 0 and result["pairs"] == 1
    assert result["model"] == "test_efficientnet" and result["image_size"] == 32 and result["batch"] == 8
