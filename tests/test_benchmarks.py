"""The benchmarks stay runnable (tiny settings; the numbers themselves live in BENCHMARKS.md)."""
from benchmarks import gal_overhead


def test_overhead_benchmark_runs_and_reports_a_ratio():
    result = gal_overhead.main(["--batch", "4", "--pairs", "2", "--warmup", "1", "--arch", "8"])
    assert result["plain_median_s"] > 0 and result["gal_median_s"] > 0
    assert result["median_pair_ratio"] > 0 and result["pairs"] == 2


def test_overhead_benchmark_runs_a_compiled_gal_step():
    result = gal_overhead.main(["--batch", "4", "--pairs", "2", "--warmup", "1", "--arch", "8", "--mode", "compiled"])
    assert result["mode"] == "compiled" and result["median_pair_ratio"] > 0 and result["cudagraph_skips"] == []


def test_ops_benchmark_counts_ops_kernels_and_milliseconds():
    from benchmarks import gal_ops

    result = gal_ops.main(["--rows", "4", "--classes", "5", "--arch", "8", "--repeats", "2", "--rounds", "1",
                           "--modes", "eager,compiled"])
    eager, plain = result["ops_eager_step"], result["ops_plain_backward"]
    assert plain["work_ops"] > 0 and eager["work_ops"] > plain["work_ops"]
    assert eager["matmuls"] == 5  # h's two Linear layers: 2 forward, 3 backward (no gradient into z0)
    assert result["ops_eager_step_reading_statistics"]["work_ops"] > eager["work_ops"]  # read on demand
    assert result["inductor_kernels_compiled_step"]["per_graph"] == [1, 1]  # CPU: forward, backward
    assert result["ops_compiled_step_outside_inductor"]["work_ops"] < eager["work_ops"]
    assert all(result[f"gal_{mode}_ms"] > 0 for mode in ("eager", "compiled"))


def test_classification_throughput_benchmark_runs_the_real_trainer(capsys):
    import json

    from benchmarks import classification_throughput

    classification_throughput.main(["--model", "test_efficientnet", "--image-size", "32", "--batch", "8",
                                    "--steps", "1", "--pairs", "1"])
    result = json.loads(capsys.readouterr().out)
    assert result["plain_images_per_s"] > 0 and result["gal_images_per_s"] > 0
    assert result["median_pair_ratio"] > 0 and result["pairs"] == 1
    assert result["model"] == "test_efficientnet" and result["image_size"] == 32 and result["batch"] == 8


def test_startup_benchmark_times_cold_and_warm_runs():
    from benchmarks import startup

    result = startup.main(["--repeats", "1", "--epochs", "1"])
    assert set(result["median_wall_s"]) == {"cold", "warm"} and all(v > 0 for v in result["median_wall_s"].values())
    assert len(result["all_wall_s"]["cold"]) == len(result["all_wall_s"]["warm"]) == 1


def test_dvc_lock_benchmark_times_dvcs_rewrite_and_ours():
    from benchmarks import dvc_lock

    (size,) = dvc_lock.main(["--stages", "3", "--deps", "2", "--repeats", "1"])["sizes"]
    assert size["stages"] == 3 and size["lines"] > 3 * 2 * 4
    assert all(size["median_s"][k] > 0 for k in ("dvc", "ours_first", "ours_next"))
