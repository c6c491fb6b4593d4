"""Tests of deepcluster.py: k-means, PCA-whitening, sampler, Sobel, probe layers, flags, and end-to-end
runs on synthetic data on the CPU (learning, Initial Alignment, halting, resume)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import deepcluster
import scripts

SCRIPT = os.path.join(scripts.ROOT, "deepcluster.py")


# ------------------------------------------------------------------------------------------------
# k-means
# ------------------------------------------------------------------------------------------------
def blobs(n_per=80, k=6, d=8, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 3
    labels = torch.arange(k).repeat_interleave(n_per)
    return centres[labels] + spread * torch.randn(k * n_per, d, generator=g), labels


def reference_lloyd(x, init, iters):
    """Textbook Lloyd in float64 numpy, for comparison."""
    x, c = x.double().numpy(), init.double().numpy()
    for _ in range(iters):
        labels = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([x[labels == j].mean(0) for j in range(len(c))])
    labels = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    return labels, ((x - c[labels]) ** 2).sum()


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_plus_plus_recovers_separated_blobs_at_the_optimal_inertia(seed):
    x, truth = blobs(seed=seed)
    labels, centroids, inertia = deepcluster.kmeans(x, 6, iters=20, init="kmeans++", seed=seed)
    assert common.ari(labels, truth) == 1.0
    optimum = sum(((x[truth == j] - x[truth == j].mean(0)) ** 2).sum().item() for j in range(6))
    assert inertia == pytest.approx(optimum, rel=1e-4)
    assert torch.allclose(centroids[labels], torch.stack([x[truth == t].mean(0) for t in truth]), atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_kmeans_matches_a_reference_lloyd_from_the_same_start(seed):
    """Overlapping blobs, k = 9 from random data points: many points move between iterations, and the
    assignments and inertia must equal a float64 textbook implementation's."""
    x, _ = blobs(n_per=60, k=5, spread=1.5, seed=seed)
    init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:9]]
    labels, _, inertia = deepcluster.kmeans(x, 9, iters=10, init=init)
    ref_labels, ref_inertia = reference_lloyd(x, init, 10)
    assert (labels.numpy() == ref_labels).mean() > 0.995  # fp32 vs fp64 may flip a near-tie
    assert inertia == pytest.approx(ref_inertia, rel=1e-4)


def test_kmeans_never_returns_an_empty_cluster_even_from_a_bad_start():
    x, _ = blobs(n_per=50, k=4)
    far = torch.full((20, x.shape[1]), 100.0)  # every centroid at the same far point: all but one empty
    labels, _, _ = deepcluster.kmeans(x, 20, iters=5, init=far)
    assert torch.bincount(labels, minlength=20).min() >= 1
    # tied points: 150 copies of one point and 30 others (integers: distances to chosen points are exactly
    # 0), 60 clusters, more than the distinct points
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.zeros(150, 4), torch.randint(-9, 10, (30, 4), generator=g).float()])
    for init in ("random", "kmeans++"):
        labels, _, _ = deepcluster.kmeans(x, 60, iters=5, init=init, seed=1)
        assert torch.bincount(labels, minlength=60).min() >= 1 and labels.max() < 60


def test_split_empty_clusters_halves_a_splittable_cluster():
    x = torch.randn(11, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0] * 10 + [2])  # cluster 1 empty; cluster 2 is a singleton and cannot be split
    centroids = torch.zeros(3, 3)
    labels, centroids = deepcluster.split_empty_clusters(x, labels.clone(), centroids, torch.Generator().manual_seed(0))
    assert torch.bincount(labels).tolist() == [5, 5, 1]
    assert torch.allclose(centroids[1], x[labels == 1].mean(0)) and torch.allclose(centroids[0], x[labels == 0].mean(0))


def test_kmeans_is_reproducible_for_a_seed():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(3))
    a, b, c = (deepcluster.kmeans(x, 12, iters=8, seed=s) for s in (7, 7, 8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[1], c[1])


# ------------------------------------------------------------------------------------------------
# PCA-whitening, sampler, NMI bookkeeping
# ------------------------------------------------------------------------------------------------
def test_pca_whitening_gives_identity_covariance_on_the_leading_components():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 32, generator=g) @ torch.randn(32, 32, generator=g) + 5
    y = deepcluster.pca_whiten(x, 10)
    assert y.shape == (4000, 10)
    assert torch.allclose(y.mean(0), torch.zeros(10), atol=1e-4)
    assert torch.allclose(torch.cov(y.T.double(), correction=0), torch.eye(10, dtype=torch.float64), atol=1e-4)
    xd = x.double().numpy()
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(xd.T, bias=True))
    reference = (xd - xd.mean(0)) @ eigenvectors[:, ::-1][:, :10] / np.sqrt(eigenvalues[::-1][:10])
    signs = np.sign((reference * y.double().numpy()).sum(0))
    assert np.allclose(y.double().numpy() * signs, reference, atol=1e-3)


