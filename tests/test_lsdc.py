"""Tests of lsdc.py's own pieces: pairwise labels, target mixing, loss, ramp-up, its flags and stages
(RotNet cache, k-means baseline, Reuters-10K, MNIST). What every script promises is in test_scripts.py."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import common
import lsdc
from conftest import needs_data, one_line_error, read_json, read_metrics, run_script

# ------------------------------------------------------------------------------------------------
# Pairwise labels against their definitions
# ------------------------------------------------------------------------------------------------
def test_knn_labels_row_or_column_rule():
    # 1-D points 0, 1, 3, 7, 8 and k = 3: each row keeps the distances strictly below its 3rd smallest
    # (self, then the nearest neighbour); point 2's nearest neighbour is 1, so (1, 2) is linked through
    # the column rule although 2 is not among the two closest of 1.
    z = torch.tensor([[0.0], [1.0], [3.0], [7.0], [8.0]])
    expected = torch.tensor([[1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],
                             [0, 1, 1, 0, 0],
                             [0, 0, 0, 1, 1],
                             [0, 0, 0, 1, 1]], dtype=torch.float32)
    assert torch.equal(lsdc.knn_labels(z, 3), expected)


def test_knn_labels_against_a_loop_on_random_features():
    torch.manual_seed(0)
    z = torch.randn(40, 8)
    k = 6
    d = ((z[:, None] - z[None]) ** 2).sum(-1)
    s = torch.zeros(40, 40)
    for i in range(40):
        for j in range(40):
            row_kth = sorted(d[i].tolist())[k - 1]
            col_kth = sorted(d[:, j].tolist())[k - 1]
            s[i, j] = float(d[i, j] < row_kth or d[i, j] < col_kth)
    assert torch.equal(lsdc.knn_labels(z, k), s)
    assert torch.equal(s, s.T) and s.diagonal().eq(1).all()


def test_cosine_labels():
    z = torch.tensor([[1.0, 0.0], [0.95, math.sqrt(1 - 0.95 ** 2)], [0.0, 1.0], [-1.0, 0.0]])
    expected = torch.eye(4)
    expected[0, 1] = expected[1, 0] = 1
    assert torch.equal(lsdc.cosine_labels(z, 0.9), expected)
    assert torch.equal(lsdc.cosine_labels(z * torch.tensor([[2.0], [0.5], [3.0], [7.0]]), 0.9), expected)
    assert lsdc.cosine_labels(z, 0.96)[0, 1] == 0


def test_sne_labels_against_definition():
    torch.manual_seed(1)
    z = torch.randn(12, 5)
    tau, temperature = 0.05, 0.7
    a = np.zeros((12, 12))
    for i in range(12):
        for j in range(12):
            a[i, j] = -(((z[i] - z[j]) / temperature) ** 2).sum().item()
    e = np.exp(a) * (1 - np.eye(12))  # the diagonal is masked out of both softmaxes
    p = 0.5 * e / e.sum(1, keepdims=True) + 0.5 * e / e.sum(0, keepdims=True) + np.eye(12)
    expected = torch.tensor(p > tau, dtype=torch.float32)
    assert torch.equal(lsdc.sne_labels(z, tau, temperature), expected)
    assert 12 < expected.sum() < 144  # neither trivial nor all linked


def test_sne_labels_find_two_separated_groups():
    z = torch.cat([torch.randn(5, 3) * 0.1, torch.randn(5, 3) * 0.1 + 5])
    s = lsdc.sne_labels(z, 0.01, 1.0)
    block = torch.block_diag(torch.ones(5, 5), torch.ones(5, 5))
    assert torch.equal(s, block)


# ------------------------------------------------------------------------------------------------
# Mixed targets: the permutation acts on the mixed view's axis
# ------------------------------------------------------------------------------------------------
def test_mixed_pair_targets_against_a_loop():
    torch.manual_seed(2)
    s = (torch.rand(8, 8) > 0.5).float()
    mix = {"weights": torch.tensor([0.5, 0.3, 0.2]),
           "perms": torch.stack([torch.randperm(8) for _ in range(3)])}
    out, official = lsdc.mixed_pair_targets(s, mix), lsdc.mixed_pair_targets(s, mix, "official-code")
    for i in range(8):
        for j in range(8):
            expected = sum(w * s[i, perm[j]] for w, perm in zip(mix["weights"].tolist(), mix["perms"]))
            assert out[i, j].item() == pytest.approx(float(expected))
            expected = sum(w * s[perm[i], j] for w, perm in zip(mix["weights"].tolist(), mix["perms"]))
            assert official[i, j].item() == pytest.approx(float(expected))


@pytest.mark.parametrize("mixer", ["ricap", "mixup"])
def test_mixed_targets_match_the_content_of_the_mixed_images(mixer):
    """Image i is a constant one-hot of its class: the channel means of mixed image j are then the
    class proportions it really contains, so the true soft target between clean i and mixed j is
    <onehot(y_i), mean(mixed_j)>. mixed_pair_targets must reproduce it from the mixing parameters."""
    torch.manual_seed(3)
    np.random.seed(3)
    classes, n = 4, 16
    y = torch.randint(0, classes, (n,))
    onehot = torch.eye(classes)[y]
    x = onehot.view(n, classes, 1, 1).expand(n, classes, 32, 32).contiguous()
    s = (y[:, None] == y[None]).float()
    for _ in range(5):
        if mixer == "ricap":
            mixed, mix = common.ricap(x, 0.3, identity_above=0.25)
        else:
            mixed, mix = common.mixup(x, 0.3)
        content = mixed.mean((2, 3))  # (n, classes) proportions inside each mixed image
        assert torch.allclose(lsdc.mixed_pair_targets(s, mix), onehot @ content.T, atol=1e-5)
        if any(w > 0 and not torch.equal(perm, torch.arange(n))
               for w, perm in zip(mix["weights"], mix["perms"])):
            # the released code's variant permutes the clean axis: it does not match the content
            assert not torch.allclose(lsdc.mixed_pair_targets(s, mix, "official-code"), onehot @ content.T,
                                      atol=1e-5)


def test_pair_label_quality_counts_off_diagonal_pairs():
    # classes 0 0 0 1 1: same-class off-diagonal pairs (0,1) (0,2) (1,2) (3,4), each counted twice
    labels = torch.tensor([0, 0, 0, 1, 1])
    s = torch.eye(5)
    for i, j in [(0, 1), (3, 4), (2, 3)]:  # two right links and one across classes
        s[i, j] = s[j, i] = 1
    precision, recall = lsdc.pair_label_quality(s, labels)
    assert precision.item() == pytest.approx(2 / 3) and recall.item() == pytest.approx(2 / 4)
    perfect = (labels[:, None] == labels[None]).float()
    assert [v.item() for v in lsdc.pair_label_quality(perfect, labels)] == [1.0, 1.0]
    assert [v.item() for v in lsdc.pair_label_quality(torch.eye(5), labels)] == [0.0, 0.0]  # self links only


def test_test_split_scores_are_sliced_from_train_plus_test():
    """With --split all the test scores come from the tail of the train+test predictions; they must
    equal scoring the test split on its own, and the smallest-cluster share must match a count."""
    torch.manual_seed(5)
    train, test = common.load_dataset("synthetic", "train"), common.load_dataset("synthetic", "test")
    everything = common.load_dataset("synthetic", "all")
    model = lsdc.LSDCNet(common.build_backbone("resnet18", shortcut="pad", width=8), 10)
    args = lsdc.parse_args(["--dataset", "synthetic", "--device", "cpu"])
    args.num_clusters, args.eval_batch_size = 10, 512
    _, prepare = lsdc.make_transforms(args, everything, torch.device("cpu"))
    sliced = lsdc.evaluate(model, everything, test, prepare, args)
    args.split = "train"
    separate = lsdc.evaluate(model, train, test, prepare, args)
    for key in ("acc", "nmi", "ari", "confident_acc", "confident_share", "median_confidence",
                "smallest_cluster"):
        assert sliced[f"test_{key}"] == pytest.approx(separate[f"test_{key}"], abs=1e-6), key
    assert np.array_equal(sliced["test_confusion"], separate["test_confusion"])
    logits, _ = common.extract_features(model, everything, prepare)
    counts = torch.bincount(logits.argmax(1), minlength=10)
    assert sliced["smallest_cluster"] == pytest.approx(counts.min().item() / len(everything))
    top = logits.softmax(1).max(1).values.numpy()
    assert sliced["median_confidence"] == pytest.approx(float(np.median(top)), abs=1e-6)
    assert (top > sliced["median_confidence"]).mean() == pytest.approx(0.5, abs=1 / len(top))


# ------------------------------------------------------------------------------------------------
# Loss and ramp-up
# ------------------------------------------------------------------------------------------------
def test_loss_against_a_per_pair_formula():
    torch.manual_seed(4)
    b, k = 6, 4
    l1, l2, l3 = torch.randn(b, k), torch.randn(b, k), torch.randn(b, k)
    targets = torch.rand(b, b)
    loss, bce, mse = lsdc.lsdc_loss(l1, l2, l3, targets, mse_weight=2.5)
    p, q, r = l1.softmax(1), l2.softmax(1), l3.softmax(1)
    total = 0.0
    for i in range(b):
        for j in range(b):
            pij = sum(p[i, c].item() * q[j, c].item() for c in range(k))
            t = targets[i, j].item()
            total += -(t * math.log(pij + 1e-7) + (1 - t) * math.log(1 - pij + 1e-7))
    expected_bce = total / b ** 2
    expected_mse = ((q - r) ** 2).sum().item() / (b * k)
    assert bce.item() == pytest.approx(expected_bce, rel=1e-5)
    assert mse.item() == pytest.approx(expected_mse, rel=1e-5)
    assert loss.item() == pytest.approx(expected_bce + 2.5 * expected_mse, rel=1e-5)


def test_loss_gradient_reaches_both_clean_and_mixed_logits():
    l1, l2, l3 = (torch.randn(4, 3, requires_grad=True) for _ in range(3))
    loss, _, _ = lsdc.lsdc_loss(l1, l2, l3, torch.eye(4), 1.0)
    loss.backward()
    assert all(t.grad.abs().sum() > 0 for t in (l1, l2, l3))


def test_rampup_curve():
    lam, T = 5.0, 100
    assert lsdc.rampup(0, lam, T) == pytest.approx(lam * math.exp(-5))
    assert lsdc.rampup(50, lam, T) == pytest.approx(lam * math.exp(-5 * 0.25))
    assert lsdc.rampup(100, lam, T) == lam and lsdc.rampup(150, lam, T) == lam
    values = [lsdc.rampup(t, lam, T) for t in range(0, 120, 10)]
    assert values == sorted(values)
    assert lsdc.rampup(3, lam, 0) == lam


def test_freeze_blocks_leaves_layer4_and_head_trainable():
    backbone = common.build_backbone("resnet18", shortcut="pad", width=8)
    model = lsdc.LSDCNet(backbone, 10)
    lsdc.freeze_blocks(backbone, 3)
    trainable = {n.split(".")[1] for n, p in model.named_parameters()
                 if p.requires_grad and n.startswith("backbone")}
    assert trainable == {"layer4"} and all(p.requires_grad for p in model.head.parameters())
    logits, z = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert len(logits) == 2 and logits[0].shape == (4, 10) and z.shape == (4, 64)


# ------------------------------------------------------------------------------------------------
# Command line and stages
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--dataset", "stl10", "--labeling", "cosine"], "--labeling cosine needs --cosine-threshold"),
    (["--dataset", "mnist", "--labeling", "sne"],
     "--labeling sne needs --sne-threshold and --sne-temperature"),
    (["--dataset", "cifar10-lt"], "--labeling knn needs --knn-k: Table 1 gives no value for cifar10-lt"),
    (["--dataset", "cifar10", "--knn-k", "300"], "--knn-k 300 is larger than the batch"),
    (["--dataset", "synthetic", "--knn-k", "0"], "argument --knn-k: '0' is not an integer >= 1"),
    (["--dataset", "synthetic", "--batch-size", "0"], "argument --batch-size: '0' is not an integer >= 1"),
    (["--dataset", "reuters10k", "--mix", "ricap"], "reuters10k is vector data"),
    (["--dataset", "cifar10", "--frozen-blocks", "7"], "invalid choice"),
    (["--dataset", "synthetic", "--epochs", "0"], "argument --epochs: '0' is not an integer >= 1"),
    (["--dataset", "synthetic", "--rotnet-epochs", "-1"],
     "argument --rotnet-epochs: '-1' is not an integer >= 0"),
    (["--dataset", "synthetic", "--mix-beta", "0"], "argument --mix-beta: '0' is not a positive number"),
    (["--dataset", "synthetic", "--crop-padding", "-1"], "argument --crop-padding"),
    (["--dataset", "synthetic", "--split", "unlabeled"], "synthetic has no split 'unlabeled'"),
    (["--dataset", "cifar10-lt", "--knn-k", "20", "--split", "all"], "cifar10-lt has no split 'all'"),
    (["--kmeans-baseline", "--rotnet-only"], "exclude each other"),
])
def test_bad_flags_exit_2_with_a_message(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        lsdc.parse_args(flags)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and one_line_error(err)


def test_defaults_follow_table_1():
    args = lsdc.parse_args(["--dataset", "cifar100-20"])
    assert (args.epochs, args.milestones, args.rampup_weight, args.rampup_length) == (200, [170], 25.0, 150)
    assert (args.labeling, args.sne_threshold, args.sne_temperature, args.knn_k) == ("sne", 0.01, 0.5, 10)
    assert (args.batch_size, args.weight_decay, args.lr_gamma, args.frozen_blocks) == (256, 5e-4, 0.1, 3)
    assert lsdc.parse_args(["--dataset", "cifar10", "--mix", "mixup"]).weight_decay == 1e-4
    assert lsdc.parse_args(["--dataset", "reuters10k"]).optimizer == "adam"


BASE = ["--dataset", "synthetic", "--device", "cpu", "--seed", "0"]
TINY = [*BASE, "--split", "test", "--width", "2", "--batch-size", "64", "--epochs", "1"]


def write_weights(path, width):
    torch.manual_seed(0)
    torch.save(common.build_backbone("resnet18", 3, shortcut="pad", width=width).state_dict(), path)


@pytest.mark.parametrize("flags,message", [
    (["--dataset", "reuters10k", "--reuters-file", "{tmp}/nope.npy"], "nope.npy not found"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}/empty", "--device", "cpu"],
     "cifar10 (train split) not found"),
    ([*BASE, "--batch-size", "4000"], "--batch-size 4000 is larger than synthetic (2500 samples)"),
    ([*TINY, "--rotnet-epochs", "1", "--rotnet-batch-size", "5000"],
     "--rotnet-batch-size 5000 is larger than"),
    ([*TINY, "--num-clusters", "3000"], "--num-clusters 3000 is larger than synthetic (500 samples)"),
    ([*TINY, "--rotnet-checkpoint", "{tmp}/missing.pt"],
     "--rotnet-checkpoint {tmp}/missing.pt: no such file"),
    ([*TINY, "--rotnet-checkpoint", "{tmp}/text.pt"], "{tmp}/text.pt is not a weights file"),
    ([*TINY, "--rotnet-checkpoint", "{tmp}/tensor.pt"], "{tmp}/tensor.pt holds a Tensor, not a state dict"),
    ([*TINY, "--rotnet-checkpoint", "{tmp}/width8.pt"],
     "does not hold weights of a resnet18 of width 2: conv1.weight"),
    ([*TINY, "--rotnet-dir", "{tmp}/text.pt/rotnet"],
     "--rotnet-dir {tmp}/text.pt/rotnet: cannot write there"),
    ([*TINY, "--out-dir", "{tmp}/text.pt/run"], "cannot create the run directory {tmp}/text.pt/run"),
    (["--resume", "{tmp}/nothing"], "cannot read args.json"),
])
def test_runtime_user_errors_exit_2_and_create_no_run(flags, message, tmp_path, capsys):
    (tmp_path / "text.pt").write_text("not weights")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    write_weights(tmp_path / "width8.pt", 8)
    flags = [f.format(tmp=tmp_path) for f in flags]
    if "--resume" not in flags and "--out-dir" not in flags:
        flags += ["--out-dir", str(tmp_path / "run")]
    if "--resume" not in flags and "--rotnet-dir" not in flags:
        flags += ["--rotnet-dir", str(tmp_path / "rotnet")]
    with pytest.raises(SystemExit) as info:
        common.run_main(lambda: lsdc.main(flags))
    err = capsys.readouterr().err
    assert info.value.code == 2 and message.format(tmp=tmp_path) in err and one_line_error(err), err
    assert not os.path.exists(tmp_path / "run")  # no run directory left behind by a failed start


def test_rotnet_cache_name_follows_the_pretraining_recipe_and_the_data(tmp_path):
    train = common.load_dataset("synthetic", "train")
    path = lambda *flags, data=train: lsdc.rotnet_path(lsdc.parse_args([*BASE, *flags]), data)  # noqa: E731
    assert path() == path("--lr", "0.5", "--epochs", "3", "--labeling", "sne")  # LSD-C-stage flags
    for flags in (["--rotnet-milestones", "2"], ["--rotnet-lr", "0.05"], ["--rotnet-batch-size", "64"],
                  ["--crop-padding", "2"], ["--no-flip"], ["--width", "16"], ["--seed", "1"]):
        assert path(*flags) != path(), flags
    # the same dataset name on other images (another image folder, another seed of the generator)
    assert path(data=common.load_dataset("synthetic", "train", seed=1)) != path()
    relabelled = common.TensorImages("synthetic", train.images, train.labels.flip(0), 10,
                                     train.mean, train.std)
    assert path(data=relabelled) != path()


def test_zero_rotnet_epochs_keeps_the_random_initialisation(tmp_path):
    flags = [*BASE, "--rotnet-epochs", "0", "--rotnet-milestones", "--rotnet-only",
             "--rotnet-dir", str(tmp_path / "rotnet"), "--out-dir", str(tmp_path / "run")]
    lsdc.main(flags)
    saved = torch.load(read_json(tmp_path / "run" / "final.json")["rotnet_checkpoint"], weights_only=True)
    common.seed_everything(0)  # the seed lsdc.main starts from, before it builds the backbone
    fresh = common.build_backbone("resnet18", 3, shortcut="pad",
                                  width=lsdc.PAPER_DEFAULTS["synthetic"]["width"])
    assert saved.keys() == fresh.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in fresh.state_dict().items())
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no epoch was trained


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """A short run (RotNet 1 epoch, LSD-C 2 on the test split) for the diagnostic scripts of benchmarks/."""
    tmp = tmp_path_factory.mktemp("lsdc")
    result = run_script("lsdc.py", [*BASE, "--split", "test", "--width", "4", "--rotnet-epochs", "1",
                                    "--rotnet-milestones", "--rotnet-batch-size", "100", "--epochs", "2",
                                    "--out-dir", tmp / "run", "--rotnet-dir", tmp / "rotnet"], tmp)
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp


@pytest.mark.xdist_group("lsdc-quick-run")
def test_pair_quality_script_reads_the_links_of_rotnet_and_of_a_run(quick_run):
    """benchmarks/lsdc_pair_quality.py: RotNet links are more precise than chance and mostly survive
    bf16, and a finished run's links agree with what lsdc.py logged in its last epoch."""
    tmp = quick_run
    weights = next(p for p in os.listdir(tmp / "rotnet") if p.endswith(".pt"))
    outputs = []
    for flags in (["--rotnet", str(tmp / "rotnet" / weights), "--bf16-agreement", "--", *BASE, "--width", "4",
                   "--rotnet-epochs", "1", "--rotnet-milestones"], ["--run", str(tmp / "run")]):
        result = run_script(os.path.join("benchmarks", "lsdc_pair_quality.py"), flags, tmp, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    at_rotnet, finished = outputs
    assert 0.1 < at_rotnet["pair_precision"] <= 1 and 0 < at_rotnet["pair_recall"] <= 1
    assert 0.5 < at_rotnet["bf16_link_agreement"] <= 1 and "bf16_link_agreement" not in finished
    last = read_metrics(tmp / "run")[-1]
    for key in ("positive_pairs", "pair_precision", "pair_recall"):
        assert finished[key] == pytest.approx(last[key], abs=0.05), key


@pytest.mark.xdist_group("lsdc-quick-run")
def test_confidence_script_evaluates_the_run_as_lsdc_does(quick_run):
    """benchmarks/lsdc_confidence.py on a finished run: its share above 0.9 and median are those of
    the run's final evaluation, and sharper logits (scale > 1) can only raise the share."""
    tmp = quick_run
    result = run_script(os.path.join("benchmarks", "lsdc_confidence.py"), ["--run", str(tmp / "run")], tmp)
    assert result.returncode == 0, result.stderr[-2000:]
    report, final = json.loads(result.stdout.strip().splitlines()[-1]), read_json(tmp / "run" / "final.json")
    assert report["samples"] == 500 and report["epoch"] == 1
    assert report["share_above"]["0.9"] == pytest.approx(final["confident_share"], abs=1e-6)
    assert report["max_probability_quantiles"]["0.5"] == pytest.approx(final["median_confidence"], abs=1e-6)
    quantiles, shares = (list(report["max_probability_quantiles"].values()),
                         list(report["share_above"].values()))
    assert quantiles == sorted(quantiles) and shares == sorted(shares, reverse=True)
    scaled = report["share_above_0.9_logits_scaled"]
    assert scaled["0.9"] <= report["share_above"]["0.9"] <= scaled["1.1"] <= scaled["1.2"]


def test_reuters_format_with_an_mlp(tmp_path):
    """A small file in DEC's reutersidf10k.npy format: four separated groups of sparse tf-idf-like vectors."""
    g = np.random.default_rng(0)
    labels = np.arange(800) % 4
    topics = g.random((4, 300)) < 0.05
    data = (g.random((800, 300)) < 0.02) | (topics[labels] & (g.random((800, 300)) < 0.8))
    data = data / np.maximum(np.linalg.norm(data, axis=1, keepdims=True), 1e-6)
    np.save(tmp_path / "reutersidf10k.npy", {"data": data.astype(np.float32), "label": labels})
    result = run_script("lsdc.py", ["--dataset", "reuters10k", "--data-dir", str(tmp_path), "--device", "cpu",
                                    "--epochs", "8", "--batch-size", "128", "--rampup-length", "4",
                                    "--out-dir", str(tmp_path / "run")], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_json(tmp_path / "run" / "final.json")["acc"] > 0.8


@needs_data
def test_real_mnist_runs_through_the_one_channel_28_pixel_path(tmp_path):
    """lsdc.py --dataset mnist on the real files: 28 px grey images through the pad-shortcut ResNet
    (layer4 at 7 -> 4 pixels). A random width-8 network stands in for RotNet and k-means replaces the
    LSD-C stage on the test split, which keeps this short; the 10,000 assignments must carry MNIST's
    own test class sizes (as published with the dataset)."""
    raw = os.path.join(os.environ["DATA_DIR"], "MNIST", "raw")
    if not os.path.isdir(raw):
        pytest.skip(f"MNIST/raw is not in {os.environ['DATA_DIR']}")
    shutil.copytree(raw, tmp_path / "MNIST" / "raw")  # the decoded caches are written beside the copy
    torch.manual_seed(0)
    torch.save(common.build_backbone("resnet18", 1, shortcut="pad", width=8).state_dict(),
               tmp_path / "random.pt")
    result = run_script("lsdc.py", ["--dataset", "mnist", "--data-dir", str(tmp_path), "--device", "cpu",
                                    "--split", "test", "--width", "8", "--rotnet-checkpoint",
                                    str(tmp_path / "random.pt"), "--kmeans-baseline",
                                    "--out-dir", str(tmp_path / "run")], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    final = read_json(tmp_path / "run" / "final.json")
    class_sizes = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.array(final["confusion"]).sum(0).tolist() == class_sizes
    # above one-cluster-for-all, nothing more from random features
    assert final["acc"] > max(class_sizes) / 10000


def test_rotation_accuracy_with_an_evaluation_batch_smaller_than_four():
    """RotNet evaluates four rotations per image: an --eval-batch-size of 3 still takes one image a
    batch (it used to take 3 // 4 = 0 and fail), and scores every rotation of every image."""
    data = common.load_dataset("synthetic", "test")
    data.images, data.labels = data.images[:10], data.labels[:10]
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    args = lsdc.parse_args([*BASE, "--eval-batch-size", "3"])
    acc = lsdc.rotation_accuracy(net, data, common.to_float, args, torch.device("cpu"))
    with torch.no_grad():
        x, y = common.rotations(common.to_float(data.images))
        expected = (net(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(expected)
