"""Suave: semi-supervised SwAV with the prototypes as the classifier; SwAV is its label-free case.

Enrico Fini, Pietro Astolfi, Karteek Alahari, Xavier Alameda-Pineda, Julien Mairal, Moin Nabi, Elisa
Ricci, "Semi-supervised learning made simple with self-supervised clustering", CVPR 2023,
arXiv:2306.07483; official code: github.com/pietroastolfi/suave-daino (ImageNet only). SwAV: Caron et
al., NeurIPS 2020, arXiv:2006.09882, github.com/facebookresearch/swav.

A backbone and a projection MLP embed every crop on the unit sphere; the prototypes, one per class,
score it. Unlabelled images: the two global crops' scores, with a queue of past embeddings, are turned
into balanced soft assignments by Sinkhorn-Knopp, and every other crop predicts them (SwAV's swapped
prediction). Labelled images: cross-entropy of the same scores against the labels, so the prototypes
are the classifier. MixUp/CutMix extend both batches. --labels-per-class 0 is plain SwAV.

Reproduce (CIFAR-100, the supplementary's recipe, after a 500-epoch SwAV run of this file):
  python suave.py --dataset cifar100 --labels-per-class 0 --out-dir runs/swav-c100 --compile
  python suave.py --dataset cifar100 --labels-per-class 25 --init-from runs/swav-c100 --compile
  paper: CIFAR-100 table not in our sources. here: not run yet (no GPU); a small CPU run on
  CIFAR-10 and the prepared GPU commands are in benchmarks/suave.md.

Deviations (each a flag where it is a choice):
  - where no source says (CIFAR): CIFAR ResNet-18 with 1x1-conv shortcuts, 32 px global / 18 px local
    crops, queue 3840 from epoch 0, 5 warm-up epochs, labelled views cropped (0.08-1) to 32 px, no blur
  - --labels-per-class 0 (SwAV) takes solo-learn's CIFAR SwAV recipe (3000 prototypes, queue 3840
    from epoch 50, prototypes frozen 2 epochs, eps 0.05, LARS 0.6 x batch / 256, trust 0.02, lr
    clipping, biases and norms excluded, wd 1e-6, 10 warm-up epochs, two 32 px crops) for 500 epochs
  - augmentation runs batched on the device; image folders are decoded to their 224 px centre crop
    and every crop is taken from it (official: from the whole image)
  - colour jitter s is ColorJitter(s, s, s, s / 4) (fine-tuning's labelled hue: 0.025, official 0.1)
  - the mixed unlabelled loss is weighted by the number of mixed views (official code), not images
  - SyncBatchNorm only on CUDA under torchrun (torch has no CPU SyncBatchNorm)
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
# smoothing, LARS lr and wd, epsilon, momentum encoder, local-crop mixing; "all the other
# hyper-parameters are kept the same" as ImageNet's Sec. 1.1) and ImageNet-1k (Sec. 1.1). Decided
# here where no source says (stated in the header): network, crop sizes, labels per class, queue.
PAPER_DEFAULTS = {
    "cifar100": dict(batch_size=128, labelled_batch_size=100, epochs=200, global_scale=[0.6, 1.0],
                     local_crops=4, local_scale=[0.1, 0.6], label_smoothing=0.01, lr=2.8,
                     weight_decay=3e-6, epsilon=0.086, ema=0.99, mix_unlabelled="all",
                     backbone="resnet18", global_size=32, local_size=18, labels_per_class=25, blur=0.0),
    "imagefolder": dict(batch_size=256, labelled_batch_size=128, epochs=100, lr=0.4, warmup_epochs=5,
                        final_lr=0.001, weight_decay=1e-6, epsilon=0.05, queue_length=3840,
                        global_size=224, global_scale=[0.14, 1.0], local_crops=8, local_size=96,
                        local_scale=[0.08, 0.14], jitter=0.8, blur=0.5, labelled_jitter=0.4,
                        labelled_scale=[0.08, 1.0], mix_unlabelled="globals", ema=0.0,
                        backbone="resnet50-imagenet", label_fraction=0.1),
    # Not in the paper: a CPU demo of about half a minute. Narrow network, 16 px crops, small batches
    # (62 steps an epoch) and no queue (a queue of embeddings from a few steps back slows SwAV this
    # early); no colour jitter, which would move the hue, one of the shape classes' cues.
    "synthetic": dict(batch_size=32, labelled_batch_size=10, epochs=5, global_scale=[0.3, 1.0],
                      local_crops=0, local_scale=[0.1, 0.3], label_smoothing=0.01, lr=4.0,
                      weight_decay=1e-5, epsilon=0.05, ema=0.0, mix_unlabelled="globals",
                      backbone="resnet18", width=8, global_size=16, local_size=8, labels_per_class=4,
                      blur=0.0, jitter=0.0, labelled_jitter=0.0, labelled_grayscale=0.0, hidden_dim=64,
                      feature_dim=32, queue_length=0, warmup_epochs=1),
}
PAPER_DEFAULTS["cifar10"] = PAPER_DEFAULTS["cifar100"]  # the issue: CIFAR-100's recipe on CIFAR-10
# Sec. 1.1's text and the official code, for every dataset; the official SwAV-style augmentation.
SHARED_DEFAULTS = dict(hidden_dim=2048, feature_dim=128, temperature=0.1, sinkhorn_iterations=3,
                       label_smoothing=0.01, momentum=0.9, lars_eta=0.001, lars_exclude=False,
                       lars_clip=False, warmup_epochs=5, final_lr=0.001, queue_length=3840, queue_start=0,
                       freeze_prototypes_epochs=0, jitter=0.4, labelled_jitter=0.4, labelled_grayscale=0.2,
                       labelled_scale=[0.08, 1.0], global_crops=2, width=64, mix_labelled=True,
                       sync_bn=True, knn_k=200, knn_temperature=0.1, probe_epochs=100)
# --labels-per-class 0 on CIFAR: solo-learn's SwAV recipe (scripts/pretrain/cifar/swav.yaml), 500
# epochs as the supplementary's SwAV initialisation; lr None = 0.6 x total batch / 256.
SWAV_DEFAULTS = dict(num_clusters=3000, queue_length=3840, queue_start=50, freeze_prototypes_epochs=2,
                     epsilon=0.05, lr=None, lars_eta=0.02, lars_exclude=True, lars_clip=True,
                     weight_decay=1e-6, warmup_epochs=10, final_lr=0.0, epochs=500, batch_size=256, ema=0.0,
                     mix_unlabelled="none", mix_labelled=False, local_crops=0, global_scale=[0.08, 1.0],
                     jitter=0.8, blur=0.0)
# --finetune-from RUN: the short stage of Sec. 1.1 (5 epochs at 10 % of the labels, 3 at 1 %).
FINETUNE_DEFAULTS = dict(epochs=5, lr=0.02, final_lr=0.0002, warmup_epochs=0, local_crops=0,
                         global_scale=[0.08, 1.0], jitter=0.0, blur=0.0, labelled_jitter=0.1,
                         labelled_grayscale=0.0, queue_start=0)
# Flags that may change on --resume: extend the schedule, lower the learning rate after a divergence.
RESUMABLE = ("epochs", "lr")


def dataset_defaults(dataset, swav=False, finetune=False):
    """The dataset's row over the shared settings, then the SwAV or fine-tuning recipe when asked.
    Datasets without a row take CIFAR-100's recipe."""
    row = {**SHARED_DEFAULTS, **PAPER_DEFAULTS.get(dataset, PAPER_DEFAULTS["cifar100"])}
    if swav:
        row.update(SWAV_DEFAULTS, labels_per_class=0)
        if dataset == "synthetic":  # the CPU demo's sizes (the clipping's cap lr at 0.01), SwAV's settings
            row.update(epochs=2, batch_size=32, queue_length=0, queue_start=0, warmup_epochs=1,
                       freeze_prototypes_epochs=1, num_clusters=30, jitter=0.0, lr=0.01)
        if dataset == "imagefolder":
            row.update(global_scale=[0.14, 1.0], local_crops=8, blur=0.5)
    if finetune:
        row.update(FINETUNE_DEFAULTS)
    return row


