"""Unit tests of common.py: metrics, kNN / linear probe, augmentations, backbones, data, plumbing."""
import argparse
import gzip
import hashlib
import itertools
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import common
from conftest import spawn_gloo


# ------------------------------------------------------------------------------------------------
# Clustering metrics
# ------------------------------------------------------------------------------------------------
def brute_force_accuracy(pred, labels, k):
    """Best accuracy over every one-to-one relabelling of the k clusters."""
    best = 0
    for perm in itertools.permutations(range(k)):
        best = max(best, np.mean(np.array(perm)[pred] == labels))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_hungarian_accuracy_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    k = 5
    labels = rng.integers(0, k, 200)
    pred = np.where(rng.random(200) < 0.5, (labels + rng.integers(0, k)) % k, rng.integers(0, k, 200))
    acc = common.clustering_metrics(pred, labels)["acc"]
    assert acc == pytest.approx(brute_force_accuracy(pred, labels, k))


def test_hungarian_accuracy_is_one_for_a_relabelling():
    labels = np.repeat(np.arange(4), 10)
    pred = np.array([2, 0, 3, 1])[labels]
    m = common.clustering_metrics(pred, labels)
    assert m["acc"] == 1.0 and m["nmi"] == pytest.approx(1.0) and m["ari"] == pytest.approx(1.0)


def test_majority_mapping_with_more_clusters_than_classes():
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    pred = np.array([0, 0, 1, 2, 2, 3, 3, 3])  # cluster 3 holds 0, 1, 1 -> class 1
    # clusters 0 and 1 -> class 0 (3 correct), 2 -> class 1 (2), 3 -> class 1 (2): 7 of 8
    assert common.clustering_metrics(pred, labels)["acc"] == pytest.approx(7 / 8)
    assert list(common.cluster_to_class(common.confusion_matrix(pred, labels))) == [0, 0, 1, 1]


def test_confusion_matrix_counts():
    counts = common.confusion_matrix(np.array([0, 1, 1, 2]), np.array([1, 1, 0, 0]), 3, 2)
    assert counts.tolist() == [[0, 1], [1, 1], [1, 0]]


def test_nmi_and_ari_hand_computed():
    # a = [0,0,1,1], b = [0,0,0,1]. MI = 1/2 log 4/3 + 1/4 log 2/3 + 1/4 log 2 (natural log)
    a, b = [0, 0, 1, 1], [0, 0, 0, 1]
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    h_a, h_b = math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert common.nmi(a, b) == pytest.approx(mi / ((h_a + h_b) / 2))
    # pairs: index = C(2,2) = 1; a-pairs = 2; b-pairs = C(3,2) = 3; total = 6
    expected, maximum = 2 * 3 / 6, (2 + 3) / 2
    assert common.ari(a, b) == pytest.approx((1 - expected) / (maximum - expected))


def test_nmi_ari_invariances():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 500), rng.integers(0, 7, 500)
    relabel = np.array([4, 2, 0, 1, 3])
    assert common.nmi(relabel[a], b) == pytest.approx(common.nmi(a, b))
    assert common.ari(relabel[a], b) == pytest.approx(common.ari(a, b))
    assert common.nmi(a, b) == pytest.approx(common.nmi(b, a))
    # independent labelings of a large sample: both near 0
    x, y = rng.integers(0, 10, 20000), rng.integers(0, 10, 20000)
    assert common.nmi(x, y) < 0.01 and abs(common.ari(x, y)) < 0.01
    # a single cluster against itself: perfect by convention (as scikit-learn)
    assert common.nmi([1, 1, 1], [0, 0, 0]) == 1.0 and common.ari([1, 1, 1], [0, 0, 0]) == 1.0


def test_metrics_ignore_unknown_labels():
    m = common.clustering_metrics(np.array([0, 0, 1, 1, 1]), np.array([0, 0, 1, 1, -1]))
    assert m["acc"] == 1.0 and m["confusion"].sum() == 4


def test_confident_accuracy():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.1, 0.9], [0.02, 0.98]])
    # mapping from all samples is identity; confident: samples 0 and 3 (> 0.9), both right
    assert common.confident_accuracy(probs, labels, 0.9) == (1.0, 0.5)
    probs_wrong = probs[:, ::-1].copy()  # every prediction swapped: mapping swaps too
    assert common.confident_accuracy(probs_wrong, labels, 0.9) == (1.0, 0.5)


def brute_force_mapping_accuracy(pred, labels):
    """Best accuracy over every one-to-one map from the cluster ids present to the class ids present
    (clusters left over count as wrong), straight from the definition."""
    clusters, classes = sorted(set(pred)), sorted(set(labels))
    best = 0
    for image in itertools.permutations(classes, min(len(clusters), len(classes))):
        for chosen in itertools.combinations(clusters, len(image)):
            mapping = dict(zip(chosen, image))
            best = max(best, np.mean([mapping.get(p, -1) == y for p, y in zip(pred, labels)]))
    return best


def test_mapping_depends_on_the_ids_present_not_on_the_largest_id():
    # the same partition with cluster ids 1/2 and 0/1: two clusters, two classes -> one-to-one
    # cluster 1 = {0, 0, 1}, cluster 2 = {0, 0, 1}: best one-to-one is 2 + 1 = 3 of 6
    assert common.clustering_metrics([1, 1, 1, 2, 2, 2], [0, 0, 1, 0, 0, 1])["acc"] == pytest.approx(0.5)
    assert common.clustering_metrics([0, 0, 0, 1, 1, 1], [0, 0, 1, 0, 0, 1])["acc"] == pytest.approx(0.5)
    # the confusion stays indexed by the original ids
    m = common.clustering_metrics([1, 1, 1, 2, 2, 2], [0, 0, 1, 0, 0, 1], 3, 2)
    assert m["confusion"].tolist() == [[0, 0], [2, 1], [2, 1]] and m["scored"] == 6
    # a scored subset without the top class: 2 clusters present, 2 classes present (0 and 2)
    pred, labels = [0, 0, 0, 1, 1, 1, 1], [0, 0, 2, 0, 0, 2, -1]
    assert common.clustering_metrics(pred, labels, 2, 3)["acc"] == pytest.approx(0.5)
    # the caller may ask for a mapping: majority vote maps both clusters to class 0 (4 of 6)
    majority = common.clustering_metrics([1, 1, 1, 2, 2, 2], [0, 0, 1, 0, 0, 1], mapping="majority")
    assert majority["acc"] == pytest.approx(4 / 6)


@pytest.mark.parametrize("seed", range(8))
def test_hungarian_on_present_ids_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    clusters = rng.choice(9, rng.integers(2, 5), replace=False)  # sparse ids, 2-4 of them
    classes = rng.choice(7, rng.integers(len(clusters), 6), replace=False)
    labels = rng.choice(classes, 60)
    pred = rng.choice(clusters, 60)
    pred[:len(clusters)], labels[:len(classes)] = clusters, classes  # every id is present
    expected = brute_force_mapping_accuracy(pred.tolist(), labels.tolist())
    assert common.clustering_metrics(pred, labels, 9, 7)["acc"] == pytest.approx(expected)
    assert common.clustering_metrics(pred, labels)["acc"] == pytest.approx(expected)


def test_metrics_with_no_labelled_sample_say_so():
    m = common.clustering_metrics([0, 1], [-1, -1], 2)
    assert (m["acc"], m["nmi"], m["ari"], m["scored"]) == (None, None, None, 0)
    assert m["confusion"].sum() == 0
    assert common.confident_accuracy(np.array([[0.95, 0.05], [0.2, 0.8]]), np.array([-1, -1])) == (None, None)
    # one labelled sample among unknowns is scored alone
    m = common.clustering_metrics([0, 1, 1], [-1, 1, -1], 2, 2)
    assert (m["acc"], m["scored"], m["confusion"].tolist()) == (1.0, 1, [[0, 0], [0, 1]])
    assert m["ari"] == 1.0  # one sample: no pair to disagree on (scikit-learn's convention)


