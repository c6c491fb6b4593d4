"""Daino: semi-supervised DINO with the head as the classifier; DINO is its label-free case.

Enrico Fini, Pietro Astolfi, Karteek Alahari, Xavier Alameda-Pineda, Julien Mairal, Moin Nabi, Elisa
Ricci, "Semi-supervised learning made simple with self-supervised clustering", CVPR 2023,
arXiv:2306.07483; official code: github.com/pietroastolfi/suave-daino (ImageNet only). DINO: Caron et
al., ICCV 2021, arXiv:2104.14294, github.com/facebookresearch/dino.

A student and its EMA, the teacher, map every crop through a backbone and a DINO head whose K outputs
are the classes. Unlabelled images: the teacher's centred, sharpened softmax of each global crop is
the target of the student's softmax of every other crop (DINO's self-distillation). Labelled images:
cross-entropy of the student's outputs against the labels, so the head is the classifier;
MixUp/CutMix extends the labelled batch. --labels-per-class 0 is plain DINO.

Reproduce (CIFAR-100, the supplementary's recipe, after a 500-epoch SwAV run of suave.py):
  python suave.py --dataset cifar100 --labels-per-class 0 --out-dir runs/swav-c100 --compile
  python daino.py --dataset cifar100 --labels-per-class 25 --init-from runs/swav-c100 --compile
  paper: CIFAR-100 table not in our sources. here: not run yet (no GPU); a small CPU run on
  CIFAR-10 and the prepared GPU commands are in benchmarks/daino.md.

Deviations (each a flag where it is a choice):
  - where no source says (CIFAR): CIFAR ResNet-18 with 1x1-conv shortcuts, 32 px global / 18 px local
    crops, labelled views cropped (0.08-1) to 32 px, no blur, constant weight decay
  - --labels-per-class 0 (DINO) takes solo-learn's CIFAR DINO recipe (head 2048 -> 256, 4096 outputs,
    last layer normalised and frozen 1 epoch, teacher momentum 0.9995, T_t 0.07 without warm-up,
    LARS 0.3 x batch / 256 with trust 0.02 and its lr clipping, wd 1e-6, 10 warm-up epochs, two
    32 px crops (0.08-1)) for its 1000 epochs
  - ViT-S/16 is torchvision's VisionTransformer, without drop-path (DINO: 0.1); its position
    embeddings are interpolated for other crop sizes, as DINO does
  - augmentation runs batched on the device; image folders are decoded to their 224 px centre crop
    and every crop is taken from it (official: from the whole image)
"""
import argparse
import copy
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ================================================================================================
# Defaults
# ================================================================================================
# Sec. 1 of the supplementary, in its order: CIFAR-100 (Sec. 1.2: batches, epochs, crops, label
# smoothing, LARS lr and wd, epsilon = the teacher temperature, momentum encoder = the teacher; "all
# the other hyper-parameters are kept the same" as ImageNet's Sec. 1.1) and ImageNet-1k (Sec. 1.1,
# "Simplified training recipe for Daino", over DINO's ViT-S/16 recipe; the official train_10perc.sh
# where the text is silent). Decided here where no source says (header): network, crops, labels.
PAPER_DEFAULTS = {
    "cifar100": dict(batch_size=128, labelled_batch_size=100, epochs=200, global_scale=[0.6, 1.0],
                     local_crops=4, local_scale=[0.1, 0.6], label_smoothing=0.01, optimizer="lars", lr=2.8,
                     weight_decay=3e-6, teacher_temperature=0.07, teacher_momentum=0.99,
                     backbone="resnet18", global_size=32, local_size=18, labels_per_class=25,
                     blur=[0.0, 0.0, 0.0]),
    "imagefolder": dict(batch_size=1024, labelled_batch_size=512, epochs=60, optimizer="adamw", lr=None,
                        weight_decay=0.04, weight_decay_end=0.4, teacher_temperature=0.07,
                        teacher_momentum=0.99, global_size=224, global_scale=[0.25, 1.0], local_crops=8,
                        local_size=96, local_scale=[0.05, 0.25], backbone="vit-s16", label_fraction=0.1),
    # Not in the paper: a CPU demo of about 40 s (narrow network, 16 px crops, small batches, 62
    # steps an epoch). AdamW (the ImageNet recipe's): with a head this small, LARS's unadapted steps
    # on the zero-initialised biases swamp the bottleneck's tiny outputs and the head collapses.
    # Teacher momentum 0.8 for a 310-step run. The labelled batch holds all 40 labels (CIFAR-100's
    # recipe has 100 labelled to 128 unlabelled; with 10 the unlabelled loss drowned the labels and
    # Daino fell below the supervised-only baseline). Colour jitter without hue or grayscale: hue is
    # one of the classes' cues, and without jitter the plain background, the same colour in both
    # crops, is what self-distillation matches crops by. benchmarks/daino.md has the runs.
    "synthetic": dict(batch_size=32, labelled_batch_size=40, epochs=5, global_scale=[0.3, 1.0],
                      local_crops=0, local_scale=[0.1, 0.3], label_smoothing=0.01, optimizer="adamw",
                      lr=0.002, weight_decay=1e-5, teacher_temperature=0.07, teacher_momentum=0.8,
                      backbone="resnet18", width=8, global_size=16, local_size=8, labels_per_class=4,
                      blur=[0.0, 0.0, 0.0], solarize=0.0, jitter=0.4, hue=0.0, grayscale=0.0,
                      labelled_jitter=0.4, labelled_grayscale=0.0, hidden_dim=256, bottleneck_dim=64,
                      warmup_epochs=1, teacher_warmup_epochs=2),
}
PAPER_DEFAULTS["cifar10"] = PAPER_DEFAULTS["cifar100"]  # the issue: CIFAR-100's recipe on CIFAR-10
# Sec. 1.1's text and the official code (main_daino.py, train_10perc.sh, DINO's head, loss, LARS and
# augmentation), for every dataset.
SHARED_DEFAULTS = dict(hidden_dim=2048, bottleneck_dim=256, head_bn=False, norm_last_layer=False,
                       freeze_last_layer=0, student_temperature=0.1, teacher_start_temperature=0.04,
                       teacher_warmup_epochs=10, centre_momentum=0.9, label_smoothing=0.01, momentum=0.9,
                       lars_eta=0.001, lars_exclude=True, lars_clip=False, weight_decay_end=None,
                       warmup_epochs=4, final_lr=1e-5, jitter=0.4, hue=0.1, grayscale=0.2,
                       blur=[1.0, 0.1, 0.5], solarize=0.2,
                       labelled_jitter=0.4, labelled_grayscale=0.2, labelled_scale=[0.08, 1.0],
                       global_crops=2, width=64, mix_labelled=True, sync_bn=True, knn_k=200,
                       knn_temperature=0.1, probe_epochs=100)