# ================================================================================================
# Command line
# ================================================================================================
def peek(argv):
    """The flags that choose the defaults' recipe, read before the full parse (for --help too)."""
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--dataset", "--labels-per-class", "--label-fraction", "--label-file", "--finetune-from"):
        pre.add_argument(flag)
    return pre.parse_known_args(argv)[0]


def parse_args(argv=None):
    seen = peek(argv)
    dataset = seen.dataset or "cifar100"
    count = (seen.labels_per_class or "").strip()
    swav = count.isdigit() and int(count) == 0  # as the parser reads it: 00 is 0 too
    defaults = dataset_defaults(dataset, swav, bool(seen.finetune_from))
    if seen.label_fraction or seen.label_file:  # another way of choosing the labels was given
        defaults.update(labels_per_class=None, label_fraction=None)
    elif count:  # labels chosen per class: not the row's default fraction (ImageNet's 10 %)
        defaults.update(label_fraction=None)
    recipe = ("solo-learn's SwAV recipe (--labels-per-class 0)" if swav else
              "the fine-tuning stage of Sec. 1.1" if seen.finetune_from else "Sec. 1 of the supplementary")
    p = common.ArgumentParser(
        description="Suave (Fini et al., CVPR 2023): semi-supervised SwAV; --labels-per-class 0 is SwAV.",
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
                   "= 400 / 2,500 / 10,000 labels); 0 = no labels: SwAV pre-training")
    g.add_argument("--label-fraction", type=common.open_fraction,
                   help="share of each class that is labelled (ImageNet: 0.01 or 0.1)")
    g.add_argument("--label-file",
                   help="a file of labelled image names, one a line (the standard ImageNet 1 %% / 10 %% "
                   "lists)")
    g.add_argument("--labelled-batch-size", type=common.positive_int,
                   help="labelled images per step and device, before the mixed copy (supplementary)")
    g.add_argument("--supervised-only", action=b, default=False,
                   help="the baseline: the same network, labelled batches and schedule without the "
                   "unlabelled images (not in the paper)")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "resnet50-imagenet"],
                   help="CIFAR ResNets have a 3x3 stem and 1x1-conv shortcuts; resnet50-imagenet is "
                   "torchvision's (supplementary: ResNet-50 on ImageNet)")
    g.add_argument("--width", type=common.positive_int, help="CIFAR ResNet stem width (64; smaller for CPUs)")
    g.add_argument("--hidden-dim", type=common.positive_int, help="projection hidden size (supplementary)")
    g.add_argument("--feature-dim", type=common.positive_int, help="projection output size (supplementary)")
    g.add_argument("--num-clusters", type=common.positive_int,
                   help="prototypes, K (default: the number of classes; SwAV: 3000, solo-learn)")
    g.add_argument("--init-from", metavar="RUN",
                   help="initialise the backbone from a run directory of this file (e.g. SwAV) or from "
                   "the official SwAV checkpoint file (its projection head and prototypes are not loaded)")
    g.add_argument("--finetune-from", metavar="RUN",
                   help="fine-tune a run of this file (backbone and projection; prototypes re-initialised) "
                   "with the short stage of Sec. 1.1; its defaults change with it")
    g.add_argument("--sync-bn", action=b, help="SyncBatchNorm under torchrun on CUDA (official code)")
    g = p.add_argument_group("swapped prediction (SwAV, Sec. 1.1 of the supplementary)")
    g.add_argument("--epsilon", type=common.positive_float, help="Sinkhorn-Knopp's entropic regulariser")
    g.add_argument("--sinkhorn-iterations", type=common.positive_int, help="Sinkhorn-Knopp iterations")
    g.add_argument("--temperature", type=common.positive_float, help="tau of the predictions' softmax")
    g.add_argument("--queue-length", type=common.non_negative_int,
                   help="past global-crop embeddings scored with the batch in Sinkhorn (rounded down to "
                   "a multiple of the total batch); 0 = no queue")
    g.add_argument("--queue-start", type=common.non_negative_int, help="epoch from which the queue fills")
    g.add_argument("--freeze-prototypes-epochs", type=common.non_negative_int,
                   help="epochs during which the prototypes get no update (SwAV)")
    g.add_argument("--label-smoothing", type=common.fraction, help="of the labelled cross-entropy")
    g.add_argument("--ema", type=common.fraction,
                   help="base momentum of an EMA encoder that makes the Sinkhorn targets, ramped to 1 on "
                   "a cosine; 0 = none (CIFAR-100: 0.99)")
    g = p.add_argument_group("crops and augmentation")
    g.add_argument("--global-crops", type=common.positive_int,
                   help="global crops of each unlabelled image; their assignments are the targets")
    g.add_argument("--global-size", type=common.positive_int, help="global crop side in pixels")
    g.add_argument("--global-scale", type=common.area_fraction, nargs=2, metavar=("MIN", "MAX"),
                   help="area range of the global crops")
    g.add_argument("--local-crops", type=common.non_negative_int, help="local crops of each unlabelled image")
    g.add_argument("--local-size", type=common.positive_int, help="local crop side in pixels")
    g.add_argument("--local-scale", type=common.area_fraction, nargs=2, metavar=("MIN", "MAX"),
                   help="area range of the local crops (the official code: 0.05-0.14 on ImageNet)")
    g.add_argument("--jitter", type=common.non_negative_float,
                   help="colour jitter strength s of unlabelled crops, ColorJitter(s, s, s, s/4) with p 0.8 "
                   "and grayscale 0.2; 0 = no colour change (SwAV: 0.8)")
    g.add_argument("--blur", type=common.probability, help="Gaussian blur probability of unlabelled crops")
    g.add_argument("--labelled-scale", type=common.area_fraction, nargs=2, metavar=("MIN", "MAX"),
                   help="area range of the labelled crops (Inception crop)")
    g.add_argument("--labelled-jitter", type=common.non_negative_float,
                   help="colour jitter strength of labelled images, p 0.8")
    g.add_argument("--labelled-grayscale", type=common.probability,
                   help="grayscale probability of labelled images")
    g.add_argument("--mix-labelled", action=b,
                   help="extend the labelled batch with one MixUp or CutMix copy (supplementary)")
    g.add_argument("--mix-unlabelled", choices=["none", "globals", "all"],
                   help="mix unlabelled crops in pairs: the global pair (ImageNet) or every pair (CIFAR-100)")
    g = p.add_argument_group("optimisation (LARS, linear warm-up then cosine)")
    g.add_argument("--epochs", type=common.positive_int, help="epochs over the unlabelled images")
    g.add_argument("--batch-size", type=common.positive_int, help="unlabelled images per step and device")
    g.add_argument("--lr", type=common.positive_float,
                   help="peak learning rate (SwAV: 0.6 x total batch / 256, solo-learn)")
    g.add_argument("--final-lr", type=common.non_negative_float, help="learning rate at the cosine's end")
    g.add_argument("--warmup-epochs", type=common.non_negative_int, help="linear warm-up from 0")
    g.add_argument("--weight-decay", type=common.non_negative_float, help="weight decay")
    g.add_argument("--momentum", type=common.fraction, help="LARS momentum (official code)")
    g.add_argument("--lars-eta", type=common.positive_float, help="LARS trust coefficient")
    g.add_argument("--lars-exclude", action=b,
                   help="biases and norms get neither LARS adaptation nor decay (solo-learn's SwAV)")
    g.add_argument("--lars-clip", action=b,
                   help="cap each parameter's adapted lr at --lr (solo-learn's clip_lr, SwAV)")
    g = p.add_argument_group("evaluation of --labels-per-class 0 runs (SwAV)")
    g.add_argument("--knn-k", type=common.positive_int, help="weighted kNN on backbone features: neighbours")
    g.add_argument("--knn-temperature", type=common.positive_float, help="weighted kNN: temperature")
    g.add_argument("--probe-epochs", type=common.non_negative_int, help="linear probe epochs; 0 = none")
    common.add_run_arguments(p, "suave")
    p.set_defaults(**defaults)
    return common.parse_arguments(p, argv, "suave.py", check_args, RESUMABLE)


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
        p.error(f"{views} crop: swapped prediction needs another crop to predict from; add --local-crops")
    if args.mix_unlabelled != "none" and args.global_crops != 2:
        p.error(f"--mix-unlabelled mixes the pair of global crops: --global-crops {args.global_crops} "
                "is not 2")
    if args.mix_unlabelled == "all" and args.local_crops % 2:
        p.error(f"--mix-unlabelled all mixes crops in pairs: --local-crops {args.local_crops} is odd")
    for flag in ("global_scale", "local_scale", "labelled_scale"):
        low, high = getattr(args, flag)
        if low > high:
            p.error(f"--{flag.replace('_', '-')} {low} {high}: the minimum is above the maximum")
    if args.labels_per_class == 0 and args.supervised_only:
        p.error("--supervised-only needs labels: --labels-per-class is 0")
    if args.supervised_only and not args.mix_labelled and args.labelled_batch_size < 2:
        p.error("the projection's BatchNorm normalises over the batch: it would see 1 labelled image a "
                "step; raise --labelled-batch-size or add --mix-labelled")
    if args.init_from and args.finetune_from:
        p.error("--init-from and --finetune-from exclude each other (fine-tuning loads the whole network)")
    if args.lr is None:  # SwAV: solo-learn's linear scaling rule
        args.lr = 0.6 * args.batch_size * int(os.environ.get("WORLD_SIZE", 1)) / 256


