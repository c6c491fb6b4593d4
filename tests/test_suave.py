"""Tests of suave.py's own pieces against direct formulas: Sinkhorn-Knopp (and across two processes),
the queue, the losses and their weighting, MixUp/CutMix targets, LARS, the schedules, the EMA update,
the official checkpoint's key mapping, and its flags. What every script promises is in
test_scripts.py (the synthetic demo, resume, torchrun)."""
import argparse
import math
import os

import numpy as np
import pytest
import torch
import torchvision

import common
import suave
from conftest import one_line_error, spawn_gloo


# ------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# ------------------------------------------------------------------------------------------------
def sinkhorn_float64(scores, epsilon, iterations):
    """SwAV's Algorithm (App. A.1) written on P (N samples x K prototypes), in float64: P = exp(S / eps)
    / sum; each iteration makes every prototype's column sum 1/K, then every sample's row sum 1/N;
    returned times N, so each sample's row is a distribution."""
    p = np.exp(scores.astype(np.float64) / epsilon)
    p /= p.sum()
    n, k = p.shape
    for _ in range(iterations):
        p /= p.sum(0, keepdims=True) * k
        p /= p.sum(1, keepdims=True) * n
    return p * n


def test_sinkhorn_equals_a_float64_reference():
    torch.manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(24, 8), dim=1) @ torch.nn.functional.normalize(
        torch.randn(8, 8), dim=1).T  # cosines, as the prototype scores are
    q = suave.sinkhorn(scores, 0.05, 3)
    expected = sinkhorn_float64(scores.numpy(), 0.05, 3)
    assert q.dtype == torch.float32 and q.shape == (24, 8)
    np.testing.assert_allclose(q.numpy(), expected, rtol=1e-4, atol=1e-7)


def test_sinkhorn_marginals():
    """Before the final scaling by N, every sample's mass is 1/N exactly (the last step) and every
    prototype's 1/K once the iterations have converged."""
    torch.manual_seed(1)
    scores = torch.randn(30, 6) * 0.3
    q = suave.sinkhorn(scores, 0.5, 3) / 30
    torch.testing.assert_close(q.sum(1), torch.full((30,), 1 / 30))
    assert (q.sum(0) - 1 / 6).abs().max() < 0.2 / 6  # close after 3 iterations
    converged = suave.sinkhorn(scores, 0.5, 200) / 30
    torch.testing.assert_close(converged.sum(0), torch.full((6,), 1 / 6), atol=1e-6, rtol=0)
    torch.testing.assert_close(converged.sum(1), torch.full((30,), 1 / 30), atol=1e-6, rtol=0)