def low_rank_features(n=3000, signal=10, dim=84, seed=0):
    """`dim`-d features spanned by a `signal`-d space holding 10 separated classes (rank deficient)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    z = torch.randn(10, signal, generator=g)[labels] * 3 + torch.randn(n, signal, generator=g)
    return z @ torch.randn(signal, dim, generator=g), labels


def agree_up_to_sign(a, b):
    """Component-wise sign alignment of b to a (an eigenvector's sign is arbitrary)."""
    return b * torch.sign((a * b).sum(0))


def test_pca_whitening_does_not_depend_on_the_scale_of_the_features():
    x, labels = low_rank_features()
    y1, y1000 = deepcluster.pca_whiten(x, 20), deepcluster.pca_whiten(1000 * x, 20)
    # the 10 signal components are the same; the 10 beyond the rank hold only rounding noise
    assert torch.allclose(y1[:, :10], agree_up_to_sign(y1[:, :10], y1000[:, :10]), atol=1e-4)
    assert y1[:, 10:].abs().max() < 0.01 and y1000[:, 10:].abs().max() < 0.01
    nmis = [common.nmi(deepcluster.kmeans(deepcluster.preprocess(s * x, 20), 10, seed=0)[0], labels)
            for s in (1, 1000)]
    assert nmis[0] > 0.9 and nmis[1] == pytest.approx(nmis[0])
    # constant features (an all-zero spectrum) whiten to zeros, not NaN
    assert torch.equal(deepcluster.pca_whiten(torch.full((6, 4), 3.0), 2), torch.zeros(6, 2))


def test_pca_whitening_is_exact_with_a_large_mean():
    x, _ = low_rank_features(signal=32, dim=32)
    x = (x * 64).round() / 64  # multiples of 1/64 below 2^14: x + 1e4 is exact in float32
    shifted = x + 1e4
    assert torch.equal(shifted - 1e4, x)
    y, y_shifted = deepcluster.pca_whiten(x, 10), deepcluster.pca_whiten(shifted, 10, chunk_elements=32 * 7)
    assert torch.allclose(y, agree_up_to_sign(y, y_shifted), atol=1e-5)


def test_uniform_sampler_draws_n_over_k_per_non_empty_cluster():
    sizes = [1000, 10, 0, 300, 1]
    labels = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])[torch.randperm(1311)]
    picks = deepcluster.uniform_cluster_sample(labels, 5, 1311, torch.Generator().manual_seed(0))
    assert len(picks) == 1311
    per_cluster = torch.bincount(labels[picks], minlength=5)
    m = 1311 // 4 + 1  # util.py's UnifLabelSampler: N // (non-empty clusters) + 1, then cut to N
    assert per_cluster[2] == 0 and all(m - 1 <= per_cluster[c] <= m for c in (0, 1, 3, 4))
    large = picks[labels[picks] == 0]
    assert len(large.unique()) == len(large)  # more members than m: without replacement
    assert len(picks[labels[picks] == 3].unique()) < 300  # fewer than m: with replacement
    assert len(picks[labels[picks] == 4].unique()) == 1


@pytest.mark.parametrize("balance,reassign", [("sampler", 0.5), ("none", 1.5), ("weight", 1.0)])
def test_cycle_order_length_and_content(balance, reassign):
    """--reassign R: int(R * N) training images per cycle; without the sampler, whole shuffled passes."""
    args = deepcluster.parse_args(["--dataset", "synthetic", "--balance", balance, "--reassign", str(reassign)])
    labels = torch.randint(0, 7, (1000,), generator=torch.Generator().manual_seed(0))
    order = deepcluster.cycle_order(labels, 7, args, cycle=3)
    assert len(order) == int(reassign * 1000) and torch.equal(order, deepcluster.cycle_order(labels, 7, args, cycle=3))
    assert not torch.equal(order, deepcluster.cycle_order(labels, 7, args, cycle=4))
    if balance != "sampler":  # every image once per pass, then part of a second pass
        counts = torch.bincount(order, minlength=1000)
        assert counts.min() == 1 and counts.max() == (2 if reassign > 1 else 1)


