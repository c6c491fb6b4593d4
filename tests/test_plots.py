"""Tests of plots.py: the data of each figure from hand-made run directories, the command-line
errors, and that each figure is written as a PNG (skipped without matplotlib)."""
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

import plots
from common import Abort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(path, args=None, metrics=None, final=None, tail=""):
    """A run directory as common.Run writes it; `tail` is appended to metrics.jsonl as is."""
    os.makedirs(path, exist_ok=True)
    if args is not None:
        with open(os.path.join(path, "args.json"), "w") as f:
            json.dump(args, f)
    if metrics is not None:
        with open(os.path.join(path, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in metrics)
            f.write(tail)
    if final is not None:
        with open(os.path.join(path, "final.json"), "w") as f:
            json.dump(final, f)
    return str(path)


LSDC_METRICS = [
    {"stage": "rotnet", "epoch": 0, "loss": 1.4},
    {"stage": "rotnet", "epoch": 1, "loss": 1.1},
    {"stage": "lsdc", "epoch": 0, "loss": 0.3, "acc": 0.5, "test_acc": 0.45},
    {"stage": "lsdc", "epoch": 1, "loss": 0.2, "acc": 0.6, "test_acc": 0.55},
]
CONFUSION = [[1, 8, 1], [7, 2, 1], [0, 1, 9]]  # cluster 0 is class 1, cluster 1 class 0, cluster 2 class 2


@pytest.fixture
def lsdc_run(tmp_path):
    """Two stages, and a line cut short by a kill at the end of metrics.jsonl."""
    return write_run(tmp_path / "lsdc_run", {"dataset": "synthetic", "seed": 0}, LSDC_METRICS,
                     {"acc": 0.8, "confusion": CONFUSION}, tail='{"stage": "lsdc", "epoch": 2, "lo')


def ia_summary(k, pca, values):
    return {"k": k, "pca_dim": pca, "min": min(values), "q1": values[1], "median": values[2], "q3": values[3],
            "max": max(values), "values": values}


def deepcluster_run(path, halt, cycles, acc):
    return write_run(path, {"dataset": "fashion-mnist", "halt_clustering": halt, "cycles": cycles},
                     [{"stage": "train", "epoch": 0, "nmi_gt": 0.30},
                      {"stage": "train", "epoch": 1, "nmi_prev": 0.70, "nmi_gt": 0.35},
                      {"stage": "train", "epoch": 2, "nmi_prev": 0.80, "nmi_gt": 0.33}],
                     {"cycles": cycles, "probe_test_acc": acc, "nmi_gt": 0.33})


# ------------------------------------------------------------------------------------------------
# Finding a run's files
# ------------------------------------------------------------------------------------------------
def test_a_run_is_a_directory_or_one_of_its_files(lsdc_run, tmp_path):
    assert plots.run_file(lsdc_run, "final.json") == os.path.join(lsdc_run, "final.json")
    assert (plots.run_file(os.path.join(lsdc_run, "args.json"), "metrics.jsonl")
            == os.path.join(lsdc_run, "metrics.jsonl"))
    assert plots.run_name(lsdc_run) == plots.run_name(os.path.join(lsdc_run, "final.json")) == "lsdc_run"
    # a flat copy, as in benchmarks/results/: <name>.<file>
    flat = tmp_path / "results"
    flat.mkdir()
    for name in ("args.json", "metrics.jsonl", "final.json"):
        shutil.copy(os.path.join(lsdc_run, name), flat / f"x_h100.{name}")
    run = str(flat / "x_h100.final.json")
    assert plots.run_file(run, "metrics.jsonl") == str(flat / "x_h100.metrics.jsonl")
    assert plots.run_name(run) == "x_h100"
    assert plots.curve_data(run, ["acc"]).keys() == {("lsdc", "acc")}


@pytest.mark.parametrize("where, name, message", [
    ("nowhere", "final.json", "nowhere: no such run directory or file"),
    ("lsdc_run/notes.txt", "final.json",
     "not a run directory nor one of its files (args.json, metrics.jsonl"),
    ("empty", "final.json", "empty: no final.json (looked for"),
    ("lsdc_run/final.json", "checkpoint.pt", "final.json: no checkpoint.pt (looked for"),
])
def test_missing_runs_and_files_are_named(lsdc_run, tmp_path, where, name, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "lsdc_run" / "notes.txt").write_text("")
    with pytest.raises(Abort, match=r"^[^\n]*" + message.replace("(", r"\(")):
        plots.run_file(str(tmp_path / where), name)


# ------------------------------------------------------------------------------------------------
# The data of each figure
# ------------------------------------------------------------------------------------------------
def test_curve_data_of_a_stage_skips_the_line_cut_short(lsdc_run):
    curves = plots.curve_data(lsdc_run, ["acc", "test_acc"], "lsdc")
    assert list(curves) == [("lsdc", "acc"), ("lsdc", "test_acc")]
    assert curves[("lsdc", "acc")][0].tolist() == [0, 1]
    assert curves[("lsdc", "acc")][1].tolist() == [0.5, 0.6]
    assert curves[("lsdc", "test_acc")][1].tolist() == [0.45, 0.55]


def test_curve_data_without_a_stage_keeps_the_stages_apart(lsdc_run):
    curves = plots.curve_data(lsdc_run, ["loss"])
    assert list(curves) == [("rotnet", "loss"), ("lsdc", "loss")]
    assert curves[("rotnet", "loss")][1].tolist() == [1.4, 1.1]
    assert curves[("lsdc", "loss")][1].tolist() == [0.3, 0.2]


def test_unknown_keys_and_stages_list_what_exists(lsdc_run):
    with pytest.raises(Abort, match="no metric 'nmi' in stage lsdc; keys there: acc, loss, test_acc$"):
        plots.curve_data(lsdc_run, ["acc", "nmi"], "lsdc")
    with pytest.raises(Abort, match="no stage 'train' in metrics.jsonl; stages there: rotnet, lsdc$"):
        plots.curve_data(lsdc_run, ["acc"], "train")


def test_a_broken_line_before_the_last_is_an_error(tmp_path):
    run = write_run(tmp_path / "r", metrics=[])
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write('{"stage": "lsdc", "epo\n{"stage": "lsdc", "epoch": 1, "acc": 0.5}\n')
    with pytest.raises(Abort, match="metrics.jsonl: line 1 is not JSON"):
        plots.curve_data(run, ["acc"])


def test_matched_confusion_puts_the_matched_cells_on_the_diagonal():
    counts, clusters, classes, acc = plots.matched_confusion(CONFUSION)
    assert clusters.tolist() == [1, 0, 2] and classes.tolist() == [0, 1, 2]
    assert counts.tolist() == [[7, 2, 1], [1, 8, 1], [0, 1, 9]]
    assert acc == pytest.approx((7 + 8 + 9) / 30)


def test_matched_confusion_with_more_clusters_than_classes_uses_the_majority():
    counts, clusters, classes, acc = plots.matched_confusion([[5, 1], [1, 4], [3, 0], [0, 2]])
    assert clusters.tolist() == [0, 2, 1, 3] and classes.tolist() == [0, 0, 1, 1]
    assert counts.tolist() == [[5, 1], [3, 0], [1, 4], [0, 2]]
    assert acc == pytest.approx((5 + 4 + 3 + 2) / 16)


def test_confusion_data_reads_final_json_and_names_the_matrices(lsdc_run):
    assert plots.confusion_data(lsdc_run)[3] == pytest.approx(0.8)
    with pytest.raises(Abort, match="no 'test_confusion' in final.json; matrices there: confusion$"):
        plots.confusion_data(lsdc_run, "test_confusion")


def test_ia_boxes_are_sorted_by_k_then_pca_across_runs(tmp_path):
    a = write_run(tmp_path / "a", final={"initial_alignment": {
        "k10_pca0": ia_summary(10, 0, [0.5, 0.52, 0.55, 0.57, 0.6]),
        "k5_pca64": ia_summary(5, 64, [0.3, 0.33, 0.35, 0.37, 0.4])}, "seeds": [0, 1, 2, 3, 4]})
    b = write_run(tmp_path / "b", final={"initial_alignment": {
        "k5_pca0": ia_summary(5, 0, [0.1, 0.12, 0.15, 0.17, 0.2])}, "seeds": [0, 1, 2, 3, 4]})
    boxes = plots.ia_boxes([a, b])
    assert [(box["k"], box["pca_dim"]) for box in boxes] == [(5, 0), (5, 64), (10, 0)]
    assert [box["label"] for box in boxes] == ["k=5\nPCA off\n5 seeds", "k=5\nPCA 64\n5 seeds",
                                               "k=10\nPCA off\n5 seeds"]
    assert [[box[s] for s in ("whislo", "q1", "med", "q3", "whishi")] for box in boxes] == [
        [0.1, 0.12, 0.15, 0.17, 0.2], [0.3, 0.33, 0.35, 0.37, 0.4], [0.5, 0.52, 0.55, 0.57, 0.6]]


def test_ia_boxes_of_a_training_run_is_an_error(lsdc_run):
    with pytest.raises(Abort, match="final.json has no initial_alignment"):
        plots.ia_boxes([lsdc_run])


def test_halting_points_group_runs_by_their_clustering_cycles(tmp_path):
    runs = [deepcluster_run(tmp_path / "never", None, 10, 0.6), deepcluster_run(tmp_path / "h2a", 2, 10, 0.5),
            deepcluster_run(tmp_path / "h20", 20, 10, 0.4), deepcluster_run(tmp_path / "h2b", 2, 10, 0.7)]
    assert plots.halting_points(runs) == {2: [0.5, 0.7], 10: [0.6, 0.4]}
    assert plots.halting_points(runs[:1], "nmi_gt") == {10: [0.33]}
    with pytest.raises(Abort, match="no 'acc' in final.json; keys there: cycles, probe_test_acc, nmi_gt$"):
        plots.halting_points(runs, "acc")


def test_halting_needs_deepcluster_runs(lsdc_run):
    with pytest.raises(Abort, match="args.json has no halt_clustering"):
        plots.halting_points([lsdc_run])


def test_nmi_curves_start_at_the_second_cycle(tmp_path):
    curves = plots.curve_data(deepcluster_run(tmp_path / "dc", None, 3, 0.6), ["nmi_gt", "nmi_prev"], "train")
    assert curves[("train", "nmi_gt")][0].tolist() == [0, 1, 2]
    assert curves[("train", "nmi_prev")][0].tolist() == [1, 2]
    assert curves[("train", "nmi_prev")][1].tolist() == [0.70, 0.80]


# ------------------------------------------------------------------------------------------------
# Figures and the command line
# ------------------------------------------------------------------------------------------------
def png_size(path):
    """(width, height) from the PNG header, after checking the signature."""
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize("figure, extra, size", [
    ("curves", ["--keys", "acc", "test_acc", "--stage", "lsdc"], (350, 225)),
    ("curves", ["--keys", "loss"], (350, 225)),
    ("confusion", [], (165, 135)),
    ("ia", [], (175, 225)),
    ("halting", [], (300, 225)),
    ("nmi", [], (500, 200)),
])
def test_each_figure_is_written_as_a_png(lsdc_run, tmp_path, figure, extra, size, capsys):
    pytest.importorskip("matplotlib")
    ia = write_run(tmp_path / "ia", final={"initial_alignment": {
        "k5_pca0": ia_summary(5, 0, [0.1, 0.2, 0.3, 0.4, 0.5])}})
    dc = [deepcluster_run(tmp_path / "h1", 1, 3, 0.5), deepcluster_run(tmp_path / "never", None, 3, 0.6)]
    runs = {"curves": [lsdc_run], "confusion": [lsdc_run], "ia": [ia], "halting": dc, "nmi": dc}[figure]
    out = tmp_path / "figures" / f"{figure}.png"
    plots.main([figure, *runs, *extra, "-o", str(out), "--dpi", "50"])
    assert png_size(out) == size and os.path.getsize(out) > 3000
    assert capsys.readouterr().out == f"{out}\n"


def run_plots(code_before, args, cwd):
    """`python plots.py ARGS` in `cwd`, after running `code_before` in the same interpreter."""
    code = (f"import runpy, sys; {code_before}; sys.argv = ['plots.py', *{args!r}]; "
            f"runpy.run_path({os.path.join(ROOT, 'plots.py')!r}, run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_without_matplotlib_one_line_says_how_to_install_it(lsdc_run, tmp_path):
    result = run_plots("sys.modules['matplotlib'] = None", ["curves", lsdc_run, "--keys", "acc"], tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "pip install matplotlib" in result.stderr
    assert not os.path.exists(tmp_path / "curves.png")


def test_a_user_mistake_is_one_line_without_traceback(tmp_path):
    pytest.importorskip("matplotlib")
    result = run_plots("pass", ["confusion", str(tmp_path / "nowhere")], tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"plots.py: error: {tmp_path / 'nowhere'}: no such run directory or file\n"
    run = write_run(tmp_path / "run", metrics=LSDC_METRICS)
    (tmp_path / "afile").write_text("x")
    result = run_plots("pass", ["curves", run, "--keys", "loss", "-o", str(tmp_path / "afile" / "x.png")],
                       tmp_path)
    assert result.returncode == 2 and "cannot write the figure there" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_the_method_files_never_import_matplotlib():
    for name in ("common.py", "lsdc.py", "deepcluster.py"):
        with open(os.path.join(ROOT, name)) as f:
            assert "matplotlib" not in f.read(), name