def _sinkhorn_worker(rank, world, port, scores, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    common.init_distributed("cpu")
    half = len(scores) // world
    queue.put((rank, suave.sinkhorn(scores[rank * half:(rank + 1) * half], 0.05, 3)))
    torch.distributed.destroy_process_group()


def test_sinkhorn_on_two_gloo_processes_equals_one_process_on_the_joint_batch():
    torch.manual_seed(2)
    scores = torch.randn(16, 5) * 0.2
    parts = dict(spawn_gloo(_sinkhorn_worker, (scores,)))
    torch.testing.assert_close(torch.cat([parts[0], parts[1]]), suave.sinkhorn(scores, 0.05, 3))


# ------------------------------------------------------------------------------------------------
# The queue
# ------------------------------------------------------------------------------------------------
def test_queue_keeps_the_newest_rows_first():
    queue = torch.zeros(6, 2)
    for value in (1.0, 2.0, 3.0, 4.0):
        suave.push_queue(queue, torch.full((2, 2), value))
    assert queue[:, 0].tolist() == [4, 4, 3, 3, 2, 2]


def test_targets_use_the_queue_only_once_it_is_full():
    torch.manual_seed(3)
    args = argparse.Namespace(epsilon=0.05, sinkhorn_iterations=3)
    prototypes = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    queue, progress = torch.zeros(2, 8, 4), {"queued": 0}
    batches = []
    for step in range(5):  # 4 rows a step: full after two steps
        z = [torch.nn.functional.normalize(torch.randn(4, 4), dim=1) for _ in range(2)]
        scores = [za @ prototypes.T for za in z]
        before = queue.clone()
        q = suave.targets(scores, z, prototypes, queue, progress, args)
        full = step >= 2
        for a in range(2):
            rows = torch.cat([before[a] @ prototypes.T, scores[a]]) if full else scores[a]
            expected = sinkhorn_float64(rows.numpy(), 0.05, 3)[-4:]
            np.testing.assert_allclose(q[a].numpy(), expected, rtol=1e-4, atol=1e-7)
            assert torch.equal(queue[a, :4], z[a]) and torch.equal(queue[a, 4:], before[a, :4])
        batches.append(z)
    assert progress["queued"] == 20
    assert torch.equal(queue[0], torch.cat([batches[4][0], batches[3][0]]))  # newest first


# ------------------------------------------------------------------------------------------------
# Losses, mixing and their weighting
# ------------------------------------------------------------------------------------------------
def test_swapped_prediction_loss_against_a_double_loop():
    torch.manual_seed(4)
    q = [torch.softmax(torch.randn(6, 5), 1) for _ in range(2)]
    views = [torch.randn(6, 5) for _ in range(4)]
    total = 0.0
    for a in range(2):
        for v in range(4):
            if v != a:
                for b in range(6):
                    logp = torch.log_softmax(views[v][b].double() / 0.1, 0)
                    total -= (q[a][b].double() * logp).sum().item() / (6 * 3 * 2)
    assert suave.swapped_prediction_loss(q, views, 0.1).item() == pytest.approx(total, rel=1e-5)


def test_mixed_targets_follow_the_reversed_partner():
    q0, q1 = torch.eye(3), torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    mixed = suave.mixed_targets(q0, q1, 0.3)
    for b in range(3):  # mixed image b = 0.3 x0[b] + 0.7 x1[2 - b]
        torch.testing.assert_close(mixed[b], 0.3 * q0[b] + 0.7 * q1[2 - b])


@pytest.mark.parametrize("seed", range(6))
def test_mix_pair_lambda_is_the_share_of_the_first_batch(seed):
    """x0 all 0, x1 all 1: every mixed pixel holds 1 - lam of x1 (MixUp everywhere, CutMix in the box),
    so the image mean is 1 - lam; the partner of image b is x1[B - 1 - b]."""
    np.random.seed(seed)
    x0 = torch.zeros(4, 1, 8, 8)
    x1 = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 8, 8) + 1
    mixed, lam = suave.mix_pair(x0, x1)
    for b in range(4):
        share = mixed[b].sum().item() / (64 * (4 - b))  # the partner's value is 4 - b
        assert share == pytest.approx(1 - lam, abs=1e-6)


def test_loss_weights_are_shares_of_the_samples():
    # CIFAR-100 recipe: 128 unlabelled x 6 crops, 100 labelled + 100 mixed, 3 mixed views (official code)
    w_u, w_l, w_m = suave.loss_weights(128, 6, 200, 3)
    assert (w_u, w_l, w_m) == pytest.approx((768 / 971, 200 / 971, 3 / 971))
    assert suave.loss_weights(64, 2, 0, 0) == (1.0, 0.0, 0.0)  # SwAV


# ------------------------------------------------------------------------------------------------
# LARS, schedules, EMA
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clip", [False, True])
def test_lars_against_its_update_formula(clip):
    torch.manual_seed(5)
    w = torch.nn.Parameter(torch.randn(3, 4))
    bias = torch.nn.Parameter(torch.randn(3))
    lr, wd, m, eta = 0.5, 0.01, 0.9, 0.02
    optimizer = suave.LARS([w, bias], lr, wd, m, eta, exclude_1d=True, clip=clip)
    w_ref, b_ref = w.detach().double().clone(), bias.detach().double().clone()
    mu_w, mu_b = torch.zeros_like(w_ref), torch.zeros_like(b_ref)
    for _ in range(3):
        gw, gb = torch.randn(3, 4), torch.randn(3)
        w.grad, bias.grad = gw.clone(), gb.clone()
        optimizer.step()
        d = gw.double() + wd * w_ref
        trust = eta * w_ref.norm() / d.norm()
        d = d * (min(trust / lr, 1.0) if clip else trust)  # solo-learn's clip_lr: lr x factor <= lr
        mu_w = m * mu_w + d
        w_ref = w_ref - lr * mu_w
        mu_b = m * mu_b + gb.double()  # excluded: neither decayed nor adapted
        b_ref = b_ref - lr * mu_b
    torch.testing.assert_close(w.detach().double(), w_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias.detach().double(), b_ref, rtol=1e-5, atol=1e-6)


def test_lars_adapts_every_parameter_by_default_and_skips_zero_norms():
    bias = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5
    zero = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = suave.LARS([bias, zero], lr=1.0, weight_decay=0.0, momentum=0.9, eta=0.1)
    bias.grad, zero.grad = torch.tensor([0.0, 2.0]), torch.ones(2, 2)
    optimizer.step()
    # bias: d = g * 0.1 * 5 / 2; zero weight: the trust ratio is not applied, d = g
    torch.testing.assert_close(bias.detach(), torch.tensor([3.0, 4.0 - 0.5]))
    torch.testing.assert_close(zero.detach(), -torch.ones(2, 2))
    bias.grad = torch.zeros(2)  # a zero gradient: d = 0 (no division by zero), momentum carries on
    optimizer.step()
    torch.testing.assert_close(bias.detach(), torch.tensor([3.0, 3.5 - 0.45]))