# ================================================================================================
# Model
# ================================================================================================
class SuaveNet(nn.Module):
    """backbone -> projection (Linear, BN, ReLU, Linear) -> L2 normalisation -> prototypes, a bias-free
    linear layer of K rows kept at unit norm (`normalize_prototypes`), so the scores are cosines."""

    def __init__(self, backbone, hidden_dim, feature_dim, num_prototypes):
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Sequential(nn.Linear(backbone.feature_dim, hidden_dim),
                                        nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_dim, feature_dim))
        self.prototypes = nn.Linear(feature_dim, num_prototypes, bias=False)

    def forward(self, views):
        """A batch float (B, C, H, W): its prototype scores (B, K). A list of batches: the embeddings z
        (N, D) and scores (N, K) of all of them in order; consecutive batches of one size go through
        the backbone together (SwAV's multi-crop forward: one BatchNorm batch per resolution)."""
        if torch.is_tensor(views):
            return self.prototypes(F.normalize(self.projection(self.backbone(views)), dim=1))
        groups, start = [], 0
        for end in range(1, len(views) + 1):
            if end == len(views) or views[end].shape[-2:] != views[start].shape[-2:]:
                groups.append(self.backbone(torch.cat(views[start:end])))
                start = end
        z = F.normalize(self.projection(torch.cat(groups)), dim=1)
        return z, self.prototypes(z)