# --labels-per-class 0 on CIFAR: solo-learn's DINO recipe (scripts/pretrain/cifar/dino.yaml with its
# asymmetric.yaml augmentation and solo/methods/dino.py's defaults); lr None = 0.3 x total batch / 256.
DINO_DEFAULTS = dict(num_clusters=4096, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True,
                     freeze_last_layer=1, teacher_momentum=0.9995, teacher_temperature=0.07,
                     teacher_warmup_epochs=0, optimizer="lars", lr=None, lars_eta=0.02, lars_exclude=True,
                     lars_clip=True, weight_decay=1e-6, weight_decay_end=None, warmup_epochs=10, final_lr=0.0,
                     epochs=1000, batch_size=256, mix_labelled=False, local_crops=0, global_scale=[0.08, 1.0],
                     blur=[0.0, 0.0, 0.0])
# Flags that may change on --resume: extend the schedule, lower the learning rate after a divergence.
RESUMABLE = ("epochs", "lr")


def dataset_defaults(dataset, dino=False):
    """The dataset's row over the shared settings, then the DINO recipe when asked (image folders: the
    same row without labels). Datasets without a row take CIFAR-100's recipe."""
    row = {**SHARED_DEFAULTS, **PAPER_DEFAULTS.get(dataset, PAPER_DEFAULTS["cifar100"])}
    if dino and dataset == "imagefolder":  # the ImageNet row without labels, DINO's 65,536 outputs
        row.update(num_clusters=65536, mix_labelled=False, labels_per_class=0, label_fraction=None)
    elif dino:
        row.update(DINO_DEFAULTS, labels_per_class=0)
        if dataset == "synthetic":  # the CPU demo's sizes and optimizer, the jitter of the Daino demo,
            # DINO's default teacher temperature (0.04); benchmarks/daino.md
            row.update(epochs=6, batch_size=32, warmup_epochs=1, num_clusters=30, jitter=0.4, hue=0.0,
                       grayscale=0.0, solarize=0.0, hidden_dim=256, bottleneck_dim=64, optimizer="adamw",
                       lr=0.01, teacher_momentum=0.99, teacher_temperature=0.04)
    return row


# ================================================================================================
# Command line
# ================================================================================================
def peek(argv):
    """The flags that choose the defaults' recipe, read before the full parse (for --help too)."""
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--dataset", "--labels-per-class", "--label-fraction", "--label-file"):
        pre.add_argument(flag)
    return pre.parse_known_args(argv)[0]