def test_learning_rate_warms_up_linearly_then_follows_a_cosine():
    args = argparse.Namespace(lr=2.0, final_lr=0.1, warmup_epochs=2, epochs=10)
    lrs = [suave.learning_rate(s, 5, args) for s in range(50)]
    assert lrs[:10] == pytest.approx(list(np.linspace(0, 2.0, 10)))  # official: np.linspace(0, lr, W)
    assert lrs[10] == pytest.approx(2.0)
    assert lrs[30] == pytest.approx(0.1 + 0.5 * 1.9 * (1 + math.cos(math.pi * 20 / 40)))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_ema_momentum_and_update():
    assert suave.ema_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert suave.ema_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert suave.ema_momentum(100, 100, 0.99) == pytest.approx(1.0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * e.detach() + 0.1 * p.detach() for e, p in zip(ema.parameters(), model.parameters())]
    suave.ema_update(ema, model, 0.9)
    for e, x in zip(ema.parameters(), expected):
        torch.testing.assert_close(e.detach(), x)


def test_prototypes_are_renormalised():
    net = suave.SuaveNet(common.build_backbone("resnet18", width=2), 8, 4, 5)
    with torch.no_grad():
        net.prototypes.weight.mul_(3.0)
    suave.normalize_prototypes(net)
    torch.testing.assert_close(net.prototypes.weight.norm(dim=1), torch.ones(5))


def test_multicrop_forward_equals_one_pass_per_resolution():
    torch.manual_seed(6)
    net = suave.SuaveNet(common.build_backbone("resnet18", width=2), 8, 4, 5).eval()
    big, small = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 8, 8)
    z, scores = net([big, big.flip(0), small])
    assert z.shape == (9, 4) and scores.shape == (9, 5)
    torch.testing.assert_close(scores[:3], net(big), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores[6:], net(small), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(9))


