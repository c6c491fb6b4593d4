"""Tests of lsdc.py: pairwise labels, target mixing, loss, ramp-up, and end-to-end runs on synthetic data."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import lsdc
import scripts



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
    mix = {"weights": torch.tensor([0.5, 0.3, 0.2]), "perms": torch.stack([torch.randperm(8) for _ in range(3)])}
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
        if any(w > 0 and not torch.equal(perm, torch.arange(n)) for w, perm in zip(mix["weights"], mix["perms"])):
            # the released code's variant permutes the clean axis: it does not match the content
            assert not torch.allclose(lsdc.mixed_pair_targets(s, mix, "official-code"), onehot @ content.T, atol=1e-5)


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
    _, prepare = lsdc.make_augment(args, everything, torch.device("cpu"))
    sliced = lsdc.evaluate(model, everything, test, prepare, args)
    args.split = "train"
    separate = lsdc.evaluate(model, train, test, prepare, args)
    for key in ("acc", "nmi", "ari", "confident_acc", "confident_share", "median_confidence", "smallest_cluster"):
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
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone")}
    assert trainable == {"layer4"} and all(p.requires_grad for p in model.head.parameters())
    logits, z = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert len(logits) == 2 and logits[0].shape == (4, 10) and z.shape == (4, 64)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def run_script(args, cwd, timeout=600):
    return scripts.run_script("lsdc.py", args, cwd, timeout)


@pytest.mark.parametrize("flags,message", [
    (["--dataset", "cifar11"], "unknown dataset 'cifar11'"),
    (["--dataset", "stl10", "--labeling", "cosine"], "--labeling cosine needs --cosine-threshold"),
    (["--dataset", "mnist", "--labeling", "sne"], "--labeling sne needs --sne-threshold and --sne-temperature"),
    (["--dataset", "cifar10-lt"], "--labeling knn needs --knn-k: Table 1 gives no value for cifar10-lt"),
    (["--dataset", "cifar10", "--knn-k", "300"], "--knn-k 300 is larger than the batch"),
    (["--dataset", "reuters10k", "--mix", "ricap"], "reuters10k is vector data"),
    (["--dataset", "cifar10", "--frozen-blocks", "7"], "invalid choice"),
    (["--dataset", "synthetic", "--epochs", "0"], "--epochs must be at least 1"),
    (["--dataset", "synthetic", "--rotnet-epochs", "-1"], "--rotnet-epochs must be 0 (no pre-training) or more"),
    (["--kmeans-baseline", "--rotnet-only"], "exclude each other"),
])
def test_bad_flags_exit_2_with_a_message(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        lsdc.parse_args(flags)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_defaults_follow_table_1():
    args = lsdc.parse_args(["--dataset", "cifar100-20"])
    assert (args.epochs, args.milestones, args.rampup_weight, args.rampup_length) == (200, [170], 25.0, 150)
    assert (args.labeling, args.sne_threshold, args.sne_temperature, args.knn_k) == ("sne", 0.01, 0.5, 10)
    assert (args.batch_size, args.weight_decay, args.lr_gamma, args.frozen_blocks) == (256, 5e-4, 0.1, 3)
    assert lsdc.parse_args(["--dataset", "cifar10", "--mix", "mixup"]).weight_decay == 1e-4
    assert lsdc.parse_args(["--dataset", "reuters10k"]).optimizer == "adam"


def test_command_line_errors_are_one_line_without_traceback(tmp_path):
    result = run_script(["--dataset", "cifar11"], tmp_path, timeout=120)
    assert result.returncode == 2 and "unknown dataset 'cifar11'" in result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "runs")
    result = run_script(["--help"], tmp_path, timeout=120)
    assert result.returncode == 0 and "Table 1" in result.stdout and "--labeling" in result.stdout


@pytest.mark.parametrize("flags,message", [
    (["--dataset", "reuters10k", "--reuters-file", "{tmp}/nope.npy"], "nope.npy not found"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}/empty", "--device", "cpu"], "cifar10 (train split) not found"),
    (["--dataset", "synthetic", "--batch-size", "4000", "--device", "cpu"], "larger than synthetic (2500 samples)"),
    (["--resume", "{tmp}/nothing"], "cannot read args.json"),
])
def test_runtime_user_errors_exit_2_and_create_nothing(flags, message, tmp_path, capsys):
    flags = [f.format(tmp=tmp_path) for f in flags]
    if "--resume" not in flags:
        flags += ["--out-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as info:
        common.run_main(lambda: lsdc.main(flags))
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")  # no run directory left behind by a failed start


# ------------------------------------------------------------------------------------------------
# End to end on synthetic data, on the CPU
# ------------------------------------------------------------------------------------------------
BASE = ["--dataset", "synthetic", "--device", "cpu", "--seed", "0"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The synthetic row as `python lsdc.py --dataset synthetic --device cpu` runs it: RotNet, then LSD-C."""
    tmp = tmp_path_factory.mktemp("lsdc")
    result = run_script([*BASE, "--out-dir", str(tmp / "run"), "--rotnet-dir", str(tmp / "rotnet")], tmp)
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp, result