def parse_args(argv=None):
    seen = peek(argv)
    dataset = seen.dataset or "cifar100"
    count = (seen.labels_per_class or "").strip()
    dino = count.isdigit() and int(count) == 0  # as the parser reads it: 00 is 0 too
    defaults = dataset_defaults(dataset, dino)
    if seen.label_fraction or seen.label_file:  # another way of choosing the labels was given
        defaults.update(labels_per_class=None, label_fraction=None)
    elif count:  # labels chosen per class: not the row's default fraction (ImageNet's 10 %)
        defaults.update(label_fraction=None)
    recipe = ("Sec. 1 of the supplementary" if not dino else "the ImageNet row without labels "
              "(--labels-per-class 0)" if dataset == "imagefolder" else "solo-learn's DINO recipe "
              "(--labels-per-class 0)")
    p = common.ArgumentParser(
        description="Daino (Fini et al., CVPR 2023): semi-supervised DINO; --labels-per-class 0 is DINO.",
        epilog=f"Defaults shown are those of --dataset {dataset} with {recipe}; `--dataset NAME "
        "--help` shows another row. " + common.resume_epilog(RESUMABLE))
    b = argparse.BooleanOptionalAction
    p.add_argument("--dataset", default="cifar100",
                   help="cifar100, imagefolder (ImageNet; rows of the supplementary), cifar10 (CIFAR-100's "
                   "recipe), synthetic (CPU demo); any other dataset of common.py takes CIFAR-100's recipe")
    p.add_argument("--data-dir", default=common.default_data_dir(),
                   help="dataset folder (default: $DATA_DIR, else ./data)")
    g = p.add_argument_group("labels (the unlabelled set is the whole training split)")
    g.add_argument("--labels-per-class", type=common.non_negative_int,
                   help="labelled images per class, a seeded class-balanced subset (CIFAR-100: 4, 25, 100 "
                   "= 400 / 2,500 / 10,000 labels); 0 = no labels: DINO pre-training")
    g.add_argument("--label-fraction", type=common.open_fraction,
                   help="share of each class that is labelled (ImageNet: 0.01 or 0.1)")
    g.add_argument("--label-file",
                   help="a file of labelled image names, one a line (the standard ImageNet 1 %% / 10 %% "
                   "lists)")
    g.add_argument("--labelled-batch-size", type=common.positive_int,
                   help="labelled images per step and device, before the mixed copy (supplementary: 512 "
                   "with 1024 unlabelled, in all)")
    g.add_argument("--supervised-only", action=b, default=False,
                   help="the baseline: the same network (the student; no teacher), labelled batches and "
                   "schedule without the unlabelled images (not in the paper)")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "vit-s16", "vit-s4-32"],
                   help="CIFAR ResNets have a 3x3 stem and 1x1-conv shortcuts; vit-s16 is torchvision's "
                   "ViT-S/16 (supplementary: ViT-S/16 on ImageNet); vit-s4-32 the same with 4 px patches "
                   "for 32 px images (not in the paper)")
    g.add_argument("--width", type=common.positive_int, help="CIFAR ResNet stem width (64; smaller for CPUs)")
    g.add_argument("--hidden-dim", type=common.positive_int, help="DINO head hidden size (official code)")
    g.add_argument("--bottleneck-dim", type=common.positive_int, help="DINO head bottleneck (official code)")
    g.add_argument("--num-clusters", type=common.positive_int,
                   help="head outputs, K (default: the number of classes; DINO: 4096, solo-learn)")
    g.add_argument("--head-bn", action=b,
                   help="BatchNorm in the head's hidden layers (DINO's use_bn_in_head; official: off)")
    g.add_argument("--norm-last-layer", action=b,
                   help="fix the norms of the last layer's rows at 1 (DINO's norm_last_layer; the official "
                   "Daino script: off)")
    g.add_argument("--freeze-last-layer", type=common.non_negative_int,
                   help="epochs during which the last layer gets no update (Daino: 0, the labelled loss "
                   "prevents collapse; DINO: 1)")
    g.add_argument("--init-from", metavar="RUN",
                   help="initialise the backbone from a run directory of suave.py or this file, or from "
                   "the official DINO ViT-S/16 checkpoint file (its head is not loaded)")
    g.add_argument("--sync-bn", action=b, help="SyncBatchNorm under torchrun on CUDA (official code)")
    g = p.add_argument_group("self-distillation (DINO, Sec. 1.1 of the supplementary)")
    g.add_argument("--student-temperature", type=common.positive_float, help="T_s of the student's softmax")
    g.add_argument("--teacher-temperature", type=common.positive_float,
                   help="T_t of the teacher's softmax after the warm-up (supplementary: its epsilon)")
    g.add_argument("--teacher-start-temperature", type=common.positive_float,
                   help="T_t at the first epoch, raised linearly to --teacher-temperature")
    g.add_argument("--teacher-warmup-epochs", type=common.non_negative_int, help="epochs of that warm-up")
    g.add_argument("--teacher-momentum", type=common.fraction,
                   help="base momentum of the teacher (EMA of the student), ramped to 1 on a cosine")
    g.add_argument("--centre-momentum", type=common.fraction, help="EMA momentum of the teacher's centre")
    g.add_argument("--label-smoothing", type=common.fraction, help="of the labelled cross-entropy")
    g = p.add_argument_group("crops and augmentation (DINO's: the second global crop is solarised)")
    g.add_argument("--global-crops", type=common.positive_int,
                   help="global crops of each unlabelled image, seen by the teacher too")
    g.add_argument("--global-size", type=common.positive_int, help="global crop side in pixels")
    g.add_argument("--global-scale", type=common.area_fraction, nargs=2, metavar=("MIN", "MAX"),
                   help="area range of the global crops")
    g.add_argument("--local-crops", type=common.non_negative_int, help="local crops of each unlabelled image")
    g.add_argument("--local-size", type=common.positive_int, help="local crop side in pixels")
    g.add_argument("--local-scale", type=common.area_fraction, nargs=2, metavar=("MIN", "MAX"),
                   help="area range of the local crops")
    g.add_argument("--jitter", type=common.non_negative_float,
                   help="colour jitter strength s of unlabelled crops, ColorJitter(s, s, s/2, --hue) with p "
                   "0.8 (DINO: 0.4, 0.4, 0.2, 0.1); 0 = none")
    g.add_argument("--hue", type=common.hue_shift,
                   help="hue shift of the colour jitter, unlabelled and labelled (DINO: 0.1)")
    g.add_argument("--grayscale", type=common.probability, help="grayscale probability of unlabelled crops")
    g.add_argument("--blur", type=common.probability, nargs=3, metavar=("FIRST", "SECOND", "LOCAL"),
                   help="Gaussian blur probability of the first and second global crops and the local ones")
    g.add_argument("--solarize", type=common.probability,
                   help="solarisation probability of the second global crop")
    g.add_argument("--labelled-scale", type=common.area_fraction, nargs=2, metavar=("MIN", "MAX"),
                   help="area range of the labelled crops (Inception crop)")
    g.add_argument("--labelled-jitter", type=common.non_negative_float,
                   help="colour jitter strength of labelled images, p 0.8")
    g.add_argument("--labelled-grayscale", type=common.probability,
                   help="grayscale probability of labelled images")
    g.add_argument("--mix-labelled", action=b,
                   help="extend the labelled batch with one MixUp or CutMix copy (supplementary)")
    g = p.add_argument_group("optimisation (linear warm-up then cosine)")
    g.add_argument("--epochs", type=common.positive_int, help="epochs over the unlabelled images")
    g.add_argument("--batch-size", type=common.positive_int, help="unlabelled images per step and device")
    g.add_argument("--optimizer", choices=["lars", "adamw"],
                   help="LARS (CIFAR-100, supplementary) or AdamW (ImageNet, DINO's recipe)")
    g.add_argument("--lr", type=common.positive_float,
                   help="peak learning rate (ImageNet: 0.00024 x total batch / 256, supplementary; DINO on "
                   "CIFAR: 0.3 x total batch / 256, solo-learn)")
    g.add_argument("--final-lr", type=common.non_negative_float, help="learning rate at the cosine's end")
    g.add_argument("--warmup-epochs", type=common.non_negative_int, help="linear warm-up from 0")
    g.add_argument("--weight-decay", type=common.non_negative_float,
                   help="weight decay of weights (not biases nor 1-d parameters), at the start")
    g.add_argument("--weight-decay-end", type=common.non_negative_float,
                   help="weight decay at the end of a cosine from --weight-decay (official ImageNet: 0.4; "
                   "default: constant)")
    g.add_argument("--momentum", type=common.fraction, help="LARS momentum (official code)")
    g.add_argument("--lars-eta", type=common.positive_float, help="LARS trust coefficient")
    g.add_argument("--lars-exclude", action=b,
                   help="biases and 1-d parameters get neither LARS adaptation nor decay (DINO's LARS)")
    g.add_argument("--lars-clip", action=b,
                   help="cap each parameter's adapted lr at --lr (solo-learn's clip_lr)")
    g = p.add_argument_group("evaluation of --labels-per-class 0 runs (DINO)")
    g.add_argument("--knn-k", type=common.positive_int, help="weighted kNN on backbone features: neighbours")
    g.add_argument("--knn-temperature", type=common.positive_float, help="weighted kNN: temperature")
    g.add_argument("--probe-epochs", type=common.non_negative_int, help="linear probe epochs; 0 = none")
    common.add_run_arguments(p, "daino")
    p.set_defaults(**defaults)
    return common.parse_arguments(p, argv, "daino.py", check_args, RESUMABLE)


