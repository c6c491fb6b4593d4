"""Tests of deepcluster.py's own pieces: k-means, PCA-whitening, sampler, Sobel, probe layers, its flags,
Initial Alignment and halting. What every script promises is in test_scripts.py."""
import os

import numpy as np
import pytest
import torch

import common
import deepcluster
from conftest import one_line_error, read_json, read_metrics, run_script


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


def float64_lloyd_with_margins(x, init, iters):
    """Textbook Lloyd in float64 numpy: the first and the last assignments, and the smallest gap, over
    every point and step, between the nearest and the second-nearest centroid's squared distance."""
    x, c = x.double().numpy(), init.double().numpy()
    all_labels, gap = [], np.inf
    for step in range(iters + 1):
        d = ((x[:, None] - c[None]) ** 2).sum(-1)
        all_labels.append(d.argmin(1))
        two = np.partition(d, 1, axis=1)[:, :2]
        gap = min(gap, (two[:, 1] - two[:, 0]).min())
        if step < iters:
            assert np.bincount(all_labels[-1], minlength=len(c)).min() > 0  # no empty cluster to re-seed
            c = np.stack([x[all_labels[-1] == j].mean(0) for j in range(len(c))])
    return all_labels[0], all_labels[-1], gap


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk_elements", [None, 30 * 7 + 3])
def test_kmeans_gives_the_float64_assignments_from_the_same_start(seed, chunk_elements):
    """Every assignment equal to float64 Lloyd's, on data whose nearest centroid is never a near-tie: the
    reference's smallest gap is checked to be far above the float32 rounding of squared distances
    (< 400 here: under 1e-3). 30 * 7 + 3 distances per block makes blocks of 7 rows with a partial
    last one (CPU path); the default makes one block."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, 16, generator=g) * 3
    x = centres[torch.randint(20, (1000,), generator=g)] + torch.randn(1000, 16, generator=g)
    init = x[torch.randperm(1000, generator=g)[:30]]
    labels, _, _ = deepcluster.kmeans(x, 30, iters=10, init=init, chunk_elements=chunk_elements)
    first, last, gap = float64_lloyd_with_margins(x, init, 10)
    assert gap > 1e-2 and (first != last).sum() > 50  # no near-tie, and many points move
    assert (labels.numpy() == last).all()


def test_assign_picks_the_first_of_tied_centroids():
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(1))
    a, b = x[:2]
    centroids = torch.stack([a + 10, a, b, a, b])  # 1 and 3, 2 and 4 are the same centroid
    for chunk_elements in (5 * 3, 2 ** 20):
        labels = deepcluster.assign(x, centroids, chunk_elements)
        d = ((x[:, None].double() - centroids[None].double()) ** 2).sum(-1)
        assert labels.tolist() == d.argmin(1).tolist() and set(labels.tolist()) <= {0, 1, 2}


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
    labels, centroids = deepcluster.split_empty_clusters(x, labels.clone(), centroids,
                                                         torch.Generator().manual_seed(0))
    assert torch.bincount(labels).tolist() == [5, 5, 1]
    assert (torch.allclose(centroids[1], x[labels == 1].mean(0))
            and torch.allclose(centroids[0], x[labels == 0].mean(0)))


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
    assert torch.allclose(torch.cov(y.T.double(), correction=0), torch.eye(10, dtype=torch.float64),
                          atol=1e-4)
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
    args = deepcluster.parse_args(["--dataset", "synthetic", "--balance", balance,
                                   "--reassign", str(reassign)])
    labels = torch.randint(0, 7, (1000,), generator=torch.Generator().manual_seed(0))
    order = deepcluster.cycle_order(labels, 7, args, cycle=3)
    assert (len(order) == int(reassign * 1000)
            and torch.equal(order, deepcluster.cycle_order(labels, 7, args, cycle=3)))
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
    partly_known = deepcluster.assignment_nmis(torch.tensor([0, 0, 1, 1, 1, 0]), None,
                                               torch.tensor([0, 0, 1, 1, -1, -1]))
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
    # eval_linear.py's RegLog sizes
    ("alexnet", 224, "relu1", True, 9600), ("alexnet", 224, "relu2", True, 9216),
    ("alexnet", 224, "relu3", True, 9600), ("alexnet", 224, "relu4", True, 9600),
    ("alexnet", 224, "relu5", True, 9216),
    ("lenet5", 28, "conv2", False, 1600),  # the Deep Dive author's Conv-2 probe size for Fashion-MNIST
    ("alexnet-small", 32, "relu5", False, 128 * 9 * 9), ("lenet5", 32, "output", False, 84),
    ("alexnet-deepdive", 224, "relu5", True, 9216),  # the author's features_size for relu_5 (Appendix A)
])
def test_probe_layer_sizes(backbone, size, layer, avgpool, dim):
    args = deepcluster.parse_args(["--dataset", "synthetic", "--backbone", backbone, "--probe-layer", layer])
    model = deepcluster.build_model(args, 3, size).eval()
    with torch.no_grad():
        assert deepcluster.probe_features(model, torch.randn(2, 3, size, size), layer,
                                          avgpool).shape == (2, dim)
        assert model.features(torch.randn(2, 3, size, size)).shape == (2, deepcluster.FEATURE_DIMS[backbone])
        assert model(torch.randn(2, 3, size, size)).shape == (2, args.num_clusters)


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
    assert (a.backbone, a.sobel, a.lr, a.weight_decay, a.momentum, a.batch_size, a.cycles, a.pca_dim,
            a.num_clusters, a.probe_layer, a.probe_epochs) == \
        ("lenet5", False, 0.1, 1e-3, 0.1, 128, 50, 0, 5, "conv2", 20)
    assert (a.random_resized_crop, a.flip) == (True, False)  # the author's Fashion-MNIST jobs, not the text
    a = deepcluster.parse_args(["--dataset", "svhn"])
    assert (a.backbone, a.sobel, a.momentum, a.batch_size, a.cycles, a.pca_dim, a.num_clusters,
            a.probe_layer) == ("alexnet-small", True, 0.5, 64, 100, 256, 200, "relu5")
    a = deepcluster.parse_args(["--dataset", "cifar10"])
    assert (a.momentum, a.batch_size, a.num_clusters, a.cycles) == (0.9, 64, 1000, 100)
    a = deepcluster.parse_args(["--dataset", "imagenet"])
    assert (a.backbone, a.sobel, a.lr, a.weight_decay, a.momentum, a.batch_size, a.num_clusters,
            a.pca_dim) == ("alexnet", True, 0.05, 1e-5, 0.9, 256, 10000, 256)
    assert (a.kmeans_iters, a.kmeans_init, a.balance, a.reassign,
            a.halt_clustering) == (20, "random", "sampler", 1.0, None)
    assert deepcluster.parse_args(["--dataset", "imagefolder", "--k", "300"]).num_clusters == 300
    a = deepcluster.parse_args(["--dataset", "cifar10-appendix-a"])  # Appendix A's text
    assert (a.lr, a.momentum, a.weight_decay, a.num_clusters, a.pca_dim, a.batch_size, a.sobel) == \
        (0.05, 0.9, 1e-5, 2000, 256, 256, True)
    assert (a.backbone, a.image_size, a.cycles, a.probe_layer, a.probe_avgpool, a.probe_epochs) == \
        ("alexnet-deepdive", 224, 100, "relu5", True, 30)  # the author's jobs/CIFAR10/cifar_pca/cifar.py


@pytest.mark.parametrize("flags,message", [
    (["--dataset", "cifar11"], "unknown dataset 'cifar11'"),
    (["--dataset", "fashion-mnist", "--pca-dim", "100"],
     "--pca-dim 100 is larger than the lenet5 features (84)"),
    (["--dataset", "cifar10", "--ia-seeds", "5", "--ia-pca", "64", "4096"], "--pca-dim 4096 is larger than"),
    (["--dataset", "fashion-mnist", "--probe-layer", "relu3"],
     "--probe-layer relu3 does not exist in lenet5"),
    (["--dataset", "cifar10", "--backbone", "resnet18", "--probe-layer", "relu5"],
     "does not exist in resnet18"),
    (["--dataset", "cifar10", "--probe-layer", "fc7"], "--probe-layer fc7 does not exist"),
    (["--dataset", "synthetic", "--halt-clustering", "0"],
     "argument --halt-clustering: '0' is not an integer >= 1"),
    (["--dataset", "synthetic", "--reassign", "0"], "argument --reassign: '0' is not a positive number"),
    (["--dataset", "synthetic", "--ia-seeds", "3", "--ia-k", "0"],
     "argument --ia-k: '0' is not an integer >= 1"),
    (["--dataset", "synthetic", "--pca-dim", "-1"], "argument --pca-dim: '-1' is not an integer >= 0"),
    (["--dataset", "synthetic", "--probe-layer", "output", "--probe-avgpool"], "has no spatial dimensions"),
    (["--dataset", "synthetic", "--balance", "equal"], "invalid choice"),
    (["--dataset", "imagenet", "--image-size", "128"], "--image-size is for datasets held in memory"),
])
def test_bad_flags_exit_2_with_a_message(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        deepcluster.parse_args(flags)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and one_line_error(err)


BASE = ["--dataset", "synthetic", "--device", "cpu", "--seed", "0"]


@pytest.mark.parametrize("flags,message", [
    ([*BASE, "--num-clusters", "2001"],
     "--num-clusters 2001 is larger than synthetic (2000 training images)"),
    ([*BASE, "--ia-seeds", "2", "--ia-k", "10", "3000"], "--num-clusters 3000 is larger than synthetic"),
    ([*BASE, "--batch-size", "5000"], "--batch-size 5000 is larger than the images of one cycle"),
    ([*BASE, "--reassign", "1e-9"],
     "--batch-size 64 is larger than the images of one cycle (--reassign 1e-09 x 2000) (0"),
    ([*BASE, "--probe-batch-size", "3000"], "--probe-batch-size 3000 is larger than synthetic's train split"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}/empty", "--device", "cpu"],
     "cifar10 (train split) not found"),
    (["--resume", "{tmp}/nothing"], "cannot read args.json"),
    ([*BASE, "--backbone", "alexnet-deepdive", "--image-size", "48"],
     "alexnet-deepdive needs images of at least 63 px, not 48"),
])
def test_runtime_user_errors_exit_2_and_create_no_run(flags, message, tmp_path, capsys):
    flags = [f.format(tmp=tmp_path) for f in flags]
    if "--resume" not in flags:
        flags += ["--out-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as info:
        common.run_main(lambda: deepcluster.main(flags))
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and one_line_error(err), err
    assert not os.path.exists(tmp_path / "run")


def test_missing_test_split_is_found_before_the_cycles(tmp_path, capsys):
    """The probe's test split is loaded with the training data: a missing one stops the run at once."""
    data = common.load_dataset("synthetic", "train")
    torch.save({"images": data.images, "labels": data.labels}, tmp_path / "cifar10-train.pt")
    flags = ["--dataset", "cifar10", "--data-dir", str(tmp_path), "--device", "cpu",
             "--out-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as info:
        common.run_main(lambda: deepcluster.main(flags))
    assert info.value.code == 2 and "cifar10 (test split) not found" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


def test_defaults_follow_the_papers_and_help_shows_the_row(capsys):
    with pytest.raises(SystemExit) as info:
        deepcluster.parse_args(["--dataset", "fashion-mnist", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "Table 1" in out and "--halt-clustering" in out
    assert "those of --dataset fashion-mnist" in out and "(default: lenet5)" in out
    assert "default: never halt" in out


# ------------------------------------------------------------------------------------------------
# Initial Alignment and halting, end to end on synthetic data
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def first_cycles(tmp_path_factory):
    """Two cycles of the synthetic row, the network DeepCluster starts from."""
    tmp = tmp_path_factory.mktemp("deepcluster")
    result = run_script("deepcluster.py", [*BASE, "--out-dir", tmp / "run", "--cycles", "2",
                                           "--probe-epochs", "0"], tmp)
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp


@pytest.mark.xdist_group("deepcluster-first-cycles")
def test_initial_alignment_is_the_first_clustering_of_each_seed(first_cycles):
    runs = first_cycles
    result = run_script("deepcluster.py", [*BASE, "--out-dir", runs / "ia", "--ia-seeds", "3",
                                           "--ia-k", "10", "50"], runs)
    assert result.returncode == 0, result.stderr[-2000:]
    final = read_json(runs / "ia" / "final.json")
    assert final["seeds"] == [0, 1, 2] and set(final["initial_alignment"]) == {"k10_pca32", "k50_pca32"}
    for summary in final["initial_alignment"].values():
        v = summary["values"]
        assert len(v) == 3 and len(set(v)) == 3 and all(0 < x < 1 for x in v)
        assert summary["min"] == min(v) <= summary["q1"] <= summary["median"] == sorted(v)[1] <= summary["q3"]
        assert summary["q3"] <= summary["max"] == max(v)
    # IA(seed 0, k = 50) is NMI(labels, first pseudo-labels) of the training run with seed 0
    assert final["initial_alignment"]["k50_pca32"]["values"][0] == read_metrics(runs / "run")[0]["nmi_gt"]
    assert "IA k=50 pca=32 over 3 seeds: median" in result.stdout


@pytest.mark.xdist_group("deepcluster-first-cycles")
def test_halting_keeps_the_last_pseudo_labels(first_cycles):
    runs, run_dir = first_cycles, first_cycles / "halt"
    result = run_script("deepcluster.py", [*BASE, "--out-dir", run_dir, "--cycles", "4",
                                           "--halt-clustering", "2", "--probe-epochs", "0"], runs)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics, full = read_metrics(run_dir), read_metrics(runs / "run")
    assert ["cluster_seconds" in m for m in metrics] == [True, True, False, False]
    assert all("loss" in m for m in metrics)
    timing = ("cluster_seconds", "images_per_s", "train_seconds")
    for before, same in zip(metrics[:2], full[:2]):  # halting changes nothing before it starts
        assert ({k: v for k, v in before.items() if k not in timing}
                == {k: v for k, v in same.items() if k not in timing})
    labels = torch.load(run_dir / "checkpoint.pt", weights_only=False)["objects"]["labels"]
    truth = common.load_dataset("synthetic", "train").labels
    assert common.nmi(labels, truth) == metrics[1]["nmi_gt"] == read_json(run_dir / "final.json")["nmi_gt"]


# ------------------------------------------------------------------------------------------------
# The Deep Dive's Appendix A recipe, end to end on synthetic images saved as CIFAR-10
# ------------------------------------------------------------------------------------------------
def test_appendix_a_recipe_runs_end_to_end(tmp_path):
    """--dataset cifar10-appendix-a as given, but 64 px instead of 224, 2 cycles halted after the first,
    k 10 and a 1-epoch probe, on 300 + 100 synthetic images (32 px, 10 classes) saved as CIFAR-10: the
    AlexNet, upscaling, halting, the pooled relu5 probe and the final k-means with K = 10 all run."""
    for split, n in (("train", 300), ("test", 100)):
        data = common.load_dataset("synthetic", split)
        torch.save({"images": data.images[:n], "labels": data.labels[:n]}, tmp_path / f"cifar10-{split}.pt")
    flags = ["--dataset", "cifar10-appendix-a", "--data-dir", tmp_path, "--device", "cpu", "--out-dir",
             tmp_path / "run", "--image-size", "64", "--cycles", "2", "--halt-clustering", "1",
             "--num-clusters", "10", "--probe-epochs", "1"]
    result = run_script("deepcluster.py", flags, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    args, final = read_json(tmp_path / "run" / "args.json"), read_json(tmp_path / "run" / "final.json")
    recipe = ("backbone", "lr", "batch_size", "pca_dim", "random_resized_crop")
    assert [args[k] for k in recipe] == ["alexnet-deepdive", 0.05, 256, 256, True]
    assert ["cluster_seconds" in m for m in read_metrics(tmp_path / "run")] == [True, False]
    assert 0 < final["probe_test_acc"] <= 1 and 0 <= final["nmi"] <= 1 and -1 <= final["ari"] <= 1
    assert final["acc"] >= 0.1  # the best matching of 10 clusters to 10 classes beats their average, N / 10