@torch.no_grad()
def normalize_prototypes(model):
    """Rows of the prototype matrix back to unit L2 norm, before every step (official code)."""
    w = model.prototypes.weight
    w.copy_(F.normalize(w, dim=1))


def map_official_swav(state):
    """The official SwAV / Suave ResNet-50 checkpoint ({"state_dict": ...} or the dict itself, keys
    "module.conv1.weight", ..., "module.projection_head.*", "module.prototypes.weight") -> the weights
    of torchvision's ResNet-50 (same layer names, no "module." prefix); projection head and
    prototypes are dropped, as Suave's start from SwAV does (official code, init_proj false)."""
    state = state.get("state_dict", state)
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if not key.startswith(("projection_head.", "prototypes.")):
            out[key] = value
    return out


def load_weights(raw_model, path, finetune):
    """--init-from: the backbone of a run directory of this file, or of the official SwAV checkpoint
    file; --finetune-from: a run's backbone and projection (its prototypes are re-initialised)."""
    source = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    flag = "--finetune-from" if finetune else "--init-from"
    try:
        saved = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as error:
        raise common.Abort(f"{flag} {path}: cannot read {source} ({type(error).__name__})") from None
    try:
        if isinstance(saved, dict) and "objects" in saved:  # a run of this file
            keep = ("backbone.", "projection.") if finetune else ("backbone.",)
            weights = {k: v for k, v in saved["objects"]["model"].items() if k.startswith(keep)}
        elif finetune or not isinstance(saved, dict):
            raise common.Abort(f"{flag} {path}: not a run of suave.py (no checkpoint.pt of this project)")
        else:
            keep, weights = ("backbone.",), {"backbone." + k: v for k, v in map_official_swav(saved).items()}
    except (AttributeError, KeyError, TypeError) as error:
        raise common.Abort(f"{flag} {path}: neither a run of this project nor a SwAV checkpoint "
                           f"({type(error).__name__}: {error})") from None
    expected = {k: v for k, v in raw_model.state_dict().items() if k.startswith(keep)}
    wrong = [k for k, v in expected.items()
             if not torch.is_tensor(weights.get(k)) or weights[k].shape != v.shape]
    if wrong or len(weights) != len(expected):
        k = wrong[0] if wrong else next(k for k in weights if k not in expected)
        raise common.Abort(f"{flag} {path}: its weights do not fit this network ({k}); check --backbone "
                           "and --width")
    raw_model.load_state_dict(weights, strict=False)