def check_args(p, args):
    """Combinations of flags that cannot work: refused before anything runs (exit code 2)."""
    if args.dataset not in common.DATASETS:
        p.error(f"unknown dataset {args.dataset!r}; choose one of {', '.join(common.DATASETS)}")
    chosen = [f for f, v in (("--labels-per-class", args.labels_per_class),
                             ("--label-fraction", args.label_fraction), ("--label-file", args.label_file))
              if v is not None]
    if len(chosen) != 1:
        p.error(f"choose the labels with one of --labels-per-class, --label-fraction, --label-file "
                f"({'none' if not chosen else ' and '.join(chosen)} given)")
    views = args.global_crops + args.local_crops
    if views < 2:
        p.error(f"{views} crop: self-distillation needs another crop to predict from; add --local-crops")
    for flag in ("global_scale", "local_scale", "labelled_scale"):
        low, high = getattr(args, flag)
        if low > high:
            p.error(f"--{flag.replace('_', '-')} {low} {high}: the minimum is above the maximum")
    if args.labels_per_class == 0 and args.supervised_only:
        p.error("--supervised-only needs labels: --labels-per-class is 0")
    if args.head_bn and args.supervised_only and not args.mix_labelled and args.labelled_batch_size < 2:
        p.error("--head-bn normalises over the batch: the head would see 1 labelled image a step; raise "
                "--labelled-batch-size or add --mix-labelled")
    if args.backbone.startswith("vit"):
        patch = 16 if args.backbone == "vit-s16" else 4
        if args.global_size < patch or args.local_size < patch:
            p.error(f"--backbone {args.backbone} cuts {patch} px patches: crops of {args.global_size} / "
                    f"{args.local_size} px are smaller")
    if args.lr is None:  # linear scaling rules: ImageNet (supplementary), DINO on CIFAR (solo-learn)
        base = 0.00024 if args.optimizer == "adamw" else 0.3
        args.lr = base * args.batch_size * int(os.environ.get("WORLD_SIZE", 1)) / 256
    if args.weight_decay_end is None:
        args.weight_decay_end = args.weight_decay