# ------------------------------------------------------------------------------------------------
# kNN and linear probe
# ------------------------------------------------------------------------------------------------
def blobs(n, dim, classes, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    labels = torch.arange(n) % classes
    return centres[labels] + spread * torch.randn(n, dim, generator=g), labels


def test_knn_on_separable_data():
    train_x, train_y = blobs(600, 16, 5, 0.5, 0)
    test_x, test_y = blobs(200, 16, 5, 0.5, 0)
    pred = common.knn_predict(train_x, train_y, test_x + 0.1, 5, k=20, temperature=0.1,
                              chunk_elements=600 * 7)
    assert (pred == test_y).float().mean() > 0.98
    # with labels shuffled the classifier is at chance: it does use the labels
    shuffled = train_y[torch.randperm(600)]
    assert (common.knn_predict(train_x, shuffled, test_x, 5, k=20) == test_y).float().mean() < 0.4


def test_knn_and_linear_probe_leave_out_unknown_labels():
    train_x, train_y = blobs(600, 16, 5, 0.5, 0)
    test_x, test_y = blobs(200, 16, 5, 0.5, 0)
    unlabeled = torch.randn(300, 16, generator=torch.Generator().manual_seed(3)) * 3
    with_unknown = torch.cat([train_x, unlabeled]), torch.cat([train_y, torch.full((300,), -1)])
    expected = common.knn_predict(train_x, train_y, test_x, 5, k=20)
    assert torch.equal(common.knn_predict(*with_unknown, test_x, 5, k=20), expected)
    with pytest.raises(common.Abort, match="every label is unknown"):
        common.knn_predict(unlabeled, torch.full((300,), -1), test_x, 5)
    test_with_unknown = torch.cat([test_x, unlabeled]), torch.cat([test_y, torch.full((300,), -1)])
    torch.manual_seed(0)
    assert common.linear_probe(*with_unknown, *test_with_unknown, 5, epochs=10) > 0.97
    assert common.linear_probe(train_x, train_y, unlabeled, torch.full((300,), -1), 5, epochs=1) is None


def test_knn_weighting_prefers_closer_neighbours():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    # two votes for class 1 but class 0 is much closer: exp weighting at T = 0.01 picks class 0
    assert common.knn_predict(bank, labels, query, 2, k=3, temperature=0.01).item() == 0
    assert common.knn_predict(bank, labels, query, 2, k=3, temperature=100.0).item() == 1


def test_linear_probe_on_separable_data():
    train_x, train_y = blobs(1000, 32, 4, 1.0, 1)
    test_x, test_y = blobs(400, 32, 4, 1.0, 1)
    torch.manual_seed(0)  # the head's initialisation and batch order
    assert common.linear_probe(train_x, train_y, test_x, test_y, 4, epochs=20) > 0.97
    # labels unrelated to the features: chance level
    shuffled = train_y[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    assert common.linear_probe(train_x, shuffled, test_x, test_y, 4, epochs=20) < 0.5


def test_linear_probe_ignores_a_feature_constant_in_training():
    train_x, train_y = blobs(1000, 32, 4, 1.0, 1)
    test_x, test_y = blobs(400, 32, 4, 1.0, 1)
    # an extra feature, 0.5 on every training sample, 0.6 on every test sample
    train_x = torch.cat([train_x, torch.full((1000, 1), 0.5)], 1)
    test_x = torch.cat([test_x, torch.full((400, 1), 0.6)], 1)
    torch.manual_seed(0)
    assert common.linear_probe(train_x, train_y, test_x, test_y, 4, epochs=20) > 0.97


def test_extract_features_order_and_mode():
    data = common.load_dataset("synthetic", "test")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4), torch.nn.BatchNorm1d(4))
    model.train()
    feats, labels = common.extract_features(model, data, common.to_float, batch_size=64)
    assert feats.shape == (len(data), 4) and torch.equal(labels, data.labels)
    model.eval()
    assert torch.allclose(feats, model(common.to_float(data.images)), atol=1e-5)
    model.train()
    common.extract_features(model, data, common.to_float, batch_size=64)
    assert model.training  # mode restored


# ------------------------------------------------------------------------------------------------
# Augmentations
# ------------------------------------------------------------------------------------------------
def batch(n=64, size=32, seed=0):
    torch.manual_seed(seed)
    return torch.rand(n, 3, size, size)


AUGMENTATIONS = {
    "random_crop": lambda x: common.random_crop(x, 32, 4),
    "random_resized_crop": lambda x: common.random_resized_crop(x, 32),
    "horizontal_flip": lambda x: common.horizontal_flip(x),
    "color_jitter": lambda x: common.color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=0.8),
    "random_grayscale": lambda x: common.random_grayscale(x, 0.5),
    "gaussian_blur": lambda x: common.gaussian_blur(x, 0.5),
    "solarize": lambda x: common.solarize(x, 0.5),
}


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_augmentation_shape_range_determinism_and_independence(name):
    fn = AUGMENTATIONS[name]
    x = batch()
    torch.manual_seed(1)
    y = fn(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1
    torch.manual_seed(1)
    assert torch.equal(fn(x), y)  # same seed, same output
    torch.manual_seed(2)
    assert not torch.equal(fn(x), y)
    # per-sample randomness: 64 copies of one image do not all get the same treatment
    same = x[:1].expand(64, -1, -1, -1).contiguous()
    out = fn(same)
    assert (out - out[:1]).abs().flatten(1).amax(1).gt(1e-6).any()


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    out = common.random_crop(x, 6, padding=2)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, top:top + 6, left:left + 6] for top in range(5) for left in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert common.random_crop(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), 8, 2).dtype == torch.uint8