def test_nmi_bookkeeping():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    first = deepcluster.assignment_nmis(torch.tensor([1, 1, 0, 0, 2, 2]), None, y)
    assert set(first) == {"nmi_gt"} and first["nmi_gt"] == pytest.approx(1.0)
    later = deepcluster.assignment_nmis(torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor([5, 5, 3, 3, 4, 4]), y)
    assert later["nmi_prev"] == pytest.approx(common.nmi([0, 1, 0, 1, 0, 1], y)) and later["nmi_gt"] < 0.01
    partly_known = deepcluster.assignment_nmis(torch.tensor([0, 0, 1, 1, 1, 0]), None, torch.tensor([0, 0, 1, 1, -1, -1]))
    assert partly_known["nmi_gt"] == pytest.approx(1.0)
    assert deepcluster.assignment_nmis(torch.tensor([0, 1]), None, torch.tensor([-1, -1])) == {}


# ------------------------------------------------------------------------------------------------
# Network pieces
# ------------------------------------------------------------------------------------------------
def test_sobel_equals_the_official_grayscale_then_sobel_convolutions():
    grayscale = torch.nn.Conv2d(3, 1, 1)
    grayscale.weight.data.fill_(1 / 3)
    grayscale.bias.data.zero_()
    sobel = torch.nn.Conv2d(1, 2, 3, padding=1)
    sobel.weight.data[0, 0] = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
    sobel.weight.data[1, 0] = torch.tensor([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])
    sobel.bias.data.zero_()
    x = torch.randn(4, 3, 16, 16)
    module = deepcluster.Sobel(3)
    assert torch.allclose(module(x), sobel(grayscale(x)), atol=1e-5)
    assert list(module.parameters()) == []  # fixed: nothing for the optimizer


@pytest.mark.parametrize("backbone,size,layer,avgpool,dim", [
    ("alexnet", 224, "relu1", True, 9600), ("alexnet", 224, "relu2", True, 9216), ("alexnet", 224, "relu3", True, 9600),
    ("alexnet", 224, "relu4", True, 9600), ("alexnet", 224, "relu5", True, 9216),  # eval_linear.py's RegLog sizes
    ("lenet5", 28, "conv2", False, 1600),  # the Deep Dive author's Conv-2 probe size for Fashion-MNIST
    ("alexnet-small", 32, "relu5", False, 128 * 9 * 9), ("lenet5", 32, "output", False, 84),
])
def test_probe_layer_sizes(backbone, size, layer, avgpool, dim):
    args = deepcluster.parse_args(["--dataset", "synthetic", "--backbone", backbone, "--probe-layer", layer])
    model = deepcluster.build_model(args, 3, size).eval()
    with torch.no_grad():
        assert deepcluster.probe_features(model, torch.randn(2, 3, size, size), layer, avgpool).shape == (2, dim)
        assert model(torch.randn(2, 3, size, size)).shape == (2, deepcluster.FEATURE_DIMS[backbone])


def test_backbone_tables_match_common():
    for name, dim in deepcluster.FEATURE_DIMS.items():
        backbone = common.build_backbone(name, 2, width=16)
        assert backbone.feature_dim == (dim or 8 * 16)
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in getattr(backbone, "features", []))
        assert convs == deepcluster.CONV_LAYERS[name]


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def test_defaults_follow_the_papers():
    a = deepcluster.parse_args(["--dataset", "fashion-mnist"])
    assert (a.backbone, a.sobel, a.lr, a.weight_decay, a.momentum, a.batch_size, a.cycles, a.pca_dim, a.num_clusters,
            a.probe_layer, a.probe_epochs) == ("lenet5", False, 0.1, 1e-3, 0.1, 128, 50, 0, 5, "conv2", 20)
    a = deepcluster.parse_args(["--dataset", "svhn"])
    assert (a.backbone, a.sobel, a.momentum, a.batch_size, a.cycles, a.pca_dim, a.num_clusters, a.probe_layer) == \
        ("alexnet-small", True, 0.5, 64, 100, 256, 200, "relu5")
    a = deepcluster.parse_args(["--dataset", "cifar10"])
    assert (a.momentum, a.batch_size, a.num_clusters, a.cycles) == (0.9, 64, 1000, 100)
    a = deepcluster.parse_args(["--dataset", "imagenet"])
    assert (a.backbone, a.sobel, a.lr, a.weight_decay, a.momentum, a.batch_size, a.num_clusters, a.pca_dim) == \
        ("alexnet", True, 0.05, 1e-5, 0.9, 256, 10000, 256)
    assert (a.kmeans_iters, a.kmeans_init, a.balance, a.reassign, a.halt_clustering) == (20, "random", "sampler", 1.0, None)
    assert deepcluster.parse_args(["--dataset", "imagefolder", "--k", "300"]).num_clusters == 300


