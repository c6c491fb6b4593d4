"""CLD's own pieces against direct computations on tiny inputs: NPID's logits and memory bank
(both views scored against the bank as it was before the step), the batch k-means (assignments,
centroids, empty groups, gradients), spherical and spectral grouping, the cross-view CLD loss, the
MoCo queue and key encoder, the schedule, random erasing, the flags, and quick runs of the variants."""
import argparse
import math
import os

import pytest
import torch
import torch.nn.functional as F

import cld
import common
from conftest import one_line_error, read_json, read_metrics, run_script

SYNTHETIC = ["--dataset", "synthetic", "--device", "cpu"]


def settings(**changes):
    args = cld.parse_args(SYNTHETIC)
    for k, v in changes.items():
        setattr(args, k, v)
    return args


def reference_kmeans(f, k, iters, spherical=False):
    """Lloyd's k-means in float64 with explicit loops over samples and groups: first k rows as
    centroids, nearest centroid (squared distance, or largest cosine), means of the members (a
    group without members keeps its centroid), normalised when spherical."""
    x = f.double()
    centroids = [x[j].clone() for j in range(k)]
    labels = [0] * len(x)
    for _ in range(iters):
        for i in range(len(x)):
            if spherical:
                scores = [float(x[i] @ c / c.norm()) for c in centroids]
                labels[i] = max(range(k), key=lambda j: scores[j])
            else:
                dists = [float(((x[i] - c) ** 2).sum()) for c in centroids]
                labels[i] = min(range(k), key=lambda j: dists[j])
        for j in range(k):
            members = [x[i] for i in range(len(x)) if labels[i] == j]
            if members:
                centroids[j] = sum(members) / len(members)
            if spherical:
                centroids[j] = centroids[j] / centroids[j].norm()
    return torch.tensor(labels), torch.stack(centroids)


# ------------------------------------------------------------------------------------------------
# NPID
# ------------------------------------------------------------------------------------------------
def test_npid_loss_is_the_full_softmax_over_the_bank():
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    bank = cld.init_bank(10, 6, g)
    index = torch.tensor([3, 0, 9, 5])
    expected = 0.0
    for i in range(4):  # -log exp(f_i.v_idx / T) / sum_j exp(f_i.v_j / T)
        logits = [float(f[i].double() @ bank[j].double()) / 0.1 for j in range(10)]
        expected += -(logits[index[i]] - math.log(sum(math.exp(v) for v in logits))) / 4
    assert cld.npid_loss(f, bank, index, 0.1).item() == pytest.approx(expected, rel=1e-5)


def test_bank_starts_uniform_within_its_bound():
    bank = cld.init_bank(20000, 128, torch.Generator().manual_seed(0))
    s = 1 / math.sqrt(128 / 3)
    assert bank.abs().max() <= s and bank.abs().max() > 0.99 * s
    assert bank.mean().abs() < 0.01 * s and bank.norm(dim=1).mean() == pytest.approx(1.0, abs=0.02)


def test_bank_update_follows_the_formula_on_its_rows_only():
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(6, 3, generator=g), dim=1)
    before = bank.clone()
    f = F.normalize(torch.randn(2, 3, generator=g), dim=1)
    cld.update_bank(bank, torch.tensor([4, 1]), f, 0.5)
    for row, i in ((4, 0), (1, 1)):
        v = 0.5 * before[row] + 0.5 * f[i]
        assert torch.allclose(bank[row], v / v.norm(), atol=1e-6)
    assert torch.equal(bank[[0, 2, 3, 5]], before[[0, 2, 3, 5]])


class OneBatch:
    """A stand-in for common.Run whose epoch is one batch of the whole (tiny) dataset."""

    def batches(self, data, batch_size, epoch, meter):
        yield torch.arange(len(data)), data.images, data.labels