# ================================================================================================
# Model
# ================================================================================================
class MultiResolutionViT(nn.Module):
    """torchvision's VisionTransformer on crops of any side (whole patches of it): the position
    embeddings of the patches are interpolated bicubically to the crop's grid (DINO's
    interpolate_pos_encoding). Returns the class token, float (B, 384)."""

    def __init__(self, vit):
        super().__init__()
        self.vit, self.feature_dim = vit, vit.hidden_dim

    def forward(self, x):
        vit = self.vit
        patches = vit.conv_proj(x).flatten(2).transpose(1, 2)  # (B, h w, D)
        pos = vit.encoder.pos_embedding
        side, grid = round(math.sqrt(pos.shape[1] - 1)), x.shape[-1] // vit.patch_size
        patch_pos = pos[:, 1:]
        if grid != side:
            square = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(square, size=(grid, grid), mode="bicubic",
                                      align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
        tokens = torch.cat([vit.class_token.expand(len(x), -1, -1), patches], 1)
        tokens = tokens + torch.cat([pos[:, :1], patch_pos], 1)
        encoder = vit.encoder
        return encoder.ln(encoder.layers(encoder.dropout(tokens)))[:, 0]


class DainoNet(nn.Module):
    """backbone -> DINO head: MLP (Linear, GELU, Linear, GELU, Linear to the bottleneck; truncated
    normal 0.02 weights, zero biases; with head_bn, BatchNorm after the hidden Linears), L2
    normalisation, then a weight-normalised bias-free last layer of K outputs, w_k = g_k v_k / ||v_k||,
    g_k starting at 1 (fixed there with norm_last_layer)."""

    def __init__(self, backbone, hidden_dim, bottleneck_dim, num_outputs, norm_last_layer, head_bn=False):
        super().__init__()
        self.backbone = backbone
        layers = []
        for size in (backbone.feature_dim, hidden_dim):  # official layout: mlp.0, mlp.2, mlp.4 without BN
            norm = [nn.BatchNorm1d(hidden_dim)] if head_bn else []
            layers += [nn.Linear(size, hidden_dim), *norm, nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, num_outputs, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        g = self.last_layer.parametrizations.weight.original0
        g.data.fill_(1)
        g.requires_grad = not norm_last_layer

    def forward(self, views):
        """A batch float (B, C, H, W): its outputs (B, K). A list of batches: the outputs (N, K) of all
        of them in order; consecutive batches of one size go through the backbone together (DINO's
        multi-crop forward: one BatchNorm batch per resolution)."""
        if torch.is_tensor(views):
            views = [views]
        groups, start = [], 0
        for end in range(1, len(views) + 1):
            if end == len(views) or views[end].shape[-2:] != views[start].shape[-2:]:
                groups.append(self.backbone(torch.cat(views[start:end])))
                start = end
        return self.last_layer(F.normalize(self.mlp(torch.cat(groups)), dim=1))


def map_official_dino(state):
    """The official DINO ViT-S/16 checkpoints -> the weights of torchvision's VisionTransformer: the
    backbone file (dino_deitsmall16_pretrain.pth: cls_token, pos_embed, patch_embed.proj.*,
    blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*, norm.*) or the full training
    checkpoint, whose "student" entry (what the official Daino loads) has "module.backbone." prefixes;
    the head is dropped. Raises ValueError for a block weight outside that layout (e.g. DINOv2's
    LayerScale ls1, ls2)."""
    state = state.get("student", state)
    names = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding",
             "patch_embed.proj.weight": "conv_proj.weight", "patch_embed.proj.bias": "conv_proj.bias",
             "norm.weight": "encoder.ln.weight", "norm.bias": "encoder.ln.bias"}
    parts = {"norm1": "ln_1", "attn.qkv": "self_attention.in_proj_", "attn.proj": "self_attention.out_proj",
             "norm2": "ln_2", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("backbone.")
        if key in names:
            out[names[key]] = value
        elif key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            layer, kind = rest.rsplit(".", 1)
            if layer not in parts:
                raise ValueError(f"unknown weight {key}")
            name = parts[layer]  # attention's input projection: in_proj_weight, in_proj_bias
            name = name + kind if name.endswith("_") else f"{name}.{kind}"
            out[f"encoder.layers.encoder_layer_{i}.{name}"] = value
    return out


def load_weights(raw_model, path):
    """--init-from: the backbone of a run directory of suave.py or this file (same backbone names),
    or of an official DINO ViT-S/16 checkpoint file."""
    source = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    try:
        saved = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as error:
        raise common.Abort(f"--init-from {path}: cannot read {source} ({type(error).__name__})") from None
    try:
        if isinstance(saved, dict) and "objects" in saved:  # a run of suave.py or daino.py
            weights = {k: v for k, v in saved["objects"]["model"].items() if k.startswith("backbone.")}
        else:
            weights = {"backbone.vit." + k: v for k, v in map_official_dino(saved).items()}
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise common.Abort(f"--init-from {path}: neither a run of this project nor a DINO ViT-S/16 "
                           f"checkpoint ({type(error).__name__}: {error})") from None
    expected = {k: v for k, v in raw_model.state_dict().items() if k.startswith("backbone.")}
    wrong = [k for k, v in expected.items()
             if not torch.is_tensor(weights.get(k)) or weights[k].shape != v.shape]
    if wrong or len(weights) != len(expected):
        k = wrong[0] if wrong else next(k for k in weights if k not in expected)
        raise common.Abort(f"--init-from {path}: its weights do not fit this network ({k}); check --backbone "
                           "and --width")
    raw_model.load_state_dict(weights, strict=False)


# ================================================================================================
# Method: self-distillation with a centred, sharpened teacher (DINO, Caron et al. 2021, Sec. 3.1)
# ================================================================================================
def dino_loss(student, teacher, centre, student_temperature, teacher_temperature):
    """DINO Eq. 1 over multi-crop: the mean over every (teacher global crop a, student crop v != a)
    pair of -sum_k P_t(a)_k log P_s(v)_k, P_t = softmax((t_a - c) / T_t), P_s = softmax(s_v / T_s)
    (Eq. 3's centring and sharpening). student: list (V) of (B, K); teacher: list (G) of detached
    (B, K), the first G student crops being the same images; centre (1, K). fp32."""
    total, pairs = 0.0, 0
    for a, t in enumerate(teacher):
        p_t = F.softmax((t.float() - centre) / teacher_temperature, dim=1)
        for v, s in enumerate(student):
            if v != a:
                total = total - (p_t * F.log_softmax(s.float() / student_temperature, dim=1)).sum(1).mean()
                pairs += 1
    return total / pairs


@torch.no_grad()
def update_centre(centre, teacher, momentum):
    """c = m c + (1 - m) (1 / B) sum_i g_t(x_i) over the global crops of all ranks (DINO Eq. 4).
    centre (1, K) in place; teacher: list of (B, K)."""
    outputs = torch.cat(teacher).float()
    batch_centre = common.all_reduce_sum(outputs.sum(0, keepdim=True)) / (len(outputs) * common.world_size())
    centre.mul_(momentum).add_(batch_centre, alpha=1 - momentum)


def teacher_temperature(epoch, args):
    """DINO's schedule: np.linspace(T_start, T_t, warm-up epochs)[epoch] during the warm-up, then T_t."""
    warm = args.teacher_warmup_epochs
    if epoch >= warm:
        return args.teacher_temperature
    start, end = args.teacher_start_temperature, args.teacher_temperature
    return start + (end - start) * epoch / max(warm - 1, 1)


def mixed_targets(q0, q1, lam):
    """Target of a view mixed as lam x0 + (1 - lam) x1.flip(0): lam q0 + (1 - lam) q1.flip(0)."""
    return lam * q0 + (1 - lam) * q1.flip(0)


def loss_weights(unlabelled, views, labelled):
    """The official code's weighting by share: T = B_u V + B_l; (B_u V / T, B_l / T), with B_l counting
    the extended labelled batch."""
    total = unlabelled * views + labelled
    return unlabelled * views / total, labelled / total


def mix_pair(x0, x1, alpha=1.0, switch=0.5):
    """MixUp or CutMix (probability `switch`) of x0 with x1.flip(0), lam ~ Beta(alpha, alpha) per batch
    (the official code's timm-style collate, mode "batch", prob 1). CutMix pastes a box of side
    sqrt(1 - lam) centred at a uniform point, clipped to the image, and corrects lam to the box's
    area. Returns the mixed float batch and lam (a float)."""
    lam = float(np.random.beta(alpha, alpha))
    partner = x1.flip(0)
    if np.random.rand() >= switch:
        return lam * x0 + (1 - lam) * partner, lam
    H, W = x0.shape[-2:]
    cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    cy, cx = np.random.randint(H), np.random.randint(W)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
    out = x0.clone()
    out[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
    return out, 1 - (bottom - top) * (right - left) / (H * W)


# ================================================================================================
# Method: optimizers and schedules (LARS: You et al. 2017; AdamW and the schedules: DINO's code)
# ================================================================================================
class LARS(torch.optim.Optimizer):
    """d = g + wd w; d *= eta ||w|| / ||d|| where both norms are positive (else d is kept); mu = m mu + d;
    w -= lr mu. With exclude_1d, biases and 1-d parameters are neither decayed nor adapted (DINO's
    LARS, which Daino uses); with clip, the adapted lr is capped at lr: the factor becomes
    min(eta ||w|| / ||d|| / lr, 1) (solo-learn's clip_lr). No gradient clipping."""

    def __init__(self, params, lr, weight_decay, momentum, eta, exclude_1d=False, clip=False):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                                      exclude_1d=exclude_1d, clip=clip))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not (group["exclude_1d"] and p.ndim == 1):
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, 1.0)
                    if group["clip"] and group["lr"] > 0:
                        trust = torch.clamp(trust / group["lr"], max=1.0)
                    d = d * trust
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-group["lr"])


