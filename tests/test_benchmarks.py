"""benchmarks/reproduce.py and benchmarks/throughput.py on tiny synthetic runs on the CPU."""
import json
import os
import signal

import pytest

from conftest import ROOT, one_line_error, read_json, run_python, start_python, wait_for_line

DEEPCLUSTER = ["--dataset", "synthetic", "--device", "cpu", "--cycles", "2", "--num-clusters", "10",
               "--pca-dim", "8", "--probe-epochs", "1"]
LSDC = ["--dataset", "synthetic", "--device", "cpu", "--split", "test", "--width", "2",
        "--rotnet-epochs", "1", "--rotnet-milestones", "--epochs", "2", "--batch-size", "64",
        "--rotnet-dir", "rotnet"]


def benchmark(name, args, cwd):
    return run_python([os.path.join(ROOT, "benchmarks", name), *args], cwd)


def check_summary(run_dir, stdout, script, sessions):
    """reproduction.json holds final.json's numbers, the sessions' summed time and the hardware, and
    the printed table row shows them."""
    final, summary = read_json(run_dir / "final.json"), read_json(run_dir / "reproduction.json")
    recorded = read_json(run_dir / "sessions.json")
    assert [s["exit_code"] for s in recorded] == sessions
    assert summary["metrics"] and all(summary["metrics"][k] == final[k] for k in summary["metrics"])
    assert summary["sessions"] == len(sessions)
    assert summary["wall_clock_seconds"] == sum(s["seconds"] for s in recorded) > 0
    assert summary["script"] == script and summary["dataset"] == "synthetic"
    assert summary["cores"] == os.cpu_count() and summary["device"] and summary["torch"]
    lines = [line for line in stdout.splitlines() if line.startswith(f"| {script} | synthetic |")]
    assert len(lines) == 1
    assert all(f"{k} {v:.4f}" in lines[0] for k, v in summary["metrics"].items())
    return summary, recorded


def test_reproduce_lsdc_over_two_sessions(tmp_path):
    args = ["lsdc.py", "--run-dir", "run", "--", *LSDC, "--time-limit", "0.0001"]
    first = benchmark("reproduce.py", args, tmp_path)
    assert first.returncode == 3, first.stderr
    assert "run the same command again to continue" in first.stdout
    assert not (tmp_path / "run" / "final.json").exists()
    second = benchmark("reproduce.py", args, tmp_path)
    assert second.returncode == 0, second.stderr
    summary, sessions = check_summary(tmp_path / "run", second.stdout, "lsdc.py", [3, 0])
    assert sessions[1]["command"] == "python lsdc.py --resume run " + " ".join(args[4:])
    assert {"acc", "nmi", "ari"} <= set(summary["metrics"])  # --split test: no separate test_ scores
    assert {k: v["epochs"] for k, v in summary["stages"].items()} == {"rotnet": 1, "lsdc": 2}
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert summary["stages"]["lsdc"]["train_seconds"] == pytest.approx(
        sum(m["train_seconds"] for m in lines if m["stage"] == "lsdc"))


