"""Tests of daino.py's own pieces against direct formulas: the DINO loss over view pairs, the centre
(and across two processes), the teacher temperature, momentum, learning-rate and weight-decay
schedules, the EMA update, LARS, the head, the official DINO checkpoint's key mapping, and its flags.
What every script promises is in test_scripts.py (the synthetic demo, resume, torchrun)."""
import argparse
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
import daino
from conftest import one_line_error, spawn_gloo


# ------------------------------------------------------------------------------------------------
# The DINO loss and the centre
# ------------------------------------------------------------------------------------------------
def test_dino_loss_against_a_direct_computation_over_view_pairs():
    """DINO Eq. 1 in float64 numpy: for every teacher crop a and every student crop v != a, the mean
    over images of -sum_k P_t log P_s, averaged over the 2 x 3 such pairs (no same-view pair)."""
    rng = np.random.default_rng(0)
    student = [rng.normal(size=(4, 6)) for _ in range(4)]  # 2 global + 2 local crops
    teacher = [rng.normal(size=(4, 6)) for _ in range(2)]
    centre = rng.normal(size=(1, 6)) * 0.1
    T_s, T_t = 0.1, 0.05

    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    terms = [-(softmax((teacher[a] - centre) / T_t) * np.log(softmax(student[v] / T_s))).sum(1).mean()
             for a in range(2) for v in range(4) if v != a]
    assert len(terms) == 6
    loss = daino.dino_loss([torch.tensor(s, dtype=torch.float32) for s in student],
                           [torch.tensor(t, dtype=torch.float32) for t in teacher],
                           torch.tensor(centre, dtype=torch.float32), T_s, T_t)
    assert loss.item() == pytest.approx(np.mean(terms), rel=1e-5)


def test_dino_loss_is_low_only_when_the_student_matches_the_teacher():
    """The same logits everywhere: the loss is the entropy of the sharpened teacher (low at T_t 0.04)
    when T_s = T_t; a student predicting another class pays far more."""
    t = torch.tensor([[5.0, 0.0, 0.0]])
    match = daino.dino_loss([t, t], [t, t], torch.zeros(1, 3), 0.04, 0.04)
    wrong = daino.dino_loss([t.flip(1), t.flip(1)], [t, t], torch.zeros(1, 3), 0.04, 0.04)
    assert match.item() < 1e-6 and wrong.item() > 100


def test_centre_is_an_ema_of_the_mean_teacher_output():
    teacher = [torch.tensor([[1.0, 3.0], [3.0, 1.0]]), torch.tensor([[0.0, 4.0], [4.0, 8.0]])]
    centre = torch.tensor([[10.0, -10.0]])
    daino.update_centre(centre, teacher, 0.9)
    torch.testing.assert_close(centre, torch.tensor([[0.9 * 10 + 0.1 * 2.0, -0.9 * 10 + 0.1 * 4.0]]))