def make_optimizer(model, args):
    """DINO's get_params_groups: weights first, then biases and 1-d parameters without weight decay
    (frozen parameters left out); LARS or AdamW over them."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1]},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if args.optimizer == "lars":
        return LARS(groups, args.lr, args.weight_decay, args.momentum, args.lars_eta, args.lars_exclude,
                    args.lars_clip)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def cosine(step, total_steps, start, end):
    """DINO's cosine_scheduler without warm-up at `step`: end + (start - end) (1 + cos(pi step / T)) / 2."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / total_steps))


def learning_rate(step, steps_per_epoch, args):
    """DINO's schedule: np.linspace(0, lr, warm-up steps), then the cosine from lr to --final-lr over
    the remaining steps."""
    warm, total = args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch
    if step < warm:
        return args.lr * step / max(warm - 1, 1)
    return cosine(step - warm, max(total - warm, 1), args.lr, args.final_lr)


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """theta_t = m theta_t + (1 - m) theta_s, parameters only (DINO Sec. 3.1; the teacher's BatchNorm
    keeps its own running statistics)."""
    torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - momentum)


# ================================================================================================
# Data and augmentation
# ================================================================================================
def load_data(args, device):
    """Training split (the unlabelled set), test split and the labelled indices; sizes checked
    before a run directory exists."""
    size = args.global_size
    train = common.load_dataset(args.dataset, "train", args.data_dir, device, image_size=size)
    test = common.load_dataset(args.dataset, "test", args.data_dir, device, image_size=size)
    args.num_clusters = args.num_clusters or train.num_classes
    labelled = None
    if args.labels_per_class != 0:
        labelled = common.labelled_subset(train, args.labels_per_class, args.label_fraction, args.label_file,
                                          args.seed)
        if args.num_clusters != train.num_classes:
            raise common.Abort(f"--num-clusters {args.num_clusters}: the head is the classifier, "
                               f"one output per class ({train.num_classes})")
        common.check_batch_size("--labelled-batch-size", args.labelled_batch_size, len(labelled),
                                "the labelled images")
    common.check_batch_size("--batch-size", args.batch_size, len(train), args.dataset)
    return train, test, labelled


class LabelledBatches:
    """The labelled loader, cycling on its own: global labelled step s is batch s mod L of the
    labelled epoch s // L (L steps each), whose order depends on the seed and that epoch only, so
    the position is one integer to checkpoint. Yields uint8 images and labels of this rank."""

    def __init__(self, data, indices, batch_size, seed):
        self.data, self.indices, self.batch_size, self.seed = data, indices, batch_size, seed
        self.steps = len(indices) // (batch_size * common.world_size())
        self.epoch, self.batches = None, None

    def batch(self, step):
        epoch, position = divmod(step, self.steps)
        if epoch != self.epoch:
            order = common.epoch_order(len(self.indices), self.seed + 7919, epoch, self.indices.device)
            self.epoch, self.batches = epoch, common.shard_batches(self.indices[order], self.batch_size)
        _, images, labels = next(iter(self.data.batches(self.batches[position], self.batch_size)))
        return images, labels