def test_reproduce_deepcluster_stopped_by_sigterm_then_finished(tmp_path):
    """A scheduler's SIGTERM to reproduce.py reaches the script, which stops with a checkpoint; the
    same command finishes the run, and once more only summarises it."""
    flags = [*DEEPCLUSTER, "--cycles", "5"]
    command = [os.path.join(ROOT, "benchmarks", "reproduce.py"), "deepcluster.py", "--run-dir", "run", "--",
               *flags]
    proc = start_python(command, tmp_path, tmp_path / "log.txt", tmp_path / "log.txt")
    wait_for_line(proc, tmp_path / "run", "train", 0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 3, (tmp_path / "log.txt").read_text()
    assert "stopped by SIGTERM" in (tmp_path / "log.txt").read_text()
    assert "run the same command again to continue" in (tmp_path / "log.txt").read_text()

    result = benchmark("reproduce.py", command[1:], tmp_path)
    assert result.returncode == 0, result.stderr
    summary, sessions = check_summary(tmp_path / "run", result.stdout, "deepcluster.py", [3, 0])
    final = read_json(tmp_path / "run" / "final.json")
    assert summary["metrics"] == {k: final[k] for k in ("acc", "nmi", "ari", "nmi_gt", "probe_test_acc")}
    assert summary["stages"]["train"]["epochs"] == 5
    assert [s["command"] for s in sessions] == [
        "python deepcluster.py " + " ".join(flags) + " --out-dir run",
        "python deepcluster.py --resume run " + " ".join(flags)]
    assert summary["command"] == sessions[0]["command"]

    again = benchmark("reproduce.py", command[1:], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "train epoch" not in again.stdout  # a finished run is summarised, not run again
    assert len(read_json(tmp_path / "run" / "sessions.json")) == 2
    before = (tmp_path / "run" / "final.json").read_text()
    refused = benchmark("reproduce.py", [*command[1:], "--num-clusters", "30"], tmp_path)
    assert refused.returncode == 2 and one_line_error(refused.stderr) and "--num-clusters" in refused.stderr
    assert (tmp_path / "run" / "final.json").read_text() == before  # a flag it cannot change: nothing ran


def test_reproduce_usage_errors(tmp_path):
    for args in (["common.py", "--run-dir", "run"], ["lsdc.py", "--run-dir", "run", "--", "--out-dir", "x"]):
        result = benchmark("reproduce.py", args, tmp_path)
        assert result.returncode == 2 and one_line_error(result.stderr), result.stderr
    assert os.listdir(tmp_path) == []


def check_rates(results, keys):
    assert all(results[k] > 0 for k in keys), results


def test_throughput_of_each_method_against_its_bare_step(tmp_path):
    tiny = ["--device", "cpu", "--images", "128", "--warmup", "1", "--repeats", "2", "--calls", "1",
            "--epochs", "1"]
    for method, flags, views in (("lsdc", ["--width", "2", "--batch-size", "32", "--knn-k", "5"], 3),
                                 ("deepcluster", ["--batch-size", "32", "--num-clusters", "10"], 1),
                                 ("cld", ["--width", "2", "--batch-size", "32", "--num-clusters", "8"], 2),
                                 ("suave", ["--width", "2", "--batch-size", "32", "--labels-per-class", "2",
                                            "--labelled-batch-size", "8", "--local-crops", "2",
                                            "--queue-length", "64", "--hidden-dim", "32"], 4),
                                 ("daino", ["--width", "2", "--batch-size", "32", "--labels-per-class", "2",
                                            "--labelled-batch-size", "8", "--local-crops", "2",
                                            "--hidden-dim", "32", "--bottleneck-dim", "16"], 4)):
        out = tmp_path / f"{method}.json"
        args = ["--method", method, *tiny, "--json", out, "--", *flags]
        result = benchmark("throughput.py", args, tmp_path)
        assert result.returncode == 0, result.stderr
        results = json.loads(out.read_text())
        assert results["method"] == method and results["batch_size"] == 32 and results["views"] == views
        check_rates(results, ["method_images_per_s", "bare_step_images_per_s"])
        assert 0 < results["ratio"] < 2
        assert results["ratio"] == results["method_images_per_s"] / results["bare_step_images_per_s"]
        printed = [line.split() for line in result.stdout.splitlines()]
        assert ["ratio_per_view", f"{results['ratio_per_view']:,.3f}"] in printed


def test_throughput_of_the_augmentation(tmp_path):
    tiny = ["--device", "cpu", "--images", "64", "--warmup", "0", "--repeats", "1", "--calls", "1",
            "--width", "2", "--batch-size", "16", "--json", tmp_path / "aug.json"]
    result = benchmark("throughput.py", tiny, tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "aug.json").read_text())
    check_rates(results, ["aug_crop_flip", "aug_simclr", "aug_multicrop_2x32_4x16", "step_full_premade",
                          "step_full_augmented", "step_layer4_premade", "step_layer4_augmented", "inference",
                          "rotnet_premade_views", "rotnet_augmented_views"])
    for name in ("full", "layer4"):
        overhead = 1 - results[f"step_{name}_augmented"] / results[f"step_{name}_premade"]
        assert abs(results[f"aug_overhead_{name}"] - overhead) < 1e-12


def test_throughput_usage_errors(tmp_path):
    """A bad flag for the method is refused by the method's own parser, in one line."""
    args = ["--method", "lsdc", "--device", "cpu", "--", "--width", "-1"]
    result = benchmark("throughput.py", args, tmp_path)
    assert result.returncode == 2 and one_line_error(result.stderr), result.stderr
    assert "--width" in result.stderr