# ------------------------------------------------------------------------------------------------
# Loading weights
# ------------------------------------------------------------------------------------------------
def test_official_swav_checkpoint_maps_onto_torchvision_resnet50(tmp_path):
    """A state dict in the official layout (DDP's module. prefix, projection_head, prototypes), made
    from a torchvision ResNet-50 with known weights, loads into the backbone; head and prototypes
    are not taken from it."""
    torch.manual_seed(7)
    source = torchvision.models.resnet50()
    official = {f"module.{k}": v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    official.update({"module.projection_head.0.weight": torch.randn(2048, 2048),
                     "module.prototypes.weight": torch.randn(3000, 128)})
    mapped = suave.map_official_swav({"state_dict": official})
    assert "prototypes.weight" not in mapped and not any(k.startswith("projection_head") for k in mapped)
    assert mapped["layer4.2.bn3.running_var"] is official["module.layer4.2.bn3.running_var"]
    torch.save({"state_dict": official, "epoch": 800}, tmp_path / "swav_800ep_pretrain.pth.tar")
    net = suave.SuaveNet(common.build_backbone("resnet50-imagenet"), 16, 8, 10)
    prototypes = net.prototypes.weight.clone()
    suave.load_weights(net, str(tmp_path / "swav_800ep_pretrain.pth.tar"), finetune=False)
    for k, v in source.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(net.backbone.state_dict()[k], v), k
    assert torch.equal(net.prototypes.weight, prototypes)


def test_a_run_of_this_file_gives_its_backbone_or_backbone_and_projection(tmp_path):
    torch.manual_seed(8)
    saved = suave.SuaveNet(common.build_backbone("resnet18", width=2), 8, 4, 30)
    (tmp_path / "run").mkdir()
    torch.save({"stage": "train", "epoch": 0, "objects": {"model": saved.state_dict()}, "rng": []},
               tmp_path / "run" / "checkpoint.pt")
    for finetune in (False, True):
        net = suave.SuaveNet(common.build_backbone("resnet18", width=2), 8, 4, 10)
        projection = net.projection[0].weight.clone()
        suave.load_weights(net, str(tmp_path / "run"), finetune)
        assert torch.equal(net.backbone.conv1.weight, saved.backbone.conv1.weight)
        assert torch.equal(net.projection[0].weight, saved.projection[0].weight if finetune else projection)
    wider = suave.SuaveNet(common.build_backbone("resnet18", width=4), 8, 4, 10)
    with pytest.raises(common.Abort, match="do not fit"):
        suave.load_weights(wider, str(tmp_path / "run"), False)
    for saved, named in (({"state_dict": None}, "AttributeError"), ({"objects": {}}, "KeyError"),
                         ({"conv1.weight": "not a tensor"}, "do not fit")):  # foreign files: one line each
        torch.save(saved, tmp_path / "other.pth")
        with pytest.raises(common.Abort, match=named):
            suave.load_weights(wider, str(tmp_path / "other.pth"), False)


# ------------------------------------------------------------------------------------------------
# Flags and bad input
# ------------------------------------------------------------------------------------------------
def test_recipes_of_the_defaults():
    c100 = suave.parse_args(["--dataset", "cifar100"])
    assert (c100.lr, c100.weight_decay, c100.epsilon, c100.ema, c100.batch_size, c100.labelled_batch_size,
            c100.local_crops, c100.mix_unlabelled, c100.labels_per_class) == (
        2.8, 3e-6, 0.086, 0.99, 128, 100, 4, "all", 25)
    swav = suave.parse_args(["--dataset", "cifar10", "--labels-per-class", "0", "--batch-size", "512"])
    assert (swav.num_clusters, swav.queue_start, swav.lars_eta, swav.lars_exclude, swav.lars_clip, swav.lr,
            swav.local_crops, swav.mix_labelled) == (3000, 50, 0.02, True, True, 0.6 * 2, 0, False)
    assert not c100.lars_clip  # the official Suave LARS has no clipping
    imagenet = suave.parse_args(["--dataset", "imagefolder", "--label-file", "1percent.txt"])
    assert imagenet.label_fraction is None and imagenet.labels_per_class is None
    per_class = suave.parse_args(["--dataset", "imagefolder", "--labels-per-class", "13"])  # not with 10 %
    assert (per_class.labels_per_class, per_class.label_fraction) == (13, None)
    assert suave.parse_args(["--dataset", "imagefolder"]).label_fraction == 0.1
    zero = suave.parse_args(["--dataset", "cifar10", "--labels-per-class", "00", "--batch-size", "512"])
    assert vars(zero) == vars(swav)  # 00 is 0: the same recipe
    assert (imagenet.lr, imagenet.local_crops, imagenet.local_size, imagenet.mix_unlabelled) == (
        0.4, 8, 96, "globals")
    tune = suave.parse_args(["--dataset", "imagefolder", "--finetune-from", "RUN"])
    assert (tune.epochs, tune.lr, tune.final_lr, tune.warmup_epochs, tune.local_crops) == (
        5, 0.02, 2e-4, 0, 0)


@pytest.mark.parametrize("flags,named", [
    (["--global-crops", "1", "--local-crops", "0"], "another crop"),
    (["--global-crops", "3"], "--global-crops 3"),
    (["--mix-unlabelled", "all", "--local-crops", "3"], "--local-crops 3"),
    (["--labels-per-class", "0", "--supervised-only"], "--supervised-only"),
    (["--label-fraction", "0.1", "--labels-per-class", "4"], "one of"),
    (["--global-scale", "0.8", "0.2"], "--global-scale"),
    (["--global-scale", "0", "1"], "--global-scale"),
    (["--supervised-only", "--no-mix-labelled", "--labelled-batch-size", "1"], "1 labelled image"),
])
def test_bad_combinations_exit_2_with_one_line(flags, named, capsys):
    with pytest.raises(SystemExit) as info:
        suave.parse_args(["--dataset", "synthetic", *flags])
    err = capsys.readouterr().err
    assert info.value.code == 2 and one_line_error(err) and named in err, err


def test_more_labels_per_class_than_a_class_holds_stops_before_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(common.Abort, match="--labels-per-class 201 is larger than class 0") as info:
        suave.main(["--dataset", "synthetic", "--device", "cpu", "--labels-per-class", "201"])
    assert info.value.exit_code == 2 and "\n" not in str(info.value) and not os.listdir(tmp_path)


def test_a_label_file_naming_missing_images_stops_before_the_run(tmp_path, monkeypatch):
    data = tmp_path / "images"
    for c in ("cat", "dog"):
        (data / c).mkdir(parents=True)
        for i in range(2):
            torchvision.io.write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(data / c / f"{c}{i}.png"))
    (tmp_path / "labels.txt").write_text("cat0.png\ndog7.png\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(common.Abort, match="dog7.png") as info:
        suave.main(["--dataset", "imagefolder", "--data-dir", str(data), "--device", "cpu",
                    "--label-file", "labels.txt", "--batch-size", "2", "--labelled-batch-size", "1"])
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["images", "labels.txt"]