@pytest.mark.parametrize("flags,message", [
    (["--dataset", "cifar11"], "unknown dataset 'cifar11'"),
    (["--dataset", "fashion-mnist", "--pca-dim", "100"], "--pca-dim 100 is larger than the lenet5 features (84)"),
    (["--dataset", "cifar10", "--ia-seeds", "5", "--ia-pca", "64", "4096"], "--pca-dim 4096 is larger than"),
    (["--dataset", "fashion-mnist", "--probe-layer", "relu3"], "--probe-layer relu3 does not exist in lenet5"),
    (["--dataset", "cifar10", "--backbone", "resnet18", "--probe-layer", "relu5"], "does not exist in resnet18"),
    (["--dataset", "cifar10", "--probe-layer", "fc7"], "--probe-layer fc7 does not exist"),
    (["--dataset", "synthetic", "--halt-clustering", "0"], "--halt-clustering must be at least 1"),
    (["--dataset", "synthetic", "--reassign", "0"], "--reassign must be positive"),
    (["--dataset", "synthetic", "--ia-seeds", "3", "--ia-k", "0"], "--ia-k values must be at least 1"),
    (["--dataset", "synthetic", "--pca-dim", "-1"], "--pca-dim must not be negative"),
    (["--dataset", "synthetic", "--probe-layer", "output", "--probe-avgpool"], "has no spatial dimensions"),
    (["--dataset", "synthetic", "--balance", "equal"], "invalid choice"),
])
def test_bad_flags_exit_2_with_a_message(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        deepcluster.parse_args(flags)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--dataset", "synthetic", "--num-clusters", "2001"], "--num-clusters 2001 is larger than synthetic (2000 training images)"),
    (["--dataset", "synthetic", "--ia-seeds", "2", "--ia-k", "10", "3000"], "--num-clusters 3000 is larger than synthetic"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}/empty"], "cifar10 (train split) not found"),
    (["--resume", "{tmp}/nothing"], "cannot read args.json"),
])
def test_runtime_user_errors_exit_2_and_create_nothing(flags, message, tmp_path, capsys):
    flags = [f.format(tmp=tmp_path) for f in flags]
    if "--resume" not in flags:
        flags += ["--device", "cpu", "--out-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as info:
        common.run_main(lambda: deepcluster.main(flags))
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


def run_script(args, cwd, timeout=300):
    return scripts.run_script("deepcluster.py", args, cwd, timeout)


def test_help_shows_the_dataset_row(capsys):
    with pytest.raises(SystemExit) as info:
        deepcluster.parse_args(["--dataset", "fashion-mnist", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "Table 1" in out and "--halt-clustering" in out
    assert "those of --dataset fashion-mnist" in out and "(default: lenet5)" in out


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    result = run_script(["--dataset", "synthetic", "--k", "0"], tmp_path)
    assert result.returncode == 2 and "--num-clusters must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "runs")


# ------------------------------------------------------------------------------------------------
# End to end on synthetic data, on the CPU
# ------------------------------------------------------------------------------------------------
BASE = ["--dataset", "synthetic", "--device", "cpu", "--seed", "0"]
TIMING = ("cluster_seconds", "images_per_s")


read_json, read_metrics = scripts.read_json, scripts.read_metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The synthetic row as `python deepcluster.py --dataset synthetic --device cpu` runs it, and the
    same network untrained (--cycles 0: the linear probe of the random network)."""
    tmp = tmp_path_factory.mktemp("deepcluster")
    for name, extra in (("run", []), ("random", ["--cycles", "0"])):
        result = run_script([*BASE, "--out-dir", str(tmp / name), *extra], tmp)
        assert result.returncode == 0, result.stderr[-2000:]
    return tmp


def test_end_to_end_learns(runs):
    metrics, final = read_metrics(runs / "run"), read_json(runs / "run" / "final.json")
    random_net = read_json(runs / "random" / "final.json")
    assert [m["epoch"] for m in metrics] == list(range(deepcluster.PAPER_DEFAULTS["synthetic"]["cycles"]))
    assert "nmi_prev" not in metrics[0] and all("nmi_prev" in m and "nmi_gt" in m for m in metrics[1:])
    assert final["probe_test_acc"] > random_net["probe_test_acc"] + 0.1  # about 0.6 against 0.38
    nmis = [m["nmi_gt"] for m in metrics]  # pseudo-labels closer to the classes: ~0.2 against ~0.13
    assert max(nmis) > nmis[0] + 0.04 and nmis[-1] > nmis[0]
    assert final["nmi_gt"] == metrics[-1]["nmi_gt"] and "nmi_gt" not in random_net
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.3


def test_initial_alignment_is_the_first_clustering_of_each_seed(runs):
    result = run_script([*BASE, "--out-dir", str(runs / "ia"), "--ia-seeds", "3", "--ia-k", "10", "50"], runs)
    assert result.returncode == 0, result.stderr[-2000:]
    final = read_json(runs / "ia" / "final.json")
    assert final["seeds"] == [0, 1, 2] and set(final["initial_alignment"]) == {"k10_pca32", "k50_pca32"}
    for summary in final["initial_alignment"].values():
        v = summary["values"]
        assert len(v) == 3 and len(set(v)) == 3 and all(0 < x < 1 for x in v)
        assert summary["min"] == min(v) <= summary["q1"] <= summary["median"] == sorted(v)[1] <= summary["q3"] <= summary["max"] == max(v)
    # IA(seed 0, k = 50) is NMI(labels, first pseudo-labels) of the training run with seed 0
    assert final["initial_alignment"]["k50_pca32"]["values"][0] == read_metrics(runs / "run")[0]["nmi_gt"]
    assert "IA k=50 pca=32 over 3 seeds: median" in result.stdout


def test_halting_keeps_the_last_pseudo_labels(runs):
    run_dir = runs / "halt"
    result = run_script([*BASE, "--out-dir", str(run_dir), "--cycles", "4", "--halt-clustering", "2",
                         "--probe-epochs", "0"], runs)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics, full = read_metrics(run_dir), read_metrics(runs / "run")
    assert ["cluster_seconds" in m for m in metrics] == [True, True, False, False]
    assert all("loss" in m for m in metrics)
    for before, same in zip(metrics[:2], full[:2]):  # halting changes nothing before it starts
        assert {k: v for k, v in before.items() if k not in TIMING} == {k: v for k, v in same.items() if k not in TIMING}
    labels = torch.load(run_dir / "checkpoint.pt", weights_only=False)["labels"]
    truth = common.load_dataset("synthetic", "train").labels
    assert common.nmi(labels, truth) == metrics[1]["nmi_gt"] == read_json(run_dir / "final.json")["nmi_gt"]


def test_resume_after_a_kill_equals_the_uninterrupted_run(runs):
    run_dir = str(runs / "killed")
    scripts.run_until("deepcluster.py", [*BASE, "--out-dir", run_dir], runs, run_dir, "train", 2)
    assert not os.path.exists(os.path.join(run_dir, "final.json"))
    result = run_script(["--resume", run_dir], runs)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed, uninterrupted = read_json(os.path.join(run_dir, "final.json")), read_json(runs / "run" / "final.json")
    for key in ("nmi_gt", "probe_test_acc", "probe_train_acc", "probe_loss"):
        assert resumed[key] == uninterrupted[key], key
    strip = lambda m: {k: v for k, v in m.items() if k not in TIMING}  # noqa: E731
    assert [strip(m) for m in read_metrics(run_dir)] == [strip(m) for m in read_metrics(runs / "run")]


def test_two_processes_cluster_the_same_network_as_one(runs):
    """torchrun with two CPU processes (gloo): each computes half of the features, all are gathered, and
    the first clustering is the one of the single-process run (same initial network on both ranks)."""
    run_dir = runs / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             SCRIPT, *BASE, "--out-dir", str(run_dir), "--cycles", "2", "--probe-epochs", "1"],
                            cwd=runs, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics, single = read_metrics(run_dir), read_metrics(runs / "run")
    assert [m["epoch"] for m in metrics] == [0, 1] and "device cpu x 2" in result.stdout
    assert metrics[0]["nmi_gt"] == pytest.approx(single[0]["nmi_gt"], abs=0.01)
    assert 0 < read_json(run_dir / "final.json")["probe_test_acc"] <= 1