def test_random_resized_crop_full_scale_is_identity():
    x = batch(8)
    out = common.random_resized_crop(x, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(out, x, atol=1e-5)
    assert common.random_resized_crop(x, (12, 20), scale=(0.1, 0.3)).shape == (8, 3, 12, 20)


@pytest.mark.parametrize("size", [(8, 13), (24, 40), (11, 17)])
def test_resized_crop_matches_torchvision_inside_the_box(size):
    x = torch.rand(3, 3, 20, 30, generator=torch.Generator().manual_seed(0))
    top, left, height, width = 3, 5, 11, 17
    expected = torchvision.transforms.functional.resized_crop(x, top, left, height, width, list(size),
                                                              antialias=False)
    out = common.resized_crop(x, top, left, height, width, size)
    assert out.shape == expected.shape and torch.allclose(out, expected, atol=1e-5)
    # per-sample boxes as tensors: each sample is cropped from its own box
    tops, lefts, heights, widths = (torch.tensor(v, dtype=torch.float32) for v in
                                    ([0, 3, 9], [0, 5, 13], [20, 11, 7], [30, 17, 17]))
    out = common.resized_crop(x, tops, lefts, heights, widths, size)
    for i in range(3):
        box = [int(v[i]) for v in (tops, lefts, heights, widths)]
        one = torchvision.transforms.functional.resized_crop(x[i:i + 1], *box, list(size), antialias=False)
        assert torch.allclose(out[i:i + 1], one, atol=1e-5)


def test_random_resized_crop_falls_back_to_torchvision_centre_crop():
    # 10 x 40 at full area: w = sqrt(400 r) <= 23 forces h >= 17 > 10, so all 10 tries fail and
    # torchvision takes the centred box of ratio 4/3 at full height: h 10, w 13, top 0, left 13
    x = torch.rand(2, 3, 10, 40, generator=torch.Generator().manual_seed(0))
    out = common.random_resized_crop(x, 6, scale=(1.0, 1.0))
    expected = torchvision.transforms.functional.resized_crop(x, 0, 13, 10, 13, [6, 6], antialias=False)
    assert torch.allclose(out, expected, atol=1e-5)


def test_grayscale_matches_torchvision():
    x = torch.rand(4, 3, 9, 7, generator=torch.Generator().manual_seed(0))
    expected = torchvision.transforms.functional.rgb_to_grayscale(x, num_output_channels=3)
    assert torch.allclose(common.grayscale(x), expected, atol=1e-6)


def test_flip_flips_or_keeps_each_sample():
    x = batch(32)
    out = common.horizontal_flip(x, p=0.5)
    flipped = torch.tensor([torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped | kept).all() and flipped.any() and kept.any()


def test_hsv_round_trip_and_hue_shift():
    x = batch(4)
    assert torch.allclose(common.hsv_to_rgb(common.rgb_to_hsv(x)), x, atol=1e-5)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    green = common.adjust_hue(red, torch.tensor(1 / 3).view(1, 1, 1))
    assert torch.allclose(green.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)


def test_grayscale_and_solarize_values():
    x = torch.tensor([0.2, 0.6, 0.9]).view(1, 3, 1, 1)
    gray = common.random_grayscale(x, p=1.0)
    assert torch.allclose(gray.flatten(), torch.full((3,), 0.2989 * 0.2 + 0.587 * 0.6 + 0.114 * 0.9))
    assert torch.allclose(common.solarize(x, p=1.0).flatten(), torch.tensor([0.2, 0.4, 0.1]))


def test_gaussian_blur_preserves_constant_images_and_smooths():
    const = torch.full((2, 3, 16, 16), 0.3)
    assert torch.allclose(common.gaussian_blur(const, p=1.0), const, atol=1e-6)
    x = batch(4, 16)
    assert common.gaussian_blur(x, p=1.0, sigma=(1.5, 2.0)).std() < x.std() * 0.7


def test_rotations_labels_match_rotated_images():
    x = batch(3)
    rotated, labels = common.rotations(x)
    assert rotated.shape == (12, 3, 32, 32) and labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for img, k in zip(rotated[3:6], labels[3:6]):
        assert k == 1
    assert torch.equal(rotated[4], torch.rot90(x[1], 1, dims=(1, 2)))
    assert torch.equal(rotated[8], x[2].flip(1).flip(2))  # 180 degrees


@pytest.mark.parametrize("mixer", ["mixup", "ricap"])
def test_mixing_weights_sum_to_one_and_match_pixels(mixer):
    torch.manual_seed(0)
    np.random.seed(0)
    # image i is constant i: the mean of a mixed image is then sum_k w_k perm_k(i)
    n = 16
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    mixed, mix = getattr(common, mixer)(x)
    assert mixed.shape == x.shape
    assert float(mix["weights"].sum()) == pytest.approx(1.0)
    expected = common.mix_targets(torch.arange(n, dtype=torch.float32), mix)
    assert torch.allclose(mixed.mean((1, 2, 3)), expected, atol=1e-4)
    # reusing `mix` applies the same weights and permutations to another view
    again, mix2 = getattr(common, mixer)(x, mix=mix)
    assert mix2 is mix and torch.allclose(again.mean((1, 2, 3)), expected, atol=1e-4)


def test_ricap_identity_for_large_patches():
    np.random.seed(3)
    torch.manual_seed(3)
    x = torch.rand(32, 3, 32, 32)
    for _ in range(20):
        _, mix = common.ricap(x, 0.3, identity_above=0.25)
        for w, perm in zip(mix["weights"], mix["perms"]):
            if w > 0.25:
                assert torch.equal(perm, torch.arange(32))


# ------------------------------------------------------------------------------------------------
# Backbones
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,channels,size,dim", [
    ("resnet18", 3, 32, 512), ("resnet34", 3, 32, 512), ("resnet50", 3, 32, 2048),
    ("resnet50-imagenet", 3, 64, 2048), ("alexnet", 2, 224, 4096), ("alexnet-small", 2, 32, 2048),
    ("lenet5", 1, 28, 84), ("vit-s16", 3, 224, 384), ("vit-s4-32", 3, 32, 384)])
def test_backbone_output_shapes(name, channels, size, dim):
    model = common.build_backbone(name, channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, dim) == (2, model.feature_dim)


def test_pad_shortcut_resnet_is_parameter_free_in_its_shortcuts():
    pad = common.build_backbone("resnet18", shortcut="pad")
    conv = common.build_backbone("resnet18", shortcut="conv")
    n_pad, n_conv = (sum(p.numel() for p in m.parameters()) for m in (pad, conv))
    # the 1x1 shortcut convs + BN of layers 2-4: (64*128 + 128*256 + 256*512) + 2 * (128+256+512)
    assert n_conv - n_pad == 64 * 128 + 128 * 256 + 256 * 512 + 2 * (128 + 256 + 512)
    shortcut = common.PadShortcut(4, 8, 2)
    x = torch.randn(1, 4, 4, 4)
    out = shortcut(x)
    assert out.shape == (1, 8, 2, 2) and torch.equal(out[:, 4:], torch.zeros(1, 4, 2, 2))
    assert torch.allclose(out[:, :4], F.avg_pool2d(x, 2))


def test_pad_shortcut_resnet_takes_mnist_sized_images():
    # 28 px reach layer4 at 7 x 7, where the strided conv gives 4 x 4: the pooled shortcut must too,
    # its last row/column averaging the one pixel that is left.
    model = common.build_backbone("resnet18", 1, shortcut="pad", width=8).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, model.feature_dim)
    x = torch.randn(1, 2, 7, 7)
    out = common.PadShortcut(2, 2, 2)(x)
    assert out.shape == (1, 2, 4, 4)
    assert torch.allclose(out[0, :, 1, 3], x[0, :, 2:4, 6].mean(1))
    assert torch.allclose(out[0, :, 3, 3], x[0, :, 6, 6])


def test_lenet5_takes_28_and_32_pixel_images():
    for size in (28, 32):
        model = common.build_backbone("lenet5", 1, image_size=size).eval()
        assert model.features(torch.randn(2, 1, size, size)).shape == (2, 16, 5, 5)
    with pytest.raises(common.Abort, match="28x28 or 32x32"):
        common.build_backbone("lenet5", 1, image_size=64)


def test_mlp_and_width():
    assert common.MLP(2000)(torch.randn(4, 2000)).shape == (4, 2000)
    assert common.build_backbone("resnet18", width=8).feature_dim == 64


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_balanced():
    a, b = common.load_dataset("synthetic", "train"), common.load_dataset("synthetic", "train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.dtype == torch.uint8 and a.images.shape == (2000, 3, 32, 32)
    assert torch.bincount(a.labels).tolist() == [200] * 10
    c = common.load_dataset("synthetic", "train", seed=1)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.images[:500], common.load_dataset("synthetic", "test").images)
    assert len(common.load_dataset("synthetic", "all")) == 2500


def lloyd(x, k, seed, iters=30):
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=g)[:k]]
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        centres = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centres[j]
                               for j in range(k)])
    return assign