# ================================================================================================
# Method: Sinkhorn-Knopp assignments and the queue (SwAV, Caron et al. 2020, Sec. 3.1 and App. A.1)
# ================================================================================================
@torch.no_grad()
def sinkhorn(scores, epsilon, iterations):
    """Soft assignments of the rows of `scores` (N, K, this rank's share) to the K prototypes with equal
    prototype shares: Q = exp(S / eps)^T (K x N_total), Q /= sum Q, then `iterations` times rows
    /= row sums and /= K, columns /= column sums and /= N_total; returns N_total Q^T (N, K), rows
    summing to 1 (SwAV Eq. 3 and its official distributed_sinkhorn). fp32, sums over all ranks."""
    q = torch.exp(scores.float() / epsilon).t()
    n, k = q.shape[1] * common.world_size(), q.shape[0]
    q /= common.all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= common.all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    return (q * n).t()


@torch.no_grad()
def push_queue(queue, z):
    """Shift the queue (L, D) by len(z) rows and put z (B, D) first, newest first (official code)."""
    queue[len(z):] = queue[:-len(z)].clone()
    queue[:len(z)] = z


def targets(scores, z, prototypes, queue, progress, args):
    """Sinkhorn targets q_a (B, K) of each global crop a from its detached scores (B, K), scored
    together with the past embeddings of its queue once the queue is full; then the batch's
    embeddings z_a (B, D) enter the queue (official code: scored before it is updated). The queue
    (G, L, D) holds every rank's embeddings, gathered, so that a checkpoint holds all of it; each
    rank scores its own rows, which are the official per-GPU queue of L / world rows."""
    q = []
    use_queue = queue is not None and progress["queued"] >= queue.shape[1]
    world, batch = common.world_size(), len(z[0])
    for a, (s, za) in enumerate(zip(scores, z)):
        s = s.detach().float()
        if use_queue:  # this rank's rows: the official per-GPU queue
            own = queue[a].view(-1, world, batch, queue.shape[-1])[:, common.rank()].flatten(0, 1)
            s = torch.cat([own @ prototypes.detach().float().t(), s])
        if queue is not None:
            push_queue(queue[a], common.all_gather_cat(za.detach().float()))
        q.append(sinkhorn(s, args.epsilon, args.sinkhorn_iterations)[-batch:])
    if queue is not None:
        progress["queued"] += batch * world
    return q


