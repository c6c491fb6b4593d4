"""Figures of run directories, drawn as the papers show them, written as PNG files.

  python plots.py curves RUN [RUN ...] --keys acc test_acc [--stage lsdc] -o curves.png
      any metrics.jsonl keys over the epochs, several runs overlaid
  python plots.py confusion RUN [--key test_confusion] -o confusion.png
      final.json's confusion matrix, rows ordered by their matched class (LSD-C supp. Fig. 1)
  python plots.py ia RUN [RUN ...] -o ia.png
      Initial Alignment per k and PCA size as box plots (Deep Dive Figs. 3, 6, B.1-B.3)
  python plots.py halting RUN [RUN ...] -o halting.png
      probe accuracy against the cycle the clustering halted at (Deep Dive Fig. 5)
  python plots.py nmi RUN [RUN ...] -o nmi.png
      NMI with the labels and between consecutive clusterings over cycles (DeepCluster Fig. 2)

A RUN is a run directory (runs/lsdc__cifar10__0__.../) or one of its files; a file named
<name>.final.json (as in benchmarks/results/) finds the run's other files beside it, as
<name>.metrics.jsonl and <name>.args.json. matplotlib is needed by this script only.
"""
import argparse
import json
import os

import numpy as np

import common
from common import Abort

RUN_FILES = ("args.json", "metrics.jsonl", "final.json")
CLASS_NAMES = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "fashion-mnist": ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                      "bag", "boot"),
}


# ------------------------------------------------------------------------------------------------
# Reading runs
# ------------------------------------------------------------------------------------------------
def _prefix(run):
    """The path that a run file's name completes: 'DIR/' for a directory, 'results/x.' for a file
    'results/x.final.json'."""
    if os.path.isdir(run):
        return os.path.join(run, "")
    if not os.path.exists(run):
        raise Abort(f"{run}: no such run directory or file")
    for name in RUN_FILES:
        if os.path.basename(run) == name or run.endswith("." + name):
            return run[:-len(name)]
    raise Abort(f"{run}: not a run directory nor one of its files ({', '.join(RUN_FILES)})")


def run_name(run):
    """The name a run is shown under: its directory's name, or 'x' for 'results/x.final.json'."""
    return os.path.basename(os.path.abspath(_prefix(run)).rstrip("."))


def run_file(run, name, required=True):
    """The path of the run's file `name`; None (or, when `required`, an Abort) if it does not exist."""
    path = _prefix(run) + name
    if os.path.isfile(path):
        return path
    if required:
        raise Abort(f"{run}: no {name} (looked for {path})")
    return None


def read_json(run, name):
    path = run_file(run, name)
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as error:
        raise Abort(f"{path}: not JSON ({error})")


def read_metrics(run):
    """The lines of metrics.jsonl as dicts; a half-written last line (the run was killed) is skipped."""
    path = run_file(run, "metrics.jsonl")
    with open(path) as f:
        lines = f.read().splitlines()
    metrics = []
    for i, line in enumerate(lines):
        try:
            metrics.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise Abort(f"{path}: line {i + 1} is not JSON")
    return metrics


# ------------------------------------------------------------------------------------------------
# The data of each figure
# ------------------------------------------------------------------------------------------------
def curve_data(run, keys, stage=None):
    """{(stage, key): (epochs, values)} for each requested key of metrics.jsonl, in the order of
    `keys`; without `stage`, a key comes from every stage that logs it (e.g. RotNet and LSD-C loss)."""
    metrics = read_metrics(run)
    stages = list(dict.fromkeys(m["stage"] for m in metrics))
    if stage is not None and stage not in stages:
        raise Abort(f"{run}: no stage {stage!r} in metrics.jsonl; stages there: {', '.join(stages)}")
    lines = [m for m in metrics if stage in (None, m["stage"])]
    available = sorted({k for m in lines for k in m} - {"stage", "epoch"})
    curves = {}
    for key in keys:
        if key not in available:
            where = f"stage {stage}" if stage else "metrics.jsonl"
            raise Abort(f"{run}: no metric {key!r} in {where}; keys there: {', '.join(available)}")
        for s in stages:
            points = [(m["epoch"], m[key]) for m in lines if m["stage"] == s and key in m]
            if points:
                curves[(s, key)] = tuple(np.array(v) for v in zip(*points))
    return curves