def test_synthetic_is_learnable_but_not_trivial():
    """Raw-pixel k-means is far from the classes (best of three: 0.29), while a small CNN trained
    for three epochs on the labels separates them (0.97): the clusters are in the images, but not in
    pixel space."""
    train, test = common.load_dataset("synthetic", "train"), common.load_dataset("synthetic", "test")
    pixels = common.to_float(train.images).flatten(1)
    kmeans_acc = max(common.clustering_metrics(lloyd(pixels, 10, s), train.labels)["acc"] for s in range(3))
    assert kmeans_acc < 0.32
    torch.manual_seed(0)
    net = torch.nn.Sequential(common.build_backbone("resnet18", width=8), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for idx in torch.randperm(len(train)).split(64):
            loss = F.cross_entropy(net(common.to_float(train.images[idx])), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(common.to_float(test.images)).argmax(1) == test.labels).float().mean().item()
    assert acc > 0.9 and acc > kmeans_acc + 0.5


def test_long_tail_profile():
    labels = torch.arange(5000) % 10
    keep = common.long_tail_indices(labels, 10, imbalance=100)
    counts = torch.bincount(labels[keep]).tolist()
    assert counts[0] == 500 and counts[-1] == 5
    assert counts == [int(500 * 100 ** (-c / 9)) for c in range(10)]


def test_unknown_dataset_and_split():
    with pytest.raises(common.Abort, match="unknown dataset 'cifar11'"):
        common.load_dataset("cifar11")
    with pytest.raises(common.Abort, match="no split 'unlabeled'"):
        common.load_dataset("cifar10", "unlabeled")


def test_dataset_splits_and_long_tail_keeps_its_tail(tmp_path):
    assert common.dataset_splits("cifar10") == ("train", "test", "all")
    assert common.dataset_splits("cifar10-lt") == ("train", "test")
    assert common.dataset_splits("cifar100-lt") == ("train", "test")
    assert common.dataset_splits("stl10") == ("train", "test", "unlabeled", "train+unlabeled", "all")
    for name in common.DATASETS:
        assert common.dataset_splits(name) == common.SPLITS.get(name, ("train", "test", "all"))
    with pytest.raises(common.Abort, match="unknown dataset 'cifar11'"):
        common.dataset_splits("cifar11")
    torch.save({"images": torch.zeros(1000, 3, 2, 2, dtype=torch.uint8), "labels": torch.arange(1000) % 10},
               tmp_path / "cifar10-train.pt")
    torch.save({"images": torch.zeros(100, 3, 2, 2, dtype=torch.uint8), "labels": torch.arange(100) % 10},
               tmp_path / "cifar10-test.pt")
    with pytest.raises(common.Abort, match=r"no split 'all' .*long tail.*use --split train$"):
        common.load_dataset("cifar10-lt", "all", str(tmp_path), download=False)
    train = common.load_dataset("cifar10-lt", "train", str(tmp_path), download=False, imbalance=10)
    counts = torch.bincount(train.labels).tolist()
    assert counts[0] == 100 and counts[-1] == 10  # 100 * 10^(-9/9)


def test_labels_outside_the_classes_are_refused(tmp_path, monkeypatch):
    images = torch.zeros(40, 3, 32, 32, dtype=torch.uint8)
    torch.save({"images": images, "labels": torch.arange(10, 50)}, tmp_path / "cifar10-test.pt")
    with pytest.raises(common.Abort, match=r"cifar10-test\.pt .*10\.\.49, outside the class ids 0\.\.9"):
        common.load_dataset("cifar10", "test", str(tmp_path), download=False)
    # -1 (unknown) only where the dataset has unlabeled data
    torch.save({"images": images, "labels": torch.full((40,), -1)}, tmp_path / "cifar10-train.pt")
    with pytest.raises(common.Abort, match=r"cifar10-train\.pt .*-1\.\.-1"):
        common.load_dataset("cifar10", "train", str(tmp_path), download=False)
    torch.save({"images": images[:, :, :3, :3], "labels": torch.full((40,), -1)},
               tmp_path / "stl10-unlabeled.pt")
    assert (common.load_dataset("stl10", "unlabeled", str(tmp_path), download=False).labels == -1).all()
    # coarse labels of CIFAR-100 are checked against the 20 super-classes
    torch.save({"images": images, "labels": torch.arange(40), "coarse_labels": torch.arange(40)},
               tmp_path / "cifar100-test.pt")
    with pytest.raises(common.Abort, match=r"cifar100-test\.pt .*coarse_labels range over 0\.\.39"):
        common.load_dataset("cifar100-20", "test", str(tmp_path), download=False)
    # files decoded by torchvision are checked before their cache is written
    class BadLabels(FakeTorchvisionSplit):
        layout, side = "NCHW", 32

        def __init__(self, root, split=None, download=False):
            super().__init__(root, split=split)
            self.labels[1] = 10

    monkeypatch.setattr(torchvision.datasets, "SVHN", BadLabels)
    with pytest.raises(common.Abort,
                       match=r"SVHN files under .* bad train split \(labels range over 0\.\.10"):
        common.load_dataset("svhn", "train", str(tmp_path))
    assert not (tmp_path / "svhn-train.pt").exists()


def test_missing_files_offline_say_where_and_how(tmp_path):
    with pytest.raises(common.Abort) as info:
        common.load_dataset("cifar10", "train", str(tmp_path), download=False)
    message = str(info.value)
    assert "cifar10-train.pt" in message and str(tmp_path) in message and "download=True" in message


def test_cache_is_used_and_corrupt_cache_is_reported(tmp_path):
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(20) % 10
    torch.save({"images": images, "labels": labels}, tmp_path / "cifar10-test.pt")
    data = common.load_dataset("cifar10", "test", str(tmp_path), download=False)
    assert torch.equal(data.images, images) and data.num_classes == 10
    (tmp_path / "cifar10-train.pt").write_bytes(b"not a tensor file")
    with pytest.raises(common.Abort, match="corrupt dataset cache"):
        common.load_dataset("cifar10", "train", str(tmp_path))
    # torch.load's refusal of a non-tensor object spans many lines: the message keeps to one
    torch.save({"images": np.zeros((2, 3, 4, 4), np.uint8), "labels": labels[:2]},
               tmp_path / "cifar10-train.pt")
    with pytest.raises(common.Abort,
                       match=r"corrupt dataset cache .*cifar10-train\.pt \(UnpicklingError") as info:
        common.load_dataset("cifar10", "train", str(tmp_path))
    assert "\n" not in str(info.value)


def test_cifar100_20_uses_the_coarse_labels(tmp_path):
    fine = torch.arange(30) % 100
    torch.save({"images": torch.zeros(30, 3, 32, 32, dtype=torch.uint8), "labels": fine,
                "coarse_labels": fine % 20}, tmp_path / "cifar100-test.pt")
    data = common.load_dataset("cifar100-20", "test", str(tmp_path), download=False)
    assert data.num_classes == 20 and torch.equal(data.labels, fine % 20)


class FakeTorchvisionSplit:
    """Stands in for a torchvision dataset class: the attributes common._decode_torchvision reads."""

    def __init__(self, root, train=None, split=None, download=False):
        n = {"train": 12, "test": 6, "unlabeled": 9}[split or ("train" if train else "test")]
        rng = np.random.default_rng(n)
        if self.layout == "NCHW":  # SVHN, STL-10: numpy (N, C, H, W) and .labels (-1 = unlabeled)
            self.data = rng.integers(0, 256, (n, 3, self.side, self.side), dtype=np.uint8)
            self.labels = np.full(n, -1) if split == "unlabeled" else np.arange(n) % 10
        else:  # CIFAR: numpy (N, H, W, C) and a .targets list; coarse labels only in the pickle
            self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = list(range(n))
            self.base_folder = "cifar-100-python"
            os.makedirs(os.path.join(root, self.base_folder), exist_ok=True)
            with open(os.path.join(root, self.base_folder, "train" if train else "test"), "wb") as f:
                pickle.dump({"coarse_labels": [i % 20 for i in range(n)]}, f)


@pytest.mark.parametrize("name,cls,layout,side", [("svhn", "SVHN", "NCHW", 32),
                                                  ("stl10", "STL10", "NCHW", 96),
                                                  ("cifar100-20", "CIFAR100", "NHWC", 32)])
def test_torchvision_decoding_and_cache(name, cls, layout, side, tmp_path, monkeypatch):
    fake = type(cls, (FakeTorchvisionSplit,), {"layout": layout, "side": side})
    monkeypatch.setattr(torchvision.datasets, cls, fake)
    data = common.load_dataset(name, "train", str(tmp_path))
    reference = fake(str(tmp_path), train=True, split="train")
    assert data.images.dtype == torch.uint8 and data.images.shape == (12, 3, side, side)
    expected = reference.data if layout == "NCHW" else reference.data.transpose(0, 3, 1, 2)
    assert np.array_equal(data.images.numpy(), expected)
    assert data.labels.tolist() == ([i % 20 for i in range(12)] if name == "cifar100-20"
                                    else [i % 10 for i in range(12)])
    cache = tmp_path / f"{common.DATASETS[name][1]}-train.pt"
    assert cache.exists()
    monkeypatch.delattr(torchvision.datasets, cls)  # the cache alone now serves the split
    assert torch.equal(common.load_dataset(name, "train", str(tmp_path)).images, data.images)
    if name == "stl10":
        monkeypatch.setattr(torchvision.datasets, cls, fake, raising=False)
        both = common.load_dataset(name, "train+unlabeled", str(tmp_path))
        assert len(both) == 21 and (both.labels == -1).sum() == 9


def write_idx_gz(path, array):
    """The IDX format of LeCun's MNIST files (big-endian magic 0x08 = uint8 and the number of
    dimensions, then each dimension as a big-endian int32, then the bytes), gzip-compressed."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_family_gz_files_are_read_without_writing_beside_them(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    write_idx_gz(raw / "t10k-images-idx3-ubyte.gz", images)
    write_idx_gz(raw / "t10k-labels-idx1-ubyte.gz", labels)
    md5 = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in raw.iterdir()}
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "resources", list(md5.items()))
    data = common.load_dataset("fashion-mnist", "test", str(tmp_path), download=False)
    assert np.array_equal(data.images.numpy(), images[:, None]) and data.labels.tolist() == labels.tolist()
    assert sorted(os.listdir(raw)) == sorted(md5)  # nothing unpacked beside the .gz files
    # a damaged .gz is named
    (tmp_path / "fashion-mnist-test.pt").unlink()
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(common.Abort, match=r"t10k-labels-idx1-ubyte\.gz is not torchvision's original file"):
        common.load_dataset("fashion-mnist", "test", str(tmp_path), download=False)
    # so is a truncated unpacked file (read in place of its .gz)
    # 7 labels announced, 1 there
    (raw / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 7, 3]))
    with pytest.raises(common.Abort,
                       match=r"cannot read .*t10k-labels-idx1-ubyte \(RuntimeError: .*\); delete it"):
        common.load_dataset("fashion-mnist", "test", str(tmp_path), download=False)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "stl10"])
def test_offline_download_fails_in_one_line_and_creates_no_folder(name, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno 101] Network is unreachable\nsecond line")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    empty = tmp_path / "empty"
    empty.mkdir()
    for data_dir, download in ((empty, True), (empty, False), (tmp_path / "nowhere" / "data", True)):
        with pytest.raises(common.Abort, match=rf"{name} \(train split\) not found") as info:
            common.load_dataset(name, "train", str(data_dir), download=download)
        assert "\n" not in str(info.value)
        assert sorted(os.listdir(tmp_path)) == ["empty"] and os.listdir(empty) == []


def test_imagefolder(tmp_path):
    from PIL import Image
    for c in ("cat", "dog"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40 + i, 30), (100 * i, 50, 0)).save(tmp_path / "train" / c / f"{i}.png")
    data = common.load_dataset("imagefolder", "train", str(tmp_path), image_size=24)
    data.workers = 0
    assert len(data) == 6 and data.num_classes == 2
    seen = []
    for idx, images, labels in data.batches(torch.tensor([5, 0, 3, 1, 2, 4]), 4, random_crop=True):
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 24, 24)
        assert torch.equal(labels, data.labels[idx])
        seen += idx.tolist()
    assert seen == [5, 0, 3, 1, 2, 4]


def make_image_folder(root, layout):
    """layout: {relative folder: number of PNG images}; the images' colour encodes their index."""
    from PIL import Image
    for folder, n in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (20, 16), (10 * i, 0, 0)).save(root / folder / f"{i}.png")