def test_both_views_are_scored_against_the_bank_before_the_step_then_update_it_in_turn():
    torch.manual_seed(0)
    args = settings(cld_lambda=0.0, width=2, batch_size=8)
    images, labels = common.make_synthetic(8)
    data = common.TensorImages("synthetic", images, labels, 10, (0.5,) * 3, (0.25,) * 3)
    net = cld.CLDNet(common.build_backbone("resnet18", 3, "conv", 2), args).eval()  # BN: running stats
    _, prepare = cld.make_transforms(args, data, "cpu")
    bank = cld.init_bank(8, args.feature_dim)
    old_bank = bank.clone()
    with torch.no_grad():
        f = net.encode(prepare(images))[0]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)  # the features stay those computed above
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)
    meter, seen = cld.train_one_epoch(net, optimizer, data, prepare, args, 0, OneBatch(), "cpu", scheduler,
                                      net, {"bank": bank})
    # identical views: had the bank changed between them, the second loss would differ
    expected_loss = cld.npid_loss(f, old_bank, torch.arange(8), args.instance_temperature)
    assert meter.averages()["instance_loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    once = F.normalize(0.5 * old_bank + 0.5 * f, dim=1)
    assert torch.allclose(bank, F.normalize(0.5 * once + 0.5 * f, dim=1), atol=1e-5)  # view 1, then view 2
    assert seen == 8


# ------------------------------------------------------------------------------------------------
# Grouping inside the batch
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spherical", [False, True])
def test_batch_kmeans_matches_a_direct_lloyd(spherical):
    g = torch.Generator().manual_seed(2)
    f = F.normalize(torch.randn(30, 5, generator=g), dim=1)
    labels, centroids = cld.batch_kmeans(f, 4, 5, spherical)
    ref_labels, ref_centroids = reference_kmeans(f, 4, 5, spherical)
    assert torch.equal(labels, ref_labels)
    assert torch.allclose(centroids.double(), ref_centroids, atol=1e-5)
    if not spherical:  # plain means of the members, not re-normalised (official code)
        assert torch.allclose(centroids[0], f[labels == 0].mean(0), atol=1e-6)
        assert (centroids.norm(dim=1) < 0.999).all()


def test_an_empty_group_keeps_its_centroid_and_nothing_is_nan():
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.1]])  # rows 0 and 1 coincide
    labels, centroids = cld.batch_kmeans(f, 3, 5)
    assert torch.isfinite(centroids).all()
    assert (labels == 1).sum() == 0  # ties go to the first group: group 1 is empty ...
    assert torch.equal(centroids[1], f[1])  # ... and keeps its starting centroid, not a zero
    assert torch.allclose(centroids[2], torch.tensor([0.0, 1.05]))
    loss, _ = cld.cld_loss(F.normalize(f, dim=1), F.normalize(f, dim=1), settings(num_clusters=3))
    assert torch.isfinite(loss)


def test_spectral_grouping_gives_an_empty_group_its_starting_sample():
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # two groups, K = 3
    labels, centroids = cld.group(f, settings(grouping="spectral", num_clusters=3, kmeans_iters=5,
                                              eigenvectors=2, kmeans="euclidean"))
    empty = [j for j in range(3) if not (labels == j).any()]
    assert len(empty) == 1 and torch.equal(centroids[empty[0]], f[empty[0]])
    assert torch.isfinite(centroids).all()


def test_gradient_reaches_the_features_through_the_centroids():
    f = torch.randn(12, 4, generator=torch.Generator().manual_seed(3), requires_grad=True)
    labels, centroids = cld.batch_kmeans(f, 3, 5)
    (centroids * torch.arange(4.0)).sum().backward()
    members = torch.bincount(labels, minlength=3).float()
    expected = torch.arange(4.0).expand(12, 4) / members[labels].unsqueeze(1)  # d mean / d member
    assert torch.allclose(f.grad, expected)


def test_kmeans_refuses_more_groups_than_samples():
    with pytest.raises(ValueError):
        cld.batch_kmeans(torch.randn(3, 2), 4, 5)