read_json, read_metrics = scripts.read_json, scripts.read_metrics


def test_end_to_end_learns_clusters(full_run):
    tmp, result = full_run
    final = read_json(tmp / "run" / "final.json")
    metrics = read_metrics(tmp / "run")
    rotnet = [m for m in metrics if m["stage"] == "rotnet"]
    clustering = [m for m in metrics if m["stage"] == "lsdc"]
    defaults = lsdc.PAPER_DEFAULTS["synthetic"]
    assert len(rotnet) == defaults["rotnet_epochs"] and len(clustering) == defaults["epochs"]
    assert rotnet[-1]["test_rotation_acc"] > 0.5  # rotation prediction learned (chance 0.25)
    assert final["acc"] > 0.3 and final["nmi"] > 0.3  # 10 balanced clusters: chance is about 0.1 and 0
    assert final["test_acc"] > 0.3
    assert np.array(final["confusion"]).sum() == 2500
    assert clustering[-1]["acc"] > clustering[0]["acc"] - 0.05
    # the kNN links are at least twice as precise as chance (10 balanced classes: 1 pair in 10)
    assert all(0.2 < m["pair_precision"] <= 1 and 0 < m["pair_recall"] <= 1 for m in clustering)
    assert "final (all): acc" in result.stdout
    assert os.path.isfile(cached_rotnet(tmp))


def cached_rotnet(tmp):
    return lsdc.rotnet_path(lsdc.parse_args([*BASE, "--rotnet-dir", str(tmp / "rotnet")]))


def test_rotnet_cache_name_follows_the_pretraining_recipe():
    path = lambda *flags: lsdc.rotnet_path(lsdc.parse_args([*BASE, *flags]))
    assert path() == path("--lr", "0.5", "--epochs", "3", "--labeling", "sne")  # LSD-C-stage flags
    for flags in (["--rotnet-milestones", "2"], ["--rotnet-lr", "0.05"], ["--rotnet-batch-size", "64"],
                  ["--crop-padding", "2"], ["--no-flip"], ["--width", "16"], ["--seed", "1"]):
        assert path(*flags) != path(), flags


def test_zero_rotnet_epochs_keeps_the_random_initialisation(tmp_path):
    flags = [*BASE, "--rotnet-epochs", "0", "--rotnet-milestones", "--rotnet-only",
             "--rotnet-dir", str(tmp_path / "rotnet"), "--out-dir", str(tmp_path / "run")]
    lsdc.main(flags)
    saved = torch.load(lsdc.rotnet_path(lsdc.parse_args(flags)), weights_only=True)
    common.seed_everything(0)  # the seed lsdc.main starts from, before it builds the backbone
    fresh = common.build_backbone("resnet18", 3, shortcut="pad", width=lsdc.PAPER_DEFAULTS["synthetic"]["width"])
    assert saved.keys() == fresh.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in fresh.state_dict().items())
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no epoch was trained


def test_kmeans_baseline_on_rotnet_features_is_below_lsdc(full_run):
    tmp, _ = full_run
    result = run_script([*BASE, "--out-dir", str(tmp / "km"), "--rotnet-dir", str(tmp / "rotnet"), "--kmeans-baseline"], tmp)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reusing RotNet weights" in result.stdout  # pre-training is not repeated
    baseline, lsdc_final = read_json(tmp / "km" / "final.json"), read_json(tmp / "run" / "final.json")
    assert 0.12 < baseline["acc"] < lsdc_final["acc"]