def test_imagefolder_splits_share_one_class_list(tmp_path):
    make_image_folder(tmp_path, {"train/cat": 2, "train/cow": 3, "train/dog": 1, "val/cat": 1, "val/dog": 2})
    everything = common.load_dataset("imagefolder", "all", str(tmp_path), image_size=8)
    # all = train + val, 3 classes (not the 2 folders train and val)
    assert (everything.num_classes == 3 and everything.classes == ["cat", "cow", "dog"]
            and len(everything) == 9)
    assert everything.labels.tolist() == [0, 0, 1, 1, 1, 2, 0, 2, 2]
    val = common.load_dataset("imagefolder", "test", str(tmp_path), image_size=8)
    assert val.num_classes == 3 and val.labels.tolist() == [0, 2, 2]  # dog keeps id 2 without cow
    assert [os.path.relpath(p, tmp_path) for p, _ in val.samples] == ["val/cat/0.png", "val/dog/0.png",
                                                                      "val/dog/1.png"]
    assert common.load_dataset("imagefolder", "train", str(tmp_path)).labels.tolist() == [0, 0, 1, 1, 1, 2]
    # a folder of class folders is the data of every split
    flat = tmp_path / "train"
    for split in ("train", "test", "all"):
        data = common.load_dataset("imagefolder", split, str(flat))
        assert data.classes == ["cat", "cow", "dog"] and data.labels.tolist() == [0, 0, 1, 1, 1, 2]


def test_imagefolder_layouts_that_cannot_work_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(common.Abort, match=f"no class folder in {empty}; .*\\.jpg"):
        common.load_dataset("imagefolder", "all", str(empty))
    make_image_folder(tmp_path / "notes", {"cat": 2, "dog": 0})
    (tmp_path / "notes" / "dog" / "readme.txt").write_text("dogs go here")
    with pytest.raises(common.Abort, match=f"no image in {tmp_path / 'notes' / 'dog'} .*\\.png"):
        common.load_dataset("imagefolder", "train", str(tmp_path / "notes"))
    make_image_folder(tmp_path / "only_train", {"train/cat": 1})
    with pytest.raises(common.Abort, match="only_train has no val/ or test/ for the test split"):
        common.load_dataset("imagefolder", "test", str(tmp_path / "only_train"))
    (tmp_path / "only_train" / "val").mkdir()  # an empty val/: the test split has no image
    with pytest.raises(common.Abort,
                       match=f"no image in the class folders of {tmp_path / 'only_train' / 'val'} "):
        common.load_dataset("imagefolder", "test", str(tmp_path / "only_train"))
    assert len(common.load_dataset("imagefolder", "all", str(tmp_path / "only_train"))) == 1
    with pytest.raises(common.Abort, match="nowhere is not a folder"):
        common.load_dataset("imagefolder", "train", str(tmp_path / "nowhere"))