def matched_confusion(counts):
    """Rows of a clusters x classes count matrix ordered by the class each cluster is matched to
    (common.cluster_to_class: Hungarian, or majority with more clusters than classes), so the
    matched cells lie on the diagonal. Returns (ordered counts, the cluster of each row, the class
    of each row, accuracy = matched samples / all samples)."""
    counts = np.asarray(counts)
    classes = common.cluster_to_class(counts)
    order = np.argsort(classes, kind="stable")
    return counts[order], order, classes[order], counts[np.arange(len(counts)), classes].sum() / counts.sum()


def confusion_data(run, key="confusion"):
    """matched_confusion of final.json's `key`."""
    final = read_json(run, "final.json")
    if key not in final:
        matrices = [k for k, v in final.items() if isinstance(v, list) and v and isinstance(v[0], list)]
        raise Abort(f"{run}: no {key!r} in final.json; matrices there: {', '.join(matrices) or 'none'}")
    return matched_confusion(final[key])


def ia_boxes(runs):
    """The Initial Alignment boxes of the runs' final.json, sorted by k then PCA size, as
    matplotlib's bxp wants them (whiskers at the minimum and maximum over the seeds)."""
    boxes = []
    for run in runs:
        final = read_json(run, "final.json")
        if "initial_alignment" not in final:
            raise Abort(f"{run}: final.json has no initial_alignment (not a run with --ia-seeds)")
        for s in final["initial_alignment"].values():
            boxes.append({"k": s["k"], "pca_dim": s["pca_dim"], "whislo": s["min"], "q1": s["q1"],
                          "med": s["median"], "q3": s["q3"], "whishi": s["max"], "fliers": [],
                          "label": f"k={s['k']}\nPCA {s['pca_dim'] or 'off'}\n{len(s['values'])} seeds"})
    return sorted(boxes, key=lambda b: (b["k"], b["pca_dim"]))


def halting_points(runs, key="probe_test_acc"):
    """{clustering cycles: [final.json `key` of each run]}, sorted by the cycles: the number of cycles
    that clustered, min(--halt-clustering, --cycles), or --cycles for a run that never halted."""
    points = {}
    for run in runs:
        args, final = read_json(run, "args.json"), read_json(run, "final.json")
        if "halt_clustering" not in args:
            raise Abort(f"{run}: args.json has no halt_clustering (not a DeepCluster run)")
        if key not in final:
            raise Abort(f"{run}: no {key!r} in final.json; keys there: {', '.join(final)}")
        halt = args["halt_clustering"]
        points.setdefault(args["cycles"] if halt is None else min(halt, args["cycles"]),
                          []).append(final[key])
    return dict(sorted(points.items()))


# ------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------
def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or one line saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise Abort("the figures need matplotlib, which is not installed: pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def draw_curves(plt, args):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in args.runs:
        curves = curve_data(run, args.keys, args.stage)
        for (stage, key), (x, y) in curves.items():
            label = key if args.stage or len({s for s, _ in curves}) == 1 else f"{stage}/{key}"
            ax.plot(x, y, label=f"{run_name(run)}: {label}" if len(args.runs) > 1 else label)
    ax.set(xlabel="epoch (as logged, from 0)", ylabel=", ".join(args.keys))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def draw_confusion(plt, args):
    run = args.runs[0]
    counts, clusters, classes, acc = confusion_data(run, args.key)
    dataset = (read_json(run, "args.json").get("dataset") if run_file(run, "args.json", required=False)
               else None)
    names = CLASS_NAMES.get(dataset, ())
    names = names if len(names) == counts.shape[1] else range(counts.shape[1])
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(min(16, 1.5 + 0.6 * counts.shape[1]),
                                    min(16, 1.2 + 0.5 * counts.shape[0])))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if counts.size <= 400:
        for (k, c), n in np.ndenumerate(counts):
            ax.text(c, k, n, ha="center", va="center", fontsize=7,
                    color="white" if share[k, c] > 0.5 else "black")
    ax.set_xticks(range(counts.shape[1]), names, rotation=45, ha="right")
    ax.set_yticks(range(counts.shape[0]), [f"{k} -> {names[c]}" for k, c in zip(clusters, classes)])
    ax.set(xlabel="class", ylabel="cluster -> matched class",
           title=f"{run_name(run)} {args.key}: ACC {100 * acc:.1f} %")
    fig.colorbar(image, ax=ax, label="share of the cluster")
    return fig