def blocks(n_per_block=8, noise=0.05, seed=4):
    """Three tight groups of directions, their first members placed first (the batch is shuffled,
    so K-means' first-K start usually spans the groups)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(6)[:3]
    truth = torch.arange(3).repeat(n_per_block)
    f = F.normalize(centres[truth] + noise * torch.randn(len(truth), 6, generator=g), dim=1)
    return f, truth


@pytest.mark.parametrize("grouping,kmeans", [("kmeans", "spherical"), ("spectral", "euclidean"),
                                             ("spectral", "spherical")])
def test_grouping_recovers_blocks(grouping, kmeans):
    f, truth = blocks()
    labels, centroids = cld.group(f, settings(grouping=grouping, kmeans=kmeans, num_clusters=3,
                                              kmeans_iters=5, eigenvectors=None))
    assert common.ari(labels, truth) == pytest.approx(1.0)
    for j in range(3):  # the centroids live in the feature space: the mean direction of each block
        assert F.cosine_similarity(centroids[j], f[labels == j].mean(0), dim=0) > 0.999


def test_spectral_embedding_of_block_diagonal_affinity_is_constant_per_block():
    f, truth = blocks(noise=0.0)
    f = f + 1e-4 * torch.randn(f.shape, generator=torch.Generator().manual_seed(0))
    e = cld.spectral_embedding(f, 3)
    for j in range(3):
        members = e[truth == j]
        assert (members @ members.T).min() > 0.99  # one direction per block ...
    centres = F.normalize(torch.stack([e[truth == j].mean(0) for j in range(3)]), dim=1)
    assert (centres @ centres.T - torch.eye(3)).abs().max() < 0.05  # ... orthogonal across blocks


# ------------------------------------------------------------------------------------------------
# The CLD loss
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cross_view", [True, False])
def test_cld_loss_against_a_double_loop(cross_view):
    g = torch.Generator().manual_seed(5)
    g1 = F.normalize(torch.randn(10, 4, generator=g), dim=1)
    g2 = F.normalize(g1 + 0.3 * torch.randn(10, 4, generator=g), dim=1)
    args = settings(num_clusters=3, kmeans_iters=5, cld_temperature=0.2, cross_view=cross_view)
    y1, m1 = reference_kmeans(g1, 3, 5)
    y2, m2 = reference_kmeans(g2, 3, 5)
    targets = {1: (m2, y2), 2: (m1, y1)} if cross_view else {1: (m1, y1), 2: (m2, y2)}
    expected = 0.0
    for view, f in ((1, g1), (2, g2)):
        m, y = targets[view]
        for i in range(10):
            logits = [float(f[i].double() @ m[j]) / 0.2 for j in range(3)]
            expected += -(logits[y[i]] - math.log(sum(math.exp(v) for v in logits))) / 20
    loss, accuracy = cld.cld_loss(g1, g2, args)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    m, y = targets[1]
    assert accuracy.item() == pytest.approx(((g1.double() @ m.T).argmax(1) == y).double().mean().item())


# ------------------------------------------------------------------------------------------------
# MoCo
# ------------------------------------------------------------------------------------------------
def test_moco_loss_puts_the_key_first():
    g = torch.Generator().manual_seed(6)
    q, k = (F.normalize(torch.randn(3, 4, generator=g), dim=1) for _ in range(2))
    queue = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    expected = 0.0
    for i in range(3):
        logits = [float(q[i] @ k[i]) / 0.07] + [float(q[i] @ queue[j]) / 0.07 for j in range(5)]
        expected += -(logits[0] - math.log(sum(math.exp(v) for v in logits))) / 3
    assert cld.moco_loss(q, k, queue, 0.07).item() == pytest.approx(expected, rel=1e-5)


def test_queue_replaces_the_oldest_keys_and_wraps_around():
    queue, pointer = torch.zeros(5, 2), torch.tensor([3])
    cld.enqueue(queue, pointer, torch.tensor([[1.0, 1], [2, 2], [3, 3], [4, 4]]))
    assert queue[:, 0].tolist() == [3, 4, 0, 1, 2] and pointer.item() == 2
    cld.enqueue(queue, pointer, torch.tensor([[5.0, 5]]))
    assert queue[:, 0].tolist() == [3, 4, 5, 1, 2] and pointer.item() == 3


def test_key_encoder_is_an_ema_of_the_parameters_only():
    args = settings(width=2)
    query = cld.CLDNet(common.build_backbone("resnet18", 3, "conv", 2), args)
    key = cld.CLDNet(common.build_backbone("resnet18", 3, "conv", 2), args)
    before_q = {k: v.clone() for k, v in query.state_dict().items()}
    before_k = {k: v.clone() for k, v in key.state_dict().items()}
    with torch.no_grad():
        query.backbone.bn1.running_mean.add_(1.0)
    cld.ema_update(key, query, 0.9)
    for name, _ in key.named_parameters():
        assert torch.allclose(key.state_dict()[name], 0.9 * before_k[name] + 0.1 * before_q[name])
    assert torch.equal(key.backbone.bn1.running_mean, before_k["backbone.bn1.running_mean"])


# ------------------------------------------------------------------------------------------------
# Schedule, augmentation, flags
# ------------------------------------------------------------------------------------------------
def test_lr_warms_up_per_step_then_follows_a_cosine_to_the_final_value():
    args = argparse.Namespace(warmup_epochs=5, epochs=200, warmup_multiplier=100.0, final_lr=1e-6, lr=0.06)
    s = 10  # steps per epoch
    assert cld.lr_factor(0, s, args) == pytest.approx(0.01)  # lr / 100
    assert cld.lr_factor(25, s, args) == pytest.approx((1 + 99 * 0.5) / 100)
    assert cld.lr_factor(50, s, args) == pytest.approx(1.0)
    middle = 50 + (2000 - 50) // 2
    assert cld.lr_factor(middle, s, args) * 0.06 == pytest.approx(1e-6 + (0.06 - 1e-6) / 2, rel=1e-3)
    assert cld.lr_factor(2000, s, args) * 0.06 == pytest.approx(1e-6)


def test_random_erasing_blanks_one_box_per_image_of_the_allowed_area():
    torch.manual_seed(0)
    x = torch.ones(200, 3, 32, 32)
    erased = (cld.random_erasing(x) == 0).all(1)  # (B, H, W)
    area = erased.float().mean((1, 2))
    # at most 0.33 of the image before each side is rounded to whole pixels (as torchvision):
    # (h + 1/2)(w + 1/2) with h, w < 32 adds under 0.02 of the 32 x 32 image
    assert (area <= 0.35).all() and (area[area > 0] >= 0.01).all() and (area > 0).float().mean() > 0.9
    for mask in erased[:20]:  # a filled rectangle
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        if len(rows):
            assert mask.sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)


def test_cifar10_defaults_are_the_official_scripts():
    npid = vars(cld.parse_args(["--dataset", "cifar10"]))
    names = ("batch_size", "num_clusters", "weight_decay", "cld_lambda", "cld_temperature",
             "instance_temperature", "lr", "epochs", "warmup_epochs", "kmeans_iters", "momentum", "final_lr")
    assert {k: npid[k] for k in names} == dict(
        batch_size=256, num_clusters=128, weight_decay=7e-4, cld_lambda=1.0, cld_temperature=0.2,
        instance_temperature=0.1, lr=0.06, epochs=200, warmup_epochs=5, kmeans_iters=5, momentum=0.9,
        final_lr=1e-6)
    moco = vars(cld.parse_args(["--dataset", "cifar100", "--base", "moco"]))
    assert (moco["batch_size"], moco["lr"], moco["weight_decay"], moco["num_clusters"], moco["cld_lambda"],
            moco["queue_size"], moco["instance_temperature"], moco["normlinear"], moco["erasing"]) == (
        128, 0.03, 7e-4, 100, 0.25, 4096, 0.07, True, True)


@pytest.mark.parametrize("flags,named", [
    (["--num-clusters", "300"], "--num-clusters"), (["--cld-lambda", "-1"], "--cld-lambda"),
    (["--base", "simclr"], "--base"), (["--queue-size", "100"], "--queue-size"),
    (["--eigenvectors", "4"], "--eigenvectors"), (["--kmeans-iters", "0"], "--kmeans-iters"),
])
def test_bad_flags_exit_2_with_one_line(flags, named, capsys):
    with pytest.raises(SystemExit) as info:
        cld.parse_args(["--dataset", "synthetic", "--batch-size", "256", *flags])
    err = capsys.readouterr().err
    assert info.value.code == 2 and one_line_error(err) and named in err


# ------------------------------------------------------------------------------------------------
# The variants run end to end
# ------------------------------------------------------------------------------------------------
def test_moco_spectral_and_shared_variants_run_and_keep_their_state(tmp_path):
    """MoCo+CLD with spectral grouping on a shared subspace, one short epoch: the queue fills in
    ring order, the key encoder trails the query encoder, and the checkpoint holds both."""
    run = tmp_path / "run"
    result = run_script("cld.py", [*SYNTHETIC, "--base", "moco", "--grouping", "spectral", "--subspace",
                                   "shared", "--width", "2", "--epochs", "1", "--batch-size", "100",
                                   "--num-clusters", "8", "--queue-size", "300", "--probe-epochs", "1",
                                   "--out-dir", run], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["epoch"] for m in read_metrics(run)] == [0]
    final = read_json(run / "final.json")
    assert 0 <= final["knn_acc"] <= 1 and "group_kmeans_acc" in final and "probe_acc" in final
    objects = torch.load(run / "checkpoint.pt", weights_only=False)["objects"]
    assert objects["pointer"].item() == (20 * 100) % 300  # 20 steps of 100 keys into 300 slots
    assert torch.allclose(objects["queue"].norm(dim=1), torch.ones(300), atol=1e-5)  # keys only, by now
    query, key = objects["model"], objects["key_model"]
    assert "group_head.0.weight" not in query  # shared subspace: one head
    assert not torch.equal(query["backbone.conv1.weight"], key["backbone.conv1.weight"])
    assert os.path.exists(run / "final.json")


def test_an_image_folder_trains_with_the_imagenet_recipe(tmp_path):
    """imagefolder (ImageNet-100, Kitchen-HC: the official code's Kitchen-HC path crashes): MoCo-v2+CLD
    with torchvision's ResNet-50 and the MLP head, here at 32 px on 2 x 2 classes of 8 images."""
    from PIL import Image
    for split in ("train", "val"):
        for c, colour in (("cup", (200, 30, 30)), ("pan", (30, 30, 200))):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (48, 40), tuple(v + 5 * i for v in colour)).save(
                    tmp_path / "data" / split / c / f"{i}.png")
    run = tmp_path / "run"
    flags = ["--dataset", "imagefolder", "--data-dir", tmp_path / "data", "--device", "cpu",
             "--image-size", "32", "--batch-size", "8", "--num-clusters", "4", "--queue-size", "16",
             "--epochs", "1", "--probe-epochs", "1", "--knn-k", "4", "--out-dir", run]
    result = run_script("cld.py", flags, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    args, final = read_json(run / "args.json"), read_json(run / "final.json")
    assert (args["base"], args["backbone"], args["mlp_head"], args["cld_temperature"]) == (
        "moco", "resnet50-imagenet", True, 0.4)
    assert 0 <= final["knn_acc"] <= 1 and final["epochs"] == 1