@pytest.mark.parametrize("workers", [0, 1])
def test_imagefolder_unreadable_image_is_named(tmp_path, workers):
    from PIL import Image
    make_image_folder(tmp_path, {"cat": 3, "dog": 3})
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "dog" / "photo.jpg")
    whole = (tmp_path / "dog" / "photo.jpg").read_bytes()
    (tmp_path / "dog" / "photo.jpg").write_bytes(whole[:len(whole) // 2])  # truncated JPEG
    data = common.load_dataset("imagefolder", "train", str(tmp_path), image_size=8)
    data.workers = workers
    bad = 6  # cat/0-2.png, dog/0-2.png, dog/photo.jpg in ImageFolder's sorted order
    assert len(next(data.batches(torch.tensor([0, 1]), 2))[0]) == 2  # the valid images load
    with pytest.raises(common.Abort, match=f"cannot read the image {tmp_path / 'dog' / 'photo.jpg'} "
                                           r"\(OSError: .*[Tt]runcated.*\); remove or replace it$"):
        list(data.batches(torch.arange(len(data)), 4))
    (tmp_path / "dog" / "photo.jpg").write_bytes(b"not an image")
    with pytest.raises(common.Abort, match="cannot read the image .*photo.jpg .*UnidentifiedImageError"):
        list(data.batches(torch.tensor([bad]), 1, random_crop=True))


DATA_DIR = os.environ.get("DATA_DIR")
needs_data = pytest.mark.skipif(not DATA_DIR, reason="DATA_DIR is not set: real datasets are not available")


@needs_data
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_real_mnist_family(name, folder, tmp_path):
    """The raw .gz files of DATA_DIR (copied, as the decoded cache is written beside them) are
    read without unpacking them there, then the decoded cache is written and used."""
    if not os.path.isdir(os.path.join(DATA_DIR, folder, "raw")):
        pytest.skip(f"{folder}/raw is not in {DATA_DIR}")
    shutil.copytree(os.path.join(DATA_DIR, folder, "raw"), tmp_path / folder / "raw")
    # download=True: torchvision finds the verified .gz files and only unpacks them (no network)
    train = common.load_dataset(name, "train", str(tmp_path), download=True)
    test = common.load_dataset(name, "test", str(tmp_path), download=True)
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(train.labels).min() > 5000 and torch.bincount(test.labels).min() > 800
    assert (sorted(os.listdir(tmp_path / folder / "raw"))
            == sorted(os.listdir(os.path.join(DATA_DIR, folder, "raw"))))
    mean = common.to_float(train.images[:10000]).mean().item()
    assert mean == pytest.approx(common.DATASETS[name][3][0], abs=0.01)
    shutil.rmtree(tmp_path / folder)  # now only the cache remains
    cached = common.load_dataset(name, "test", str(tmp_path), download=False)
    assert torch.equal(cached.images, test.images) and torch.equal(cached.labels, test.labels)


@needs_data
def test_real_cifar10_cache():
    if not os.path.isfile(os.path.join(DATA_DIR, "cifar10-test.pt")):
        pytest.skip(f"cifar10-test.pt is not in {DATA_DIR}")
    test = common.load_dataset("cifar10", "test", DATA_DIR, download=False)
    assert test.images.shape == (10000, 3, 32, 32) and torch.bincount(test.labels).tolist() == [1000] * 10
    mean = common.to_float(test.images).mean((0, 2, 3))
    assert torch.allclose(mean, torch.tensor(common.DATASETS["cifar10"][3]), atol=0.01)


@needs_data
def test_real_cifar100_20_test_split():
    if not os.path.isfile(os.path.join(DATA_DIR, "cifar100-test.pt")):
        pytest.skip(f"cifar100-test.pt is not in {DATA_DIR}")
    data = common.load_dataset("cifar100-20", "test", DATA_DIR, download=False)
    assert data.num_classes == 20 and torch.bincount(data.labels).tolist() == [500] * 20


# ------------------------------------------------------------------------------------------------
# Run plumbing
# ------------------------------------------------------------------------------------------------
def run_args(tmp_path, name="r"):
    """The arguments common.Run reads, as a method's parse_args makes them (name None: the default
    run directory)."""
    return argparse.Namespace(dataset="synthetic", seed=3, out_dir=name and str(tmp_path / name), resume=None,
                              time_limit=None, log_every=60.0, tensorboard=False, lr=0.1, epochs=5,
                              device="cpu", amp=True, resume_changes={})


def resume_args(path, **changes):
    return argparse.Namespace(dataset="synthetic", seed=3, out_dir=None, resume=str(path), time_limit=None,
                              log_every=60.0, tensorboard=False, lr=0.1, epochs=5, device="cpu", amp=True,
                              resume_changes={k: (None, v) for k, v in changes.items()})


def test_checkpoint_round_trip_restores_every_named_object_and_the_rng(tmp_path):
    run = common.Run("test", run_args(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1], 0.5)
    bank, extra = torch.randn(5, 3), {"centre": torch.ones(2), "count": 7}
    assert run.resume("stage", 5, model=model, optimizer=opt, scheduler=sched, bank=bank, extra=extra) == 0
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    run.save_checkpoint(4)
    expected = (torch.rand(3), np.random.rand(2), random.random())
    saved = {k: v.clone() for k, v in model.state_dict().items()}, bank.clone(), dict(extra)
    run.close()

    torch.manual_seed(123)
    np.random.seed(5)
    resumed = common.Run("test", resume_args(run.path))
    model2 = torch.nn.Linear(4, 2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.MultiStepLR(opt2, [1], 0.5)
    bank2, extra2 = torch.zeros(5, 3), {}
    assert resumed.resumed_stage == "stage"
    assert resumed.resume("stage", 7, model=model2, optimizer=opt2, scheduler=sched2, bank=bank2,
                          extra=extra2) == 5
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(2), expected[1])
    assert random.random() == expected[2]
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in saved[0].items())
    assert torch.equal(bank2, saved[1]) and extra2.keys() == saved[2].keys() and extra2["count"] == 7
    assert torch.equal(extra2["centre"], saved[2]["centre"])
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"],
                       opt.state_dict()["state"][0]["momentum_buffer"])
    assert sched2.get_last_lr() == [0.05]
    assert not [f for f in os.listdir(run.path) if ".tmp" in f]  # atomic write left no temp file
    resumed.close()
    with pytest.raises(common.Abort, match="has trained 5 epochs of stage"):
        common.Run("test", resume_args(run.path)).resume("stage", 4, model=model2)


def test_a_learning_rate_lowered_on_resume_scales_the_schedule(tmp_path):
    def schedule(lr):
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        return model, opt, torch.optim.lr_scheduler.MultiStepLR(opt, [2, 4], 0.1)
    run = common.Run("test", run_args(tmp_path))
    model, opt, sched = schedule(0.1)
    run.resume("s", 6, model=model, optimizer=opt, scheduler=sched)
    for _ in range(3):
        sched.step()
    run.save_checkpoint(2)  # lr 0.1 -> 0.01 at epoch 2
    run.close()
    resumed = common.Run("test", resume_args(run.path, lr=0.02))
    resumed.args.resume_changes = {"lr": (0.1, 0.02)}
    model, opt, sched = schedule(0.02)
    resumed.resume("s", 6, model=model, optimizer=opt, scheduler=sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002)  # 0.02 x 0.1: the point of the schedule kept
    sched.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0002)


def test_a_run_resumed_only_for_its_result_records_the_settings_that_made_it(tmp_path):
    """A run resumed at its end with a changed evaluation flag writes no checkpoint; its final.json
    must still sit beside the args.json that made it."""
    run = common.Run("test", run_args(tmp_path))
    model = torch.nn.Linear(2, 1)
    run.resume("s", 2, model=model)
    run.save_checkpoint(1)
    run.close()
    resumed = common.Run("test", resume_args(run.path, epochs=2))
    resumed.args.epochs, resumed.args.probe_epochs = 2, 3
    resumed.args.resume_changes = {"probe_epochs": (20, 3)}
    assert resumed.resume("s", 2, model=model) == 2  # nothing left to train
    resumed.finish({"probe_test_acc": 0.5})
    saved = json.loads((tmp_path / "r" / "args.json").read_text())
    assert saved["probe_epochs"] == 3 and "resume_changes" not in saved


def test_a_run_stopped_inside_an_epoch_keeps_that_epoch_in_its_schedule(tmp_path):
    """Stopped 3 steps into its second epoch, a run has begun 2 epochs: --epochs 1 would write its
    result as a 1-epoch run with more than one epoch trained."""
    run = common.Run("test", run_args(tmp_path))
    model = torch.nn.Linear(2, 1)
    run.resume("s", 2, model=model)
    run.save_checkpoint(1, step=3, meter=common.Meter())
    run.close()
    shorter = common.Run("test", resume_args(run.path, epochs=1))
    with pytest.raises(common.Abort, match="trained 1 epochs of s and 3 steps of epoch 2; --epochs cannot be "
                       "lower than 2"):
        shorter.resume("s", 1, model=model)
    shorter.close()
    assert common.Run("test", resume_args(run.path, epochs=2)).resume("s", 2, model=model) == 1


def test_a_stop_signal_during_the_start_up_stops_the_run_at_its_first_step(tmp_path, monkeypatch):
    """A scheduler's SIGUSR1 that arrives while the script loads its data (before the Run exists)
    must not kill it: the run checkpoints after its first step and exits 3, as a requeue loop
    expects."""
    monkeypatch.setattr(common.Run, "stop_signal", None)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def main():
        os.kill(os.getpid(), signal.SIGUSR1)  # the start-up
        data = common.load_dataset("synthetic", "test")
        run = common.Run("test", run_args(tmp_path))
        run.resume("s", 2, model=torch.nn.Linear(2, 1))
        for _ in run.batches(data, 100, 0, common.Meter()):
            pass

    try:
        with pytest.raises(SystemExit) as info:
            common.run_main(main)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert info.value.code == 3 and (state["epoch"], state["step"]) == (0, 1)


def _raise(error):
    raise error


def test_sizes_too_large_for_the_memory_are_one_line(monkeypatch, capsys):
    """--width 100000 and the like: an allocation the machine cannot make is a usage error (one
    line, exit 2); any other RuntimeError is a fault of the code and keeps its traceback."""
    monkeypatch.setattr(sys, "argv", ["m.py"])
    cuda = "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 139.8 GiB"
    for make, size in ((lambda: torch.empty(2**50, dtype=torch.uint8), "1,048,576.0 GiB"),
                       (lambda: _raise(torch.OutOfMemoryError(cuda)), "20.00 GiB")):
        with pytest.raises(SystemExit) as info:
            common.run_main(make)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1
        assert err.startswith(f"m.py: error: out of memory ({size} at once): lower the sizes (--batch-size")
    with pytest.raises(RuntimeError, match="a fault"):
        common.run_main(lambda: _raise(RuntimeError("a fault")))