# ================================================================================================
# Method: the losses (Suave Sec. 3 and the official code's weighting)
# ================================================================================================
def soft_cross_entropy(q, scores, temperature):
    """-mean_b sum_k q_bk log softmax(s_b / tau)_k, in fp32."""
    return -(q * F.log_softmax(scores.float() / temperature, dim=1)).sum(1).mean()


def swapped_prediction_loss(q, view_scores, temperature):
    """SwAV Eq. 1 over multi-crop: the mean over global crops a of the mean over every other crop v of
    the cross-entropy between q_a and softmax(s_v / tau). q: list of (B, K); view_scores: list (V)."""
    total = 0.0
    for a, qa in enumerate(q):
        others = [soft_cross_entropy(qa, s, temperature) for v, s in enumerate(view_scores) if v != a]
        total = total + sum(others) / len(others)
    return total / len(q)


def mixed_targets(q0, q1, lam):
    """Target of a view mixed as lam x0 + (1 - lam) x1.flip(0): lam q0 + (1 - lam) q1.flip(0)."""
    return lam * q0 + (1 - lam) * q1.flip(0)


def loss_weights(unlabelled, views, labelled, mixed_views):
    """The official code's weighting by share: T = B_u V + B_l + M; (B_u V / T, B_l / T, M / T), with
    B_l counting the extended labelled batch and M the number of mixed unlabelled views."""
    total = unlabelled * views + labelled + mixed_views
    return unlabelled * views / total, labelled / total, mixed_views / total


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
# Method: LARS and the schedules (You et al. 2017; the official code's LARS and cosine schedules)
# ================================================================================================
class LARS(torch.optim.Optimizer):
    """d = g + wd w; d *= eta ||w|| / ||d|| where both norms are positive (else d is kept); mu = m mu + d;
    w -= lr mu. Every parameter is decayed and adapted (official code), or, with exclude_1d, biases and
    norms (1-d tensors) are neither (solo-learn's exclude_bias_n_norm); with clip, the adapted lr is
    capped at lr: the factor becomes min(eta ||w|| / ||d|| / lr, 1) (solo-learn's clip_lr). No
    gradient clipping."""

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


def learning_rate(step, steps_per_epoch, args):
    """Official schedule: np.linspace(0, lr, warm-up steps), then lr_final + (lr - lr_final) / 2
    (1 + cos(pi t / T)) over the remaining T steps."""
    warm, total = args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch
    if step < warm:
        return args.lr * step / max(warm - 1, 1)
    t = step - warm
    cosine = 1 + math.cos(math.pi * t / max(total - warm, 1))
    return args.final_lr + 0.5 * (args.lr - args.final_lr) * cosine


def ema_momentum(step, total_steps, base):
    """DINO's cosine_scheduler(base, 1): 1 - (1 - base) (1 + cos(pi step / total)) / 2."""
    return 1 - (1 - base) * (1 + math.cos(math.pi * step / total_steps)) / 2