def _centre_worker(rank, world, port, teacher, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    common.init_distributed("cpu")
    centre = torch.ones(1, teacher.shape[-1])
    half = teacher.shape[1] // world
    daino.update_centre(centre, list(teacher[:, rank * half:(rank + 1) * half]), 0.9)
    queue.put((rank, centre))
    torch.distributed.destroy_process_group()


def test_centre_on_two_gloo_processes_equals_one_process_on_the_joint_batch():
    torch.manual_seed(1)
    teacher = torch.randn(2, 8, 5)  # 2 global crops of 8 images, split 4 + 4 over the ranks
    expected = torch.ones(1, 5)
    daino.update_centre(expected, list(teacher), 0.9)
    for _, centre in spawn_gloo(_centre_worker, (teacher,)):
        torch.testing.assert_close(centre, expected)


def test_loss_weights_are_shares_of_the_samples():
    # CIFAR-100 recipe: 128 unlabelled x 6 crops, 100 labelled + 100 mixed (official code)
    assert daino.loss_weights(128, 6, 200) == pytest.approx((768 / 968, 200 / 968))
    assert daino.loss_weights(64, 2, 0) == (1.0, 0.0)  # DINO


# ------------------------------------------------------------------------------------------------
# Schedules, EMA, LARS, parameter groups
# ------------------------------------------------------------------------------------------------
def test_teacher_temperature_warms_up_linearly_per_epoch_then_stays():
    args = argparse.Namespace(teacher_start_temperature=0.04, teacher_temperature=0.07,
                              teacher_warmup_epochs=10)
    temps = [daino.teacher_temperature(e, args) for e in range(15)]
    assert temps[:10] == pytest.approx(list(np.linspace(0.04, 0.07, 10)))  # DINO: np.linspace(start, T, W)
    assert temps[10:] == [0.07] * 5
    args.teacher_warmup_epochs = 0  # solo-learn's DINO: no warm-up
    assert daino.teacher_temperature(0, args) == 0.07


def test_cosine_schedules_of_momentum_and_weight_decay_reach_their_ends():
    assert daino.cosine(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert daino.cosine(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    assert daino.cosine(100, 100, 0.99, 1.0) == pytest.approx(1.0)
    assert daino.cosine(0, 80, 0.04, 0.4) == pytest.approx(0.04)  # official ImageNet weight decay
    assert daino.cosine(80, 80, 0.04, 0.4) == pytest.approx(0.4)


def test_learning_rate_warms_up_linearly_then_follows_a_cosine():
    args = argparse.Namespace(lr=2.0, final_lr=1e-5, warmup_epochs=2, epochs=10)
    lrs = [daino.learning_rate(s, 5, args) for s in range(50)]
    assert lrs[:10] == pytest.approx(list(np.linspace(0, 2.0, 10)))  # DINO: np.linspace(0, lr, W)
    assert lrs[10] == pytest.approx(2.0)
    assert lrs[30] == pytest.approx(1e-5 + 0.5 * (2.0 - 1e-5) * (1 + math.cos(math.pi * 20 / 40)))
    assert lrs[-1] == pytest.approx(1e-5, abs=0.01)


def test_ema_update_moves_the_teacher_towards_the_student():
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    pairs = zip(teacher.parameters(), student.parameters())
    expected = [0.9 * t.detach() + 0.1 * s.detach() for t, s in pairs]
    daino.ema_update(teacher, student, 0.9)
    for t, x in zip(teacher.parameters(), expected):
        torch.testing.assert_close(t.detach(), x)


@pytest.mark.parametrize("clip", [False, True])
def test_lars_against_its_update_formula(clip):
    torch.manual_seed(5)
    w = torch.nn.Parameter(torch.randn(3, 4))
    bias = torch.nn.Parameter(torch.randn(3))
    lr, wd, m, eta = 0.5, 0.01, 0.9, 0.02
    optimizer = daino.LARS([w, bias], lr, wd, m, eta, exclude_1d=True, clip=clip)
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


def test_lars_clip_caps_the_adapted_learning_rate_at_lr():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    optimizer = daino.LARS([w], lr=0.01, weight_decay=0.0, momentum=0.0, eta=1.0, clip=True)
    w.grad = torch.tensor([[0.0, 1.0]])  # eta ||w|| / ||g|| = 5: far above lr, capped: step = lr g
    optimizer.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0 - 0.01]]))


@pytest.mark.parametrize("norm_last_layer", [False, True])
def test_parameter_groups_decay_weights_only(norm_last_layer):
    net = daino.DainoNet(common.build_backbone("resnet18", width=2), 8, 4, 5, norm_last_layer)
    args = argparse.Namespace(optimizer="adamw", lr=1e-3, weight_decay=0.04)
    decayed, plain = daino.make_optimizer(net, args).param_groups
    g = net.last_layer.parametrizations.weight.original0
    assert plain["weight_decay"] == 0.0 and all(p.ndim == 1 for p in plain["params"])
    ids = {name: {id(p) for p in group["params"]} for name, group in (("decayed", decayed), ("plain", plain))}
    assert id(net.mlp[0].bias) in ids["plain"] and id(net.backbone.bn1.weight) in ids["plain"]
    assert id(net.mlp[0].weight) in ids["decayed"] and decayed["weight_decay"] == 0.04
    assert (id(g) in ids["decayed"]) is (not norm_last_layer)  # DINO's norm_last_layer: g fixed at 1
    assert len(decayed["params"]) + len(plain["params"]) == sum(p.requires_grad for p in net.parameters())