def test_a_finished_run_takes_only_changes_that_act(tmp_path, capsys):
    """A finished run resumed with a flag that would train nothing (no longer schedule) says it has
    finished and leaves its files as they are; an evaluation flag gives a new final evaluation, and
    args.json then records it beside the settings that trained the weights."""
    run = common.Run("test", run_args(tmp_path))
    run.resume("s", 5, model=torch.nn.Linear(2, 1))
    run.save_checkpoint(4)
    run.finish({"acc": 0.5})
    files = {name: (tmp_path / "r" / name).read_bytes() for name in ("args.json", "final.json")}

    def resumed(**changes):
        args = resume_args(run.path)
        for k, (old, new) in changes.items():
            setattr(args, k, new)
        args.resume_changes = dict(changes)
        return common.Run("test", args)

    idle = ({}, {"lr": (0.1, 0.01)}, {"lr": (0.1, 0.01), "time_limit": (None, 60.0)}, {"epochs": (5, 4)})
    for changes in idle:
        with pytest.raises(common.Stopped, match="has finished") as info:
            resumed(**changes)
        named = re.findall(r"--([a-z-]+)", str(info.value).split("; to extend")[0])
        assert info.value.exit_code == 0 and named == [k.replace("_", "-") for k in changes]
    assert files == {name: (tmp_path / "r" / name).read_bytes() for name in files}
    probe = resumed(lr=(0.1, 0.01), probe_epochs=(20, 3))
    assert probe.args.resume_changes == {"probe_epochs": (20, 3)} and probe.args.lr == 0.1
    probe.close()
    longer = resumed(lr=(0.1, 0.01), epochs=(5, 8))
    assert longer.args.resume_changes == {"lr": (0.1, 0.01), "epochs": (5, 8)} and longer.args.lr == 0.01


def test_a_run_directory_is_claimed_by_exactly_one_run(tmp_path, monkeypatch):
    first = common.Run("test", run_args(tmp_path))
    with pytest.raises(common.Abort, match="another process is running the run"):
        common.Run("test", run_args(tmp_path))  # even before its first checkpoint
    first.close()  # a start that ended before its first checkpoint leaves a folder free again
    first = common.Run("test", run_args(tmp_path))
    for name in ("metrics.jsonl", "final.json", "checkpoint.pt"):  # any run file marks a run
        os.makedirs(tmp_path / name[:5])
        (tmp_path / name[:5] / name).write_text("{}")
        with pytest.raises(common.Abort, match="already holds a run"):
            common.Run("test", run_args(tmp_path, name[:5]))
        assert (tmp_path / name[:5] / name).read_text() == "{}"
    (tmp_path / "file").write_text("x")
    with pytest.raises(common.Abort, match="cannot create the run directory"):
        common.Run("test", run_args(tmp_path, "file/run"))
    with pytest.raises(common.Abort, match="is a file, not a folder"):
        common.Run("test", run_args(tmp_path, "file"))
    monkeypatch.chdir(tmp_path)
    live = [common.Run("test", run_args(tmp_path, None)) for _ in range(3)]
    assert len({run.path for run in live}) == 3  # runs started in the same second get their own directories
    with pytest.raises(common.Abort, match="another process is running the run"):
        common.Run("test", resume_args(first.path))  # a live run, before its first checkpoint
    first.save_checkpoint(0)
    with pytest.raises(common.Abort, match="another process is running the run"):
        common.Run("test", resume_args(first.path))  # the lock of a live run


def test_resume_repairs_metrics_and_removes_temporaries_of_killed_writers(tmp_path):
    run = common.Run("test", run_args(tmp_path))
    run.resume("a", 5)
    meter = common.Meter()
    for epoch in range(3):
        run.log(epoch, {"loss": 1.0}, 10, 1.0)
        if epoch == 1:
            run.save_checkpoint(epoch)
    with open(run.file("metrics.jsonl"), "a") as f:
        f.write('{"stage": "a", "ep')  # cut by a crash
    dead = run.file("checkpoint.pt.tmp999999999")
    open(dead, "w").write("x" * 100)
    run.close()  # the process ends
    resumed = common.Run("test", resume_args(run.path))
    assert ([(m["stage"], m["epoch"]) for m in map(json.loads, open(run.file("metrics.jsonl")))]
            == [("a", 0), ("a", 1)])
    assert not os.path.exists(dead)
    resumed.resume("a", 5)
    resumed.save_checkpoint(2, step=4, meter=meter)  # stopped inside epoch 3
    resumed.log(2, {"loss": 1.0}, 10, 1.0)  # a line a kill left after it
    resumed.close()
    again = common.Run("test", resume_args(run.path))
    assert [m["epoch"] for m in map(json.loads, open(run.file("metrics.jsonl")))] == [0, 1]
    assert again.resume("a", 5) == 2 and again.inside_epoch


def test_divergence_message_says_what_is_kept(tmp_path):
    run = common.Run("test", run_args(tmp_path))
    run.resume("a", 3)
    meter = common.Meter()
    meter.add(loss=torch.tensor(1.0))
    meter.add(loss=torch.tensor(float("nan")))
    with pytest.raises(common.Abort, match="loss became nan at epoch 2: training diverged before any "
                                           "checkpoint") as info:
        meter.averages(1, run)
    assert info.value.exit_code == 1
    run.save_checkpoint(0)
    before = open(run.file("checkpoint.pt"), "rb").read()
    with pytest.raises(common.Abort, match="loss became nan at epoch 2: training diverged; the last good "
                                           "checkpoint is kept in .*--resume .* --lr LR"):
        meter.averages(1, run)
    assert open(run.file("checkpoint.pt"), "rb").read() == before
    ok = common.Meter()
    ok.add(a=torch.tensor(1.0), b=torch.tensor(2.0))
    ok.add(a=torch.tensor(3.0), b=torch.tensor(2.0))
    assert ok.averages() == {"a": 2.0, "b": 2.0}
    ok.add(c=torch.tensor(5.0))  # a name added on fewer steps is averaged over its own steps
    assert ok.averages() == {"a": 2.0, "b": 2.0, "c": 5.0}


def test_run_main_turns_abort_into_one_line_and_exit_code(capsys):
    def failing():
        raise common.Abort("something is wrong; do this", exit_code=2)
    with pytest.raises(SystemExit) as info:
        common.run_main(failing)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: something is wrong; do this" in err

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as info:
        common.run_main(interrupted)
    assert info.value.code == 130 and capsys.readouterr().err.count("\n") == 1