@torch.no_grad()
def ema_update(ema, model, momentum):
    """theta_ema = m theta_ema + (1 - m) theta, parameters only (the official code; the EMA encoder's
    BatchNorm keeps its own running statistics)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - momentum)


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
            raise common.Abort(f"--num-clusters {args.num_clusters}: the prototypes are the classifier, "
                               f"one per class ({train.num_classes})")
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
    """uint8 batch -> normalised float batch: `augment[kind]` for "global", "local" and "labelled"
    crops (RandomResizedCrop, flip, colour jitter with p 0.8, grayscale, blur; SwAV's and the
    supplementary's pipelines), `prepare` (no augmentation) for evaluation."""
    memory = common.memory_format(device)

    def finish(x):
        return common.normalize(x, data.mean, data.std).contiguous(memory_format=memory)

    def prepare(x):
        return finish(common.to_float(x))

    def view(size, scale, jitter, grayscale, blur):
        def apply(x):
            x = common.random_resized_crop(common.to_float(x), size, tuple(scale))
            x = common.horizontal_flip(x)
            if jitter:
                x = common.color_jitter(x, jitter, jitter, jitter, jitter / 4, p=0.8)
            if grayscale:
                x = common.random_grayscale(x, grayscale)
            if blur:
                x = common.gaussian_blur(x, blur)
            return finish(x)
        return apply

    gray = 0.2 if args.jitter else 0.0
    augment = {"global": view(args.global_size, args.global_scale, args.jitter, gray, args.blur),
               "local": view(args.local_size, args.local_scale, args.jitter, gray, args.blur),
               "labelled": view(args.global_size, args.labelled_scale, args.labelled_jitter,
                                args.labelled_grayscale, 0.0)}
    return augment, prepare


# ================================================================================================
# Training
# ================================================================================================
def train_one_epoch(model, optimizer, data, augment, args, epoch, run, device, raw_model, ema, queue,
                    progress, labelled):
    """One epoch over the unlabelled images; returns the meter of losses and the number of images."""
    meter, images_seen = common.Meter(), 0
    steps = len(data) // (args.batch_size * common.world_size())
    total_steps = args.epochs * steps
    for _, images, _ in run.batches(data, args.batch_size, epoch, meter):
        step = progress["step"]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, args)
        normalize_prototypes(raw_model)
        if ema is not None:
            normalize_prototypes(ema)
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
        views, mixed, lams = [], [], []
        if not args.supervised_only:
            views = ([augment["global"](images) for _ in range(args.global_crops)]
                     + [augment["local"](images) for _ in range(args.local_crops)])
            pairs = {"none": 0, "globals": 1, "all": len(views) // 2}[args.mix_unlabelled]
            for i in range(pairs):  # the official collate mixes views (0, 1), (2, 3), ...
                m, lam = mix_pair(views[2 * i], views[2 * i + 1])
                mixed.append(m)
                lams.append(lam)
        # one forward, consecutive crops of one size together: labelled, globals, mixed globals, locals
        order = inputs + views[:args.global_crops] + mixed[:1] + views[args.global_crops:] + mixed[1:]
        with common.autocast(device, args.amp):
            z, scores = model(order)
        parts = list(scores.split([len(x) for x in order]))
        lab_scores = parts.pop(0) if inputs else None
        g, mixed_global = args.global_crops, len(mixed[:1])  # 1 when the global pair is mixed
        view_scores = parts[:g] + parts[g + mixed_global:g + mixed_global + args.local_crops]
        mixed_scores = parts[g:g + mixed_global] + parts[g + mixed_global + args.local_crops:]
        losses, loss = {}, 0.0
        if views:
            B = len(images)
            offset = len(inputs[0]) if inputs else 0
            if ema is not None:  # the momentum encoder sees the global crops and makes the targets
                with torch.no_grad(), common.autocast(device, args.amp):
                    z_t, s_t = ema(views[:g])
                target_model = ema
            else:
                z_t, s_t = z[offset:offset + g * B], scores[offset:offset + g * B]
                target_model = raw_model
            q = targets(list(s_t.split(B)), list(z_t.split(B)), target_model.prototypes.weight, queue,
                        progress, args)
            w_u, w_l, w_m = loss_weights(B, len(views), len(inputs[0]) if inputs else 0, len(mixed))
            losses["unlabelled_loss"] = swapped_prediction_loss(q, view_scores, args.temperature)
            loss = w_u * losses["unlabelled_loss"]
            if mixed:
                losses["mixed_loss"] = sum(
                    soft_cross_entropy(mixed_targets(q[0], q[1], lam), s, args.temperature)
                    for lam, s in zip(lams, mixed_scores)) / len(mixed)
                loss = loss + w_m * losses["mixed_loss"]
        else:
            w_l = 1.0
        if lab_scores is not None:
            losses["labelled_loss"] = F.cross_entropy(lab_scores.float() / args.temperature, lab_targets,
                                                      label_smoothing=args.label_smoothing)
            loss = loss + w_l * losses["labelled_loss"]
            n = len(lab_labels)
            meter.add(labelled_acc=(lab_scores[:n].argmax(1) == lab_labels).float().mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if epoch < args.freeze_prototypes_epochs:  # SwAV: prototypes fixed at the start
            raw_model.prototypes.weight.grad = None
        optimizer.step()
        if ema is not None:
            ema_update(ema, raw_model, ema_momentum(step, total_steps, args.ema))
        progress["step"] += 1
        meter.add(loss=loss, **losses)
        images_seen += len(images) * common.world_size()
    return meter, images_seen


# ================================================================================================
# Evaluation
# ================================================================================================
@torch.no_grad()
def evaluate(raw_model, test_data, prepare, args):
    """The prototype argmax on the test split: top-1 (prototype k = class k) when the run has labels,
    and ACC / NMI / ARI (Hungarian, or majority mapping with more prototypes than classes)."""
    scores, labels = common.extract_features(raw_model, test_data, prepare, args.eval_batch_size, args.amp)
    pred = scores.argmax(1)
    metrics = common.clustering_metrics(pred, labels, args.num_clusters, test_data.num_classes)
    result = {f"test_{k}": v for k, v in metrics.items() if k in ("acc", "nmi", "ari")}
    if args.labels_per_class != 0:
        result["test_top1"] = (pred == labels).float().mean().item()
    result["test_confusion"] = metrics["confusion"]
    return result


@torch.no_grad()
def representation_scores(raw_model, train_data, test_data, prepare, args):
    """SwAV's representation on the backbone features: weighted kNN top-1 (k, T; NPID / DINO protocol)
    and a linear probe's top-1 on the test split."""
    train_f, train_l = common.extract_features(raw_model.backbone, train_data, prepare, args.eval_batch_size,
                                               args.amp)
    test_f, test_l = common.extract_features(raw_model.backbone, test_data, prepare, args.eval_batch_size,
                                             args.amp)
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
    raw_model = SuaveNet(backbone, args.hidden_dim, args.feature_dim, args.num_clusters)
    if args.init_from or args.finetune_from:
        load_weights(raw_model, args.init_from or args.finetune_from, bool(args.finetune_from))
    if args.sync_bn and common.world_size() > 1 and device.type == "cuda":
        raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    raw_model = raw_model.to(device, memory_format=common.memory_format(device))
    ema = copy.deepcopy(raw_model).requires_grad_(False) if args.ema else None
    if common.rank():
        common.seed_everything(args.seed + common.rank(), args.deterministic)  # own augmentation draws
    augment, prepare = make_transforms(args, train_data, device)
    labelled = (LabelledBatches(train_data, labelled_indices, args.labelled_batch_size, args.seed)
                if labelled_indices is not None else None)
    run = common.Run("suave", args)  # once the data is there: no empty runs
    what = "SwAV" if labelled is None else f"{len(labelled_indices)} labelled images"
    run.print(f"run: {run.path} | {args.dataset}: {len(train_data)} images, {what}, K={args.num_clusters} | "
              f"device {device} x {common.world_size()}")

    # --- resume
    total_batch = args.batch_size * common.world_size()
    queue_length = args.queue_length - args.queue_length % total_batch  # all ranks' rows
    queue = (torch.zeros(args.global_crops, queue_length, args.feature_dim, device=device)
             if queue_length and not args.supervised_only else None)
    progress = {"step": 0, "queued": 0}  # the step (lr, EMA, labelled loader) and the queue's fill
    optimizer = LARS(raw_model.parameters(), args.lr, args.weight_decay, args.momentum, args.lars_eta,
                     args.lars_exclude, args.lars_clip)
    objects = dict(model=raw_model, optimizer=optimizer, progress=progress)
    objects.update({k: v for k, v in (("ema", ema), ("queue", queue)) if v is not None})
    start = run.resume("train", args.epochs, **objects)
    model = common.wrap_model(raw_model, device, args.compile)

    # --- training
    for epoch in range(start, args.epochs):
        t0 = time.time()
        raw_model.train()
        meter, images_seen = train_one_epoch(model, optimizer, train_data, augment, args, epoch, run, device,
                                             raw_model, ema, queue if epoch >= args.queue_start else None,
                                             progress, labelled)
        metrics = meter.averages(epoch, run)  # waits for the device, so the time below is complete
        seconds = time.time() - t0
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        metrics.update(evaluate(raw_model, test_data, prepare, args))
        run.end_epoch(epoch, metrics, images_seen, seconds)

    # --- final evaluation
    result = evaluate(raw_model, test_data, prepare, args)
    if labelled is None:
        result.update(representation_scores(raw_model, train_data, test_data, prepare, args))
    result = {k: v.tolist() if "confusion" in k else v for k, v in result.items()}
    run.finish({**result, "epochs": args.epochs})
    top1 = f"top-1 {result['test_top1']:.4f} | " if "test_top1" in result else ""
    knn = (f" | kNN top-1 {result['knn_top1']:.4f}" + (f" | probe top-1 {result['probe_top1']:.4f}"
                                                       if "probe_top1" in result else "")
           if "knn_top1" in result else "")
    run.print(f"final (test): {top1}{common.format_scores(result, 'test_')}{knn}")


if __name__ == "__main__":
    common.run_main(main)