# ------------------------------------------------------------------------------------------------
# The head
# ------------------------------------------------------------------------------------------------
def test_head_outputs_are_cosines_scaled_by_g():
    torch.manual_seed(3)
    net = daino.DainoNet(common.build_backbone("resnet18", width=2), 8, 4, 5, False).eval()
    x = torch.randn(6, 3, 16, 16)
    z = torch.nn.functional.normalize(net.mlp(net.backbone(x)), dim=1)
    v = net.last_layer.parametrizations.weight.original1
    torch.testing.assert_close(net(x), z @ torch.nn.functional.normalize(v, dim=1).T)  # g = 1 at start
    with torch.no_grad():
        net.last_layer.parametrizations.weight.original0.fill_(2.0)
    torch.testing.assert_close(net(x), 2 * z @ torch.nn.functional.normalize(v, dim=1).T)
    assert all(m.bias.abs().sum() == 0 for m in net.mlp if isinstance(m, torch.nn.Linear))


def test_multicrop_forward_equals_one_pass_per_resolution():
    torch.manual_seed(6)
    net = daino.DainoNet(common.build_backbone("resnet18", width=2), 8, 4, 5, False).eval()
    big, small = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 8, 8)
    out = net([big, big.flip(0), small])
    assert out.shape == (9, 5)
    torch.testing.assert_close(out[:3], net(big), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[6:], net(small), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Loading weights
# ------------------------------------------------------------------------------------------------
def official_dino_layout(vit):
    """A torchvision ViT's weights under the names of DINO's vision_transformer.py, written out by hand."""
    out = {"cls_token": vit.class_token, "pos_embed": vit.encoder.pos_embedding,
           "patch_embed.proj.weight": vit.conv_proj.weight, "patch_embed.proj.bias": vit.conv_proj.bias,
           "norm.weight": vit.encoder.ln.weight, "norm.bias": vit.encoder.ln.bias}
    for i, layer in enumerate(vit.encoder.layers):
        out.update({f"blocks.{i}.norm1.weight": layer.ln_1.weight, f"blocks.{i}.norm1.bias": layer.ln_1.bias,
                    f"blocks.{i}.attn.qkv.weight": layer.self_attention.in_proj_weight,
                    f"blocks.{i}.attn.qkv.bias": layer.self_attention.in_proj_bias,
                    f"blocks.{i}.attn.proj.weight": layer.self_attention.out_proj.weight,
                    f"blocks.{i}.attn.proj.bias": layer.self_attention.out_proj.bias,
                    f"blocks.{i}.norm2.weight": layer.ln_2.weight, f"blocks.{i}.norm2.bias": layer.ln_2.bias,
                    f"blocks.{i}.mlp.fc1.weight": layer.mlp[0].weight,
                    f"blocks.{i}.mlp.fc1.bias": layer.mlp[0].bias,
                    f"blocks.{i}.mlp.fc2.weight": layer.mlp[3].weight,
                    f"blocks.{i}.mlp.fc2.bias": layer.mlp[3].bias})
    return {k: v.detach().clone() for k, v in out.items()}


@pytest.mark.parametrize("layout", ["backbone file", "full checkpoint"])
def test_official_dino_checkpoint_maps_onto_torchvision_vit(tmp_path, layout):
    """The backbone file (plain names) and the full training checkpoint (its "student" entry with DDP's
    module. and the wrapper's backbone. prefixes, and a head) load into torchvision's ViT-S/16; the
    loaded network gives the source's class token, at 224 px and, through the interpolated position
    embeddings, at 96 px; the head is not taken."""
    torch.manual_seed(7)
    source = common.build_backbone("vit-s16").eval()
    official = official_dino_layout(source)
    if layout == "full checkpoint":
        official = {"student": {**{f"module.backbone.{k}": v for k, v in official.items()},
                                "module.head.last_layer.weight_v": torch.randn(65536, 256)},
                    "teacher": {}, "epoch": 800}
    torch.save(official, tmp_path / "dino.pth")
    net = daino.DainoNet(daino.MultiResolutionViT(common.build_backbone("vit-s16")), 16, 8, 10, False).eval()
    last = net.last_layer.parametrizations.weight.original1.clone()
    daino.load_weights(net, str(tmp_path / "dino.pth"))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(net.backbone(x), source(x), rtol=1e-4, atol=1e-4)
        small = torch.nn.functional.interpolate(x, size=96)
        assert net.backbone(small).shape == (2, 384)
    assert torch.equal(net.last_layer.parametrizations.weight.original1, last)


@pytest.mark.parametrize("saved,named", [
    ({"student": None}, "AttributeError"),  # a training checkpoint without its weights
    ({"blocks.0.ls1.gamma": torch.ones(384)}, "unknown weight blocks.0.ls1.gamma"),  # DINOv2's LayerScale
    ({"objects": {}}, "KeyError"),  # a checkpoint without a model
    ({"cls_token": "not a tensor"}, "do not fit"),
])
def test_a_foreign_checkpoint_is_one_line(tmp_path, saved, named):
    """--init-from a file that is neither a run of this project nor DINO's ViT-S/16 layout: one line
    naming what did not fit, never a traceback (and never a network loaded without LayerScale)."""
    torch.save(saved, tmp_path / "other.pth")
    net = daino.DainoNet(daino.MultiResolutionViT(common.build_backbone("vit-s4-32")), 16, 8, 10, False)
    with pytest.raises(common.Abort, match=named):
        daino.load_weights(net, str(tmp_path / "other.pth"))


def test_a_suave_run_gives_its_backbone(tmp_path):
    """The CIFAR-100 recipe starts from a SwAV run of suave.py: same backbone names."""
    torch.manual_seed(8)
    saved = {"backbone." + k: v for k, v in common.build_backbone("resnet18", width=2).state_dict().items()}
    saved["prototypes.weight"] = torch.randn(30, 4)
    (tmp_path / "run").mkdir()
    torch.save({"stage": "train", "epoch": 0, "objects": {"model": saved}, "rng": []},
               tmp_path / "run" / "checkpoint.pt")
    net = daino.DainoNet(common.build_backbone("resnet18", width=2), 8, 4, 10, False)
    daino.load_weights(net, str(tmp_path / "run"))
    assert torch.equal(net.backbone.conv1.weight, saved["backbone.conv1.weight"])
    wider = daino.DainoNet(common.build_backbone("resnet18", width=4), 8, 4, 10, False)
    with pytest.raises(common.Abort, match="do not fit"):
        daino.load_weights(wider, str(tmp_path / "run"))


# ------------------------------------------------------------------------------------------------
# Flags and bad input
# ------------------------------------------------------------------------------------------------
def test_recipes_of_the_defaults():
    c100 = daino.parse_args(["--dataset", "cifar100"])
    assert (c100.optimizer, c100.lr, c100.weight_decay, c100.weight_decay_end, c100.teacher_temperature,
            c100.teacher_momentum, c100.batch_size, c100.labelled_batch_size, c100.local_crops,
            c100.labels_per_class, c100.norm_last_layer, c100.freeze_last_layer) == (
        "lars", 2.8, 3e-6, 3e-6, 0.07, 0.99, 128, 100, 4, 25, False, 0)
    dino = daino.parse_args(["--dataset", "cifar10", "--labels-per-class", "0", "--batch-size", "512"])
    assert (dino.num_clusters, dino.teacher_momentum, dino.lars_eta, dino.lars_clip, dino.lr,
            dino.local_crops, dino.mix_labelled, dino.norm_last_layer, dino.freeze_last_layer,
            dino.epochs) == (
        4096, 0.9995, 0.02, True, 0.3 * 2, 0, False, True, 1, 1000)
    imagenet = daino.parse_args(["--dataset", "imagefolder", "--label-file", "10percent.txt"])
    assert imagenet.label_fraction is None and imagenet.labels_per_class is None
    per_class = daino.parse_args(["--dataset", "imagefolder", "--labels-per-class", "13"])  # not with 10 %
    assert (per_class.labels_per_class, per_class.label_fraction) == (13, None)
    assert daino.parse_args(["--dataset", "imagefolder"]).label_fraction == 0.1
    zero = daino.parse_args(["--dataset", "cifar10", "--labels-per-class", "00", "--batch-size", "512"])
    assert vars(zero) == vars(dino)  # 00 is 0: the same recipe
    assert (imagenet.optimizer, imagenet.lr, imagenet.weight_decay, imagenet.weight_decay_end,
            imagenet.epochs, imagenet.warmup_epochs, imagenet.final_lr, imagenet.local_crops,
            imagenet.local_size, imagenet.backbone) == (
        "adamw", 0.00024 * 4, 0.04, 0.4, 60, 4, 1e-5, 8, 96, "vit-s16")
    for recipe in (c100, dino, imagenet):  # DINO's ColorJitter(0.4, 0.4, 0.2, 0.1), grayscale 0.2
        assert (recipe.jitter, recipe.hue, recipe.grayscale) == (0.4, 0.1, 0.2)


@pytest.mark.parametrize("hue", [0.0, 0.1])
def test_colour_jitter_moves_the_hue_only_when_asked(hue):
    """Brightness, contrast and saturation keep each pixel's hue; --hue 0 (the synthetic demo, whose
    classes differ by hue) keeps it through the whole jitter, DINO's 0.1 moves it by up to 0.1."""
    args = daino.parse_args(["--dataset", "synthetic", "--hue", str(hue), "--labelled-scale", "1", "1"])
    assert args.labelled_jitter > 0 and args.jitter > 0 and args.grayscale == 0
    plain = SimpleNamespace(mean=(0, 0, 0), std=(1, 1, 1))  # normalising leaves [0, 1]
    augment, _ = daino.make_transforms(args, plain, torch.device("cpu"))
    torch.manual_seed(0)
    hsv = torch.stack([torch.rand(256), torch.full((256,), 0.5), torch.full((256,), 0.4)], 1)  # no clipping
    images = (common.hsv_to_rgb(hsv)[:, :, None, None] * 255).round().expand(256, 3, 16, 16).to(torch.uint8)
    for view in ("labelled", "global"):
        out = augment[view](images) if view == "labelled" else augment["global"][0](images)
        before, after = common.rgb_to_hsv(images.float() / 255)[:, 0], common.rgb_to_hsv(out)[:, 0]
        moved = (after - before).abs().amax((1, 2))
        moved = torch.minimum(moved, 1 - moved)  # hue is an angle
        changed = (out - images.float() / 255).abs().amax((1, 2, 3)) > 0.02
        assert changed.float().mean() > 0.6  # jittered with p 0.8
        if hue == 0:
            assert moved.max() < 0.01
        else:
            assert 0.05 < moved.max() < 0.1 + 0.01


@pytest.mark.parametrize("flags,named", [
    (["--global-crops", "1", "--local-crops", "0"], "another crop"),
    (["--labels-per-class", "0", "--supervised-only"], "--supervised-only"),
    (["--label-fraction", "0.1", "--labels-per-class", "4"], "one of"),
    (["--global-scale", "0.8", "0.2"], "--global-scale"),
    (["--blur", "0.5", "0.5"], "--blur"),
    (["--backbone", "vit-s16", "--global-size", "12"], "16 px"),
    (["--head-bn", "--supervised-only", "--no-mix-labelled", "--labelled-batch-size", "1"], "1 labelled"),
])
def test_bad_combinations_exit_2_with_one_line(flags, named, capsys):
    with pytest.raises(SystemExit) as info:
        daino.parse_args(["--dataset", "synthetic", *flags])
    err = capsys.readouterr().err
    assert info.value.code == 2 and one_line_error(err) and named in err, err


def test_a_head_of_other_size_than_the_classes_stops_before_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(common.Abort, match="--num-clusters 30: the head is the classifier") as info:
        daino.main(["--dataset", "synthetic", "--device", "cpu", "--num-clusters", "30"])
    assert info.value.exit_code == 2 and "\n" not in str(info.value) and not os.listdir(tmp_path)