def make_transforms(args, data, device):
    """uint8 batch -> normalised float batch: `augment["global"]` (a list: DINO's first global crop with
    its blur, the second with less blur and solarisation), `augment["local"]` and `augment["labelled"]`
    (RandomResizedCrop, flip, colour jitter with p 0.8, grayscale, blur; DINO's and the official
    labelled pipelines), `prepare` (no augmentation) for evaluation."""
    memory = common.memory_format(device)

    def finish(x):
        return common.normalize(x, data.mean, data.std).contiguous(memory_format=memory)

    def prepare(x):
        return finish(common.to_float(x))

    def view(size, scale, jitter, saturation, grayscale, blur, solarize=0.0):
        def apply(x):
            x = common.random_resized_crop(common.to_float(x), size, tuple(scale))
            x = common.horizontal_flip(x)
            if jitter:
                x = common.color_jitter(x, jitter, jitter, saturation, args.hue, p=0.8)
            if grayscale:
                x = common.random_grayscale(x, grayscale)
            if blur:
                x = common.gaussian_blur(x, blur)
            if solarize:
                x = common.solarize(x, solarize)
            return finish(x)
        return apply

    s, gray = args.jitter, args.grayscale
    first, second, local = args.blur
    augment = {"global": [view(args.global_size, args.global_scale, s, s / 2, gray, first),
                          view(args.global_size, args.global_scale, s, s / 2, gray, second, args.solarize)],
               "local": view(args.local_size, args.local_scale, s, s / 2, gray, local),
               "labelled": view(args.global_size, args.labelled_scale, args.labelled_jitter,
                                args.labelled_jitter, args.labelled_grayscale, 0.0)}
    return augment, prepare