def test_pair_quality_script_reads_the_links_of_rotnet_and_of_a_run(full_run):
    """benchmarks/lsdc_pair_quality.py: RotNet links are twice as precise as chance and mostly survive
    bf16, and a finished run's links agree with what lsdc.py logged in its last epoch (the learning
    rate is 0.01 there: the weights barely move)."""
    tmp, _ = full_run
    outputs = []
    for weights in (["--rotnet", cached_rotnet(tmp), "--bf16-agreement", "--", *BASE], ["--run", str(tmp / "run")]):
        result = scripts.run_script(os.path.join("benchmarks", "lsdc_pair_quality.py"), weights, tmp, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    rotnet, finished = outputs
    assert 0.2 < rotnet["pair_precision"] <= 1 and 0 < rotnet["pair_recall"] <= 1
    # bf16 moves some links; links of two different batches would share about one in twenty
    assert 0.5 < rotnet["bf16_link_agreement"] <= 1 and "bf16_link_agreement" not in finished
    last = read_metrics(tmp / "run")[-1]
    for key in ("positive_pairs", "pair_precision", "pair_recall"):
        assert finished[key] == pytest.approx(last[key], abs=0.03), key


def test_confidence_script_evaluates_the_run_as_lsdc_does(full_run):
    """benchmarks/lsdc_confidence.py on a finished run: its share above 0.9 and median are those of
    the run's final evaluation, and sharper logits (scale > 1) can only raise the share."""
    tmp, _ = full_run
    result = scripts.run_script(os.path.join("benchmarks", "lsdc_confidence.py"), ["--run", str(tmp / "run")], tmp, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report, final = json.loads(result.stdout.strip().splitlines()[-1]), read_json(tmp / "run" / "final.json")
    assert report["samples"] == 2500 and report["epoch"] == lsdc.PAPER_DEFAULTS["synthetic"]["epochs"] - 1
    assert report["share_above"]["0.9"] == pytest.approx(final["confident_share"], abs=1e-6)
    assert report["max_probability_quantiles"]["0.5"] == pytest.approx(final["median_confidence"], abs=1e-6)
    quantiles, shares = list(report["max_probability_quantiles"].values()), list(report["share_above"].values())
    assert quantiles == sorted(quantiles) and shares == sorted(shares, reverse=True)
    scaled = report["share_above_0.9_logits_scaled"]
    assert scaled["0.9"] <= report["share_above"]["0.9"] <= scaled["1.1"] <= scaled["1.2"]


def test_reproduction_script_resumes_across_sessions_and_summarises_rotnet_only(tmp_path):
    """benchmarks/reproduce_lsdc.py: a session cut by --time-limit exits 3, the same command again
    finishes the run, and a --rotnet-only run's summary gives the rotation accuracy and the weights."""
    script = os.path.join("benchmarks", "reproduce_lsdc.py")
    flags = ["--run-dir", str(tmp_path / "run"), "--", *BASE, "--rotnet-only", "--rotnet-epochs", "1",
             "--rotnet-milestones", "--rotnet-dir", str(tmp_path / "rotnet")]
    cut = scripts.run_script(script, ["--time-limit", "3", *flags], tmp_path, timeout=300)
    assert cut.returncode == 3 and "run the same command again" in cut.stdout
    done = scripts.run_script(script, flags, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = read_json(tmp_path / "run" / "reproduction.json")
    assert summary["sessions"] == 2 and summary["stages"]["rotnet"]["epochs"] == 1
    assert summary["rotnet_test_rotation_acc"] == read_metrics(tmp_path / "run")[-1]["test_rotation_acc"]
    assert os.path.isfile(summary["rotnet_checkpoint"])
    assert "| RotNet | synthetic | test rotation accuracy" in done.stdout


def test_resume_after_kills_equals_uninterrupted_run(full_run):
    tmp, _ = full_run
    run_dir = str(tmp / "killed")
    args = [*BASE, "--out-dir", run_dir, "--rotnet-dir", str(tmp / "rotnet-killed")]
    scripts.run_until("lsdc.py", args, tmp, run_dir, "rotnet", 1)  # killed during RotNet pre-training
    scripts.run_until("lsdc.py", ["--resume", run_dir], tmp, run_dir, "lsdc", 4)  # resumed, killed while clustering
    assert not os.path.exists(os.path.join(run_dir, "final.json"))
    result = run_script(["--resume", run_dir], tmp)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed, uninterrupted = read_json(os.path.join(run_dir, "final.json")), read_json(tmp / "run" / "final.json")
    for key in ("acc", "nmi", "ari", "confusion", "test_acc", "confident_acc", "confident_share", "median_confidence"):
        assert resumed[key] == uninterrupted[key], key
    lines = read_metrics(run_dir)
    assert [(m["stage"], m["epoch"]) for m in lines] == [(m["stage"], m["epoch"]) for m in read_metrics(tmp / "run")]


def test_diverging_run_stops_with_a_message_and_saves_nothing_bad(full_run):
    """An absurd learning rate makes the loss NaN in the first epoch: the run stops with exit code 1
    and a one-line message, before any checkpoint or result is written (that the last good
    checkpoint survives a later divergence is tested in test_common)."""
    tmp, _ = full_run
    run_dir = tmp / "nan"
    rotnet = cached_rotnet(tmp)
    result = run_script([*BASE, "--out-dir", str(run_dir), "--rotnet-checkpoint", rotnet, "--lr", "1e12",
                         "--epochs", "3"], tmp)
    assert result.returncode == 1 and "training diverged" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(run_dir / "final.json") and not os.path.exists(run_dir / "checkpoint.pt")


def test_two_processes_with_torchrun(full_run):
    """torchrun with two CPU processes (gloo): one epoch on the cached RotNet, each process with its own
    batch of 64 (pairs stay inside a process's batch); rank 0 alone writes the run."""
    tmp, _ = full_run
    run_dir = tmp / "ddp"
    rotnet = cached_rotnet(tmp)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(scripts.ROOT, "lsdc.py"), *BASE, "--out-dir", str(run_dir),
                             "--rotnet-checkpoint", rotnet, "--epochs", "1", "--batch-size", "64"],
                            cwd=tmp, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("final (all)") == 1
    final, metrics = read_json(run_dir / "final.json"), read_metrics(run_dir)
    assert len(metrics) == 1 and np.array(final["confusion"]).sum() == 2500
    # kNN pairs (k = 10) inside a batch of 64: each row links at least 9 of 64 samples (about 0.07 in 128)
    assert metrics[0]["positive_pairs"] >= 9 / 64
    assert len(torch.load(run_dir / "checkpoint.pt", weights_only=False)["rng"]) == 2  # one state per rank


def test_reuters_format_with_an_mlp(tmp_path):
    """A small file in DEC's reutersidf10k.npy format: four separated groups of sparse tf-idf-like vectors."""
    g = np.random.default_rng(0)
    labels = np.arange(800) % 4
    topics = g.random((4, 300)) < 0.05
    data = (g.random((800, 300)) < 0.02) | (topics[labels] & (g.random((800, 300)) < 0.8))
    data = data / np.maximum(np.linalg.norm(data, axis=1, keepdims=True), 1e-6)
    np.save(tmp_path / "reutersidf10k.npy", {"data": data.astype(np.float32), "label": labels})
    result = run_script(["--dataset", "reuters10k", "--data-dir", str(tmp_path), "--device", "cpu",
                         "--epochs", "8", "--batch-size", "128", "--rampup-length", "4",
                         "--out-dir", str(tmp_path / "run")], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_json(tmp_path / "run" / "final.json")["acc"] > 0.8


@pytest.mark.skipif(not os.environ.get("DATA_DIR"), reason="DATA_DIR is not set: real datasets are not available")
def test_real_mnist_runs_through_the_one_channel_28_pixel_path(tmp_path):
    """lsdc.py --dataset mnist on the real files: 28 px grey images through the pad-shortcut ResNet
    (layer4 at 7 -> 4 pixels), train+test together. A random width-8 network stands in for RotNet and
    k-means replaces the LSD-C stage, which keeps this under a minute; the 70,000 assignments must
    carry MNIST's own class sizes (train + test, as published with the dataset)."""
    raw = os.path.join(os.environ["DATA_DIR"], "MNIST", "raw")
    if not os.path.isdir(raw):
        pytest.skip(f"MNIST/raw is not in {os.environ['DATA_DIR']}")
    shutil.copytree(raw, tmp_path / "MNIST" / "raw")  # torchvision unpacks beside the files it reads
    torch.manual_seed(0)
    torch.save(common.build_backbone("resnet18", 1, shortcut="pad", width=8).state_dict(), tmp_path / "random.pt")
    result = run_script(["--dataset", "mnist", "--data-dir", str(tmp_path), "--device", "cpu", "--width", "8",
                         "--rotnet-checkpoint", str(tmp_path / "random.pt"), "--kmeans-baseline",
                         "--out-dir", str(tmp_path / "run")], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    final = read_json(tmp_path / "run" / "final.json")
    class_sizes = [5923 + 980, 6742 + 1135, 5958 + 1032, 6131 + 1010, 5842 + 982,
                   5421 + 892, 5918 + 958, 6265 + 1028, 5851 + 974, 5949 + 1009]
    assert np.array(final["confusion"]).sum(0).tolist() == class_sizes
    assert final["acc"] > max(class_sizes) / 70000  # above one-cluster-for-all, nothing more from random features