def test_command_line_conventions(capsys):
    p = common.ArgumentParser(prog="m.py")
    p.add_argument("--n", type=common.positive_int, default=3, help="a count")
    p.add_argument("--steps", type=int, nargs="*", default=[1, 2], help="steps")
    p.add_argument("--flag", action=argparse.BooleanOptionalAction, default=False, help="a switch")
    p.add_argument("--path", help="where (default: here)")
    help_text = p.format_help()
    assert "a count (default: 3)" in help_text and "steps (default: 1 2)" in help_text
    assert "(default: off)" in help_text and "where (default: here)\n" in help_text
    for value, ok in [("1", True), ("0", False), ("x", False)]:
        assert (common.positive_int(value) == 1) if ok else pytest.raises(argparse.ArgumentTypeError,
                                                                          common.positive_int, value)
    assert common.fraction("0.9") == 0.9
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.fraction(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        common.positive_float("inf")
    assert common.probability("1") == 1.0 and common.hue_shift("0.5") == 0.5  # always; ColorJitter's most
    for parse, bad in [(common.probability, "1.1"), (common.probability, "nan"), (common.hue_shift, "0.6")]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)
    assert common.device_name("cuda:1") == "cuda:1"
    with pytest.raises(SystemExit) as info:
        p.parse_args(["--n", "0"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err == ("m.py: error: argument --n: '0' is not an integer >= 1 "
                                            "(see m.py --help)\n")


def test_resume_keeps_the_saved_settings_and_names_refused_flags(tmp_path, capsys):
    def parser():
        p = common.ArgumentParser(prog="m.py")
        p.add_argument("--dataset", default="synthetic")
        p.add_argument("--epochs", type=int, default=2)
        p.add_argument("--width", type=int, default=8)
        common.add_run_arguments(p, "m")
        return p
    check = lambda p, args: None  # noqa: E731
    args = common.parse_arguments(parser(), ["--width", "4", "--out-dir", str(tmp_path / "r")], "m.py", check)
    run = common.Run("m", args)
    run.resume("s", 2)
    run.save_checkpoint(0)
    run.close()
    same = common.parse_arguments(parser(), ["--resume", run.path, "--width", "4"], "m.py", check,
                                  ("epochs",))
    assert same.width == 4 and same.resume_changes == {}  # repeating the saved value is no change
    longer = common.parse_arguments(parser(), ["--resume", run.path, "--epochs", "5", "--device", "cpu"],
                                    "m.py", check, ("epochs",))
    assert (longer.epochs, longer.width, longer.device) == (5, 4, "cpu")
    assert longer.resume_changes == {"epochs": (2, 5), "device": (None, "cpu")}
    with pytest.raises(SystemExit) as info:
        common.parse_arguments(parser(), ["--resume", run.path, "--width", "16", "--seed", "1"], "m.py",
                               check)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--width, --seed cannot change" in err and err.count("\n") == 1
    with pytest.raises(common.Abort, match="is a run of m.py"):
        common.parse_arguments(parser(), ["--resume", run.path], "other.py", check)


def test_epoch_batches_cover_the_epoch_from_a_step(tmp_path):
    data = common.load_dataset("synthetic", "test")
    full = common.EpochBatches(data, 64, seed=1, epoch=2)
    assert len(full) == 500 // 64
    batches = [idx for idx, _, _ in full]
    later = [idx for idx, _, _ in common.EpochBatches(data, 64, seed=1, epoch=2, first=3)]
    assert (len(batches) == 7 and all(torch.equal(a, b) for a, b in zip(batches[3:], later))
            and len(later) == 4)
    assert torch.equal(torch.cat(batches), common.epoch_order(500, 1, 2, "cpu")[:448])


def test_epoch_order_and_sharding_single_process():
    order = common.epoch_order(10, seed=1, epoch=2, device="cpu")
    assert sorted(order.tolist()) == list(range(10))
    assert torch.equal(order, common.epoch_order(10, 1, 2, "cpu"))
    assert not torch.equal(order, common.epoch_order(10, 1, 3, "cpu"))
    shards = common.shard_batches(order, 4)
    assert shards.shape == (2, 4) and torch.equal(shards.flatten(), order[:8])
    x = torch.ones(3)
    assert common.all_reduce_sum(x) is x and common.all_gather_cat(x) is x


def _distributed_worker(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    common.init_distributed("cpu")
    total = common.all_reduce_sum(torch.tensor([float(rank + 1)]))
    gathered = common.all_gather_cat(torch.full((2,), float(rank)))
    order = common.epoch_order(20, seed=0, epoch=0, device="cpu")
    shard = common.shard_batches(order, 3)
    queue.put((common.rank(), common.world_size(), total.item(), gathered.tolist(), shard.flatten().tolist(),
               order.tolist()))
    torch.distributed.destroy_process_group()


def test_distributed_helpers_with_two_gloo_processes():
    results = spawn_gloo(_distributed_worker, ())
    (r0, w0, t0, g0, s0, o0), (r1, w1, t1, g1, s1, o1) = results
    assert (r0, r1, w0, w1) == (0, 1, 2, 2)
    assert t0 == t1 == 3.0 and g0 == g1 == [0.0, 0.0, 1.0, 1.0]
    assert o0 == o1  # the same epoch order on both ranks
    # 20 samples, 3 per rank: 3 global batches of 6; the shards are disjoint and cover them
    assert len(s0) == len(s1) == 9 and not set(s0) & set(s1) and sorted(s0 + s1) == sorted(o0[:18])


# A torchrun run that imports common alone (torchvision's import would hide the fault below), and
# counts its threads before the run and after run_main returns.
RUN_MAIN_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
import common, torch
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
def main():
    common.init_distributed("cpu")
    model = common.wrap_model(torch.nn.Linear(2, 2), "cpu")  # DistributedDataParallel
    model(torch.ones(3, 2)).sum().backward()
    common.all_gather_cat(torch.ones(2))
common.run_main(main)
# one write: both ranks print to the same pipe, unbuffered (python -u)
os.write(1, f"rank {{os.environ['RANK']}} threads {{before}} {{threads()}}\\n".encode())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_run_main_ends_the_process_group_with_its_threads(tmp_path):
    """After a run with DistributedDataParallel, run_main's destroy_process_group leaves no gloo
    thread behind: a live one still releasing the last collective's tensors when the interpreter
    exits aborts the process (it did, in about 1 run in 30 of daino.py under two torchrun ranks)."""
    script = tmp_path / "run_main.py"
    script.write_text(RUN_MAIN_SCRIPT.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*torchrun, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    counts = re.findall(r"rank (\d) threads (\d+) (\d+)", result.stdout)
    assert sorted(rank for rank, _, _ in counts) == ["0", "1"]
    for rank, before, after in counts:
        assert after == before, f"rank {rank}: {int(after) - int(before)} threads left after run_main"


# ------------------------------------------------------------------------------------------------
# Labelled subsets (suave.py, daino.py)
# ------------------------------------------------------------------------------------------------
def test_labelled_subset_is_class_balanced_seeded_and_independent_of_the_global_rng():
    labels = torch.arange(300) % 3
    labels[:30] = 2  # classes of 90, 90 and 120 images
    data = common.TensorImages("t", torch.zeros(300, 1, 2, 2, dtype=torch.uint8), labels, 3, None, None)
    torch.manual_seed(0)
    chosen = common.labelled_subset(data, per_class=7, seed=5)
    torch.manual_seed(1)  # another rank's generator state: the same subset
    assert torch.equal(chosen, common.labelled_subset(data, per_class=7, seed=5))
    assert not torch.equal(chosen, common.labelled_subset(data, per_class=7, seed=6))
    assert torch.bincount(labels[chosen], minlength=3).tolist() == [7, 7, 7]
    assert chosen.unique().numel() == 21 and torch.equal(chosen, chosen.sort().values)
    share = common.labelled_subset(data, fraction=0.1, seed=5)
    assert torch.bincount(labels[share], minlength=3).tolist() == [9, 9, 12]
    with pytest.raises(common.Abort, match="--labels-per-class 95 is larger than class 0"):
        common.labelled_subset(data, per_class=95)


def test_labelled_subset_from_a_file_of_image_names(tmp_path):
    samples = [(f"/d/{c}/{c}_{i}.JPEG", k) for k, c in enumerate(("n01", "n02")) for i in range(3)]
    data = common.FolderImages(samples, ["n01", "n02"])
    (tmp_path / "list.txt").write_text("n02_1.JPEG\nn01_0.JPEG\n\n")
    assert common.labelled_subset(data, names_file=str(tmp_path / "list.txt")).tolist() == [0, 4]
    (tmp_path / "bad.txt").write_text("n01_0.JPEG\nn03_9.JPEG\n")
    with pytest.raises(common.Abort, match="1 of its 2 images are not in the training images, e.g. n03_9"):
        common.labelled_subset(data, names_file=str(tmp_path / "bad.txt"))
    pets = [(f"/d/{c}/{i}.png", k) for k, c in enumerate(("cat", "dog")) for i in range(3)]
    twins = common.FolderImages(pets, ["cat", "dog"])
    (tmp_path / "twins.txt").write_text("2.png\n0.png\n")  # 0.png is a cat and a dog
    with pytest.raises(common.Abort, match=r"2.png names 2 images \(in cat, dog\); write its lines as class"):
        common.labelled_subset(twins, names_file=str(tmp_path / "twins.txt"))
    (tmp_path / "classed.txt").write_text("dog/0.png\ncat/2.png\n")
    assert common.labelled_subset(twins, names_file=str(tmp_path / "classed.txt")).tolist() == [2, 3]
    tensors = common.TensorImages("t", torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]), 2,
                                  None, None)
    with pytest.raises(common.Abort, match="only --dataset imagefolder"):
        common.labelled_subset(tensors, names_file=str(tmp_path / "list.txt"))