def draw_ia(plt, args):
    boxes = ia_boxes(args.runs)
    fig, ax = plt.subplots(figsize=(max(3.5, 1.5 + 1.0 * len(boxes)), 4.5))
    ax.bxp(boxes, showfliers=False)
    ax.set(ylabel="Initial Alignment: NMI(k-means, labels)", title=", ".join(map(run_name, args.runs)))
    ax.grid(axis="y", alpha=0.3)
    return fig


def draw_halting(plt, args):
    points = halting_points(args.runs, args.key)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for x, ys in points.items():
        ax.scatter([x] * len(ys), ys, color="tab:blue", alpha=0.6)
    ax.plot(list(points), [np.mean(ys) for ys in points.values()], color="tab:blue", label="mean over runs")
    ax.set(xlabel="cycles with clustering (halted after)", ylabel=args.key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def draw_nmi(plt, args):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for run in args.runs:
        curves = curve_data(run, ["nmi_gt", "nmi_prev"], "train")
        for ax, key in zip(axes, ("nmi_gt", "nmi_prev")):
            ax.plot(*curves[("train", key)], label=run_name(run))
    axes[0].set(xlabel="cycle", ylabel="NMI", title="NMI(clusters, labels)")
    axes[1].set(xlabel="cycle", ylabel="NMI", title="NMI(clusters of cycle t - 1, of cycle t)")
    for ax in axes:
        ax.grid(alpha=0.3)
    if len(args.runs) > 1:
        axes[0].legend(fontsize="small")
    return fig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="figure", required=True)
    figures = {
        "curves": (draw_curves, "metrics.jsonl keys over the epochs, runs overlaid"),
        "confusion": (draw_confusion, "final.json's confusion matrix, matched cells on the diagonal"),
        "ia": (draw_ia, "Initial Alignment box plots per k and PCA size"),
        "halting": (draw_halting, "probe accuracy against the halting cycle, across runs"),
        "nmi": (draw_nmi, "DeepCluster's NMI curves over the cycles"),
    }
    for name, (draw, text) in figures.items():
        s = sub.add_parser(name, help=text, description=text)
        s.set_defaults(draw=draw)
        s.add_argument("runs", nargs=1 if name == "confusion" else "+", metavar="RUN",
                       help="run directory, or one of its files (e.g. benchmarks/results/x.final.json)")
        s.add_argument("-o", "--out", default=f"{name}.png", help=f"PNG to write (default {name}.png)")
        s.add_argument("--dpi", type=int, default=100)
        if name == "curves":
            s.add_argument("--keys", nargs="+", required=True, help="metrics.jsonl keys, e.g. acc test_acc")
            s.add_argument("--stage", help="only this stage's lines (e.g. rotnet, lsdc, train)")
        if name == "confusion":
            s.add_argument("--key", default="confusion", help="final.json matrix (e.g. test_confusion)")
        if name == "halting":
            s.add_argument("--key", default="probe_test_acc", help="final.json metric on the y axis")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    plt = pyplot()
    fig = args.draw(plt, args)
    fig.tight_layout()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        fig.savefig(args.out, dpi=args.dpi)
    except OSError as error:
        raise common.Abort(f"-o {args.out}: cannot write the figure there ({error.strerror}); choose "
                           "another path") from None
    finally:
        plt.close(fig)
    print(args.out)


if __name__ == "__main__":
    common.run_main(main)