# ================================================================================================
# Training
# ================================================================================================
def train_one_epoch(model, optimizer, data, augment, args, epoch, run, device, raw_model, teacher, centre,
                    progress, labelled):
    """One epoch over the unlabelled images; returns the meter of losses and the number of images."""
    meter, images_seen = common.Meter(), 0
    steps = len(data) // (args.batch_size * common.world_size())
    total_steps = args.epochs * steps
    temperature = teacher_temperature(epoch, args)
    for _, images, _ in run.batches(data, args.batch_size, epoch, meter):
        step = progress["step"]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, args)
        optimizer.param_groups[0]["weight_decay"] = cosine(step, total_steps, args.weight_decay,
                                                           args.weight_decay_end)  # weights only
        inputs, lab_targets = [], None
        if labelled is not None:  # labelled batch, extended by one mixed copy (its targets mixed too)
            lab_images, lab_labels = labelled.batch(step)
            x = augment["labelled"](lab_images)
            lab_targets = F.one_hot(lab_labels, args.num_clusters).float()
            if args.mix_labelled:
                mixed, lam = mix_pair(x, x)
                mixed_labels = mixed_targets(lab_targets, lab_targets, lam)
                x, lab_targets = torch.cat([x, mixed]), torch.cat([lab_targets, mixed_labels])
            inputs.append(x)
        views = []
        if not args.supervised_only:
            views = ([augment["global"][i % 2](images) for i in range(args.global_crops)]
                     + [augment["local"](images) for _ in range(args.local_crops)])
        # one forward, consecutive crops of one size together: labelled, globals, locals
        with common.autocast(device, args.amp):
            outputs = model(inputs + views)
        parts = list(outputs.split([len(x) for x in inputs + views]))
        lab_outputs = parts.pop(0) if inputs else None
        losses, loss = {}, 0.0
        if views:
            with torch.no_grad(), common.autocast(device, args.amp):  # the teacher sees the global crops
                teacher_outputs = list(teacher(views[:args.global_crops]).split(len(images)))
            w_u, w_l = loss_weights(len(images), len(views), len(inputs[0]) if inputs else 0)
            losses["unlabelled_loss"] = dino_loss(parts, teacher_outputs, centre, args.student_temperature,
                                                  temperature)
            loss = w_u * losses["unlabelled_loss"]
        else:
            w_l = 1.0
        if lab_outputs is not None:
            losses["labelled_loss"] = F.cross_entropy(lab_outputs.float() / args.student_temperature,
                                                      lab_targets, label_smoothing=args.label_smoothing)
            loss = loss + w_l * losses["labelled_loss"]
            n = len(lab_labels)
            meter.add(labelled_acc=(lab_outputs[:n].argmax(1) == lab_labels).float().mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if epoch < args.freeze_last_layer:  # DINO: the last layer fixed at the start
            for p in raw_model.last_layer.parameters():
                p.grad = None
        optimizer.step()
        if teacher is not None:
            ema_update(teacher, raw_model, cosine(step, total_steps, args.teacher_momentum, 1.0))
        if views:
            update_centre(centre, teacher_outputs, args.centre_momentum)
        progress["step"] += 1
        meter.add(loss=loss, **losses)
        images_seen += len(images) * common.world_size()
    return meter, images_seen


# ================================================================================================
# Evaluation
# ================================================================================================
@torch.no_grad()
def evaluate(raw_model, teacher, test_data, prepare, args):
    """The head's argmax on the test split, the teacher's under "test_" (the student's when there is no
    teacher, --supervised-only) and the student's under "student_": top-1 (output k = class k) when the
    run has labels, and ACC / NMI / ARI (Hungarian, or majority mapping with more outputs than classes)."""
    result = {}
    nets = (("test", teacher), ("student", raw_model)) if teacher is not None else (("test", raw_model),)
    for name, net in nets:
        outputs, labels = common.extract_features(net, test_data, prepare, args.eval_batch_size, args.amp)
        pred = outputs.argmax(1)
        metrics = common.clustering_metrics(pred, labels, args.num_clusters, test_data.num_classes)
        result.update({f"{name}_{k}": v for k, v in metrics.items() if k in ("acc", "nmi", "ari")})
        if args.labels_per_class != 0:
            result[f"{name}_top1"] = (pred == labels).float().mean().item()
        if name == "test":
            result["test_confusion"] = metrics["confusion"]
    return result


@torch.no_grad()
def representation_scores(net, train_data, test_data, prepare, args):
    """DINO's representation on the teacher's backbone features: weighted kNN top-1 (k, T; NPID / DINO
    protocol) and a linear probe's top-1 on the test split."""
    backbone, size = net.backbone, args.eval_batch_size
    train_f, train_l = common.extract_features(backbone, train_data, prepare, size, args.amp)
    test_f, test_l = common.extract_features(backbone, test_data, prepare, size, args.amp)
    knn = common.knn_predict(train_f, train_l, test_f, train_data.num_classes, args.knn_k,
                             args.knn_temperature)
    result = {"knn_top1": (knn == test_l).float().mean().item()}
    if args.probe_epochs:
        result["probe_top1"] = common.linear_probe(train_f, train_l, test_f, test_l, train_data.num_classes,
                                                   args.probe_epochs)
    return result


# ================================================================================================
# Main
# ================================================================================================
def main(argv=None):
    # --- set-up
    args = parse_args(argv)
    device = common.setup_device(args.device)
    common.init_distributed(device)
    common.seed_everything(args.seed, args.deterministic)  # the same initial network on every rank
    train_data, test_data, labelled_indices = load_data(args, device)
    channels = train_data.images.shape[1] if isinstance(train_data, common.TensorImages) else 3
    backbone = common.build_backbone(args.backbone, channels, shortcut="conv", width=args.width)
    if args.backbone.startswith("vit"):
        backbone = MultiResolutionViT(backbone)
    raw_model = DainoNet(backbone, args.hidden_dim, args.bottleneck_dim, args.num_clusters,
                         args.norm_last_layer, args.head_bn)
    if args.init_from:
        load_weights(raw_model, args.init_from)
    if args.sync_bn and common.world_size() > 1 and device.type == "cuda":
        raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    raw_model = raw_model.to(device, memory_format=common.memory_format(device))
    teacher = None if args.supervised_only else copy.deepcopy(raw_model).requires_grad_(False)
    if common.rank():
        common.seed_everything(args.seed + common.rank(), args.deterministic)  # own augmentation draws
    augment, prepare = make_transforms(args, train_data, device)
    labelled = (LabelledBatches(train_data, labelled_indices, args.labelled_batch_size, args.seed)
                if labelled_indices is not None else None)
    run = common.Run("daino", args)  # once the data is there: no empty runs
    what = "DINO" if labelled is None else f"{len(labelled_indices)} labelled images"
    run.print(f"run: {run.path} | {args.dataset}: {len(train_data)} images, {what}, K={args.num_clusters} | "
              f"device {device} x {common.world_size()}")

    # --- resume
    centre = torch.zeros(1, args.num_clusters, device=device)
    progress = {"step": 0}  # the step (lr, weight decay, teacher momentum, labelled loader)
    optimizer = make_optimizer(raw_model, args)
    objects = dict(model=raw_model, optimizer=optimizer, centre=centre, progress=progress)
    if teacher is not None:
        objects["teacher"] = teacher
    start = run.resume("train", args.epochs, **objects)
    model = common.wrap_model(raw_model, device, args.compile)

    # --- training
    for epoch in range(start, args.epochs):
        t0 = time.time()
        raw_model.train()
        meter, images_seen = train_one_epoch(model, optimizer, train_data, augment, args, epoch, run, device,
                                             raw_model, teacher, centre, progress, labelled)
        metrics = meter.averages(epoch, run)  # waits for the device, so the time below is complete
        seconds = time.time() - t0
        metrics.update(lr=optimizer.param_groups[0]["lr"],
                       teacher_temperature=teacher_temperature(epoch, args))
        metrics.update(evaluate(raw_model, teacher, test_data, prepare, args))
        run.end_epoch(epoch, metrics, images_seen, seconds)

    # --- final evaluation
    result = evaluate(raw_model, teacher, test_data, prepare, args)
    if labelled is None:
        result.update(representation_scores(teacher, train_data, test_data, prepare, args))
    result = {k: v.tolist() if "confusion" in k else v for k, v in result.items()}
    run.finish({**result, "epochs": args.epochs})
    top1 = (f"top-1 {result['test_top1']:.4f}" + (f" (student {result['student_top1']:.4f})"
                                                  if "student_top1" in result else "") + " | "
            if "test_top1" in result else "")
    knn = (f" | kNN top-1 {result['knn_top1']:.4f}" + (f" | probe top-1 {result['probe_top1']:.4f}"
                                                       if "probe_top1" in result else "")
           if "knn_top1" in result else "")
    who = "student" if teacher is None else "teacher"
    run.print(f"final (test, {who}): {top1}{common.format_scores(result, 'test_')}{knn}")


if __name__ == "__main__":
    common.run_main(main)
