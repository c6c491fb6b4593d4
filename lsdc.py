"""LSD-C: Linearly Separable Deep Clusters.

Sylvestre-Alvise Rebuffi, Sebastien Ehrhardt, Kai Han, Andrea Vedaldi, Andrew Zisserman, "LSD-C:
Linearly Separable Deep Clusters", arXiv:2006.10039, 2020. Official code: github.com/srebuffi/lsd-clusters
(CIFAR-10); the RotNet recipe is the group's AutoNovel code (github.com/k-han/AutoNovel).

A CIFAR ResNet-18 is pre-trained as a RotNet, its stem and first three blocks frozen. In every batch,
samples whose features are close are linked (kNN, cosine or SNE pseudo-labels). A K-way linear head
learns to predict each link as <p_i, p'_j> (p = softmax of the head, p' of a RICAP-mixed view) with
a binary cross-entropy over all pairs, plus a ramped-up MSE between two mixed views. The clusters
are the head's argmax.

Reproduce: python lsdc.py --dataset cifar10 --labeling knn --compile
  paper: 81.7 +- 0.9 % ACC on CIFAR-10 train+test (Table 1 of the paper, 10 seeds).
  here: 82.1 / 75.7 / 70.7 ACC / NMI / ARI, one seed, 28.4 min on one H100 (RotNet 200 epochs +
  LSD-C 220). CPU demo: python lsdc.py --dataset synthetic --device cpu. See benchmarks/lsdc.md.

Deviations from the official code (each a flag where it is a choice):
  - mixed pairwise targets permute the mixed view's axis, as the paper's equation reads
    (--mixed-targets official-code permutes the other axis, as the released code does)
  - the SNE diagonal is masked with -inf (released code: minus 1000)
  - RotNet: LSD-C's normalisation; the lr steps at the epochs given (AutoNovel: one epoch earlier)
  - augmentation runs batched on the device, with torchvision's distributions
  - not given anywhere: MNIST crops RandomCrop(28, 2) without flip; Reuters-10K uses an MLP
    d-500-500-2000 with MixUp and no input augmentation
"""
import argparse
import hashlib
import json
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
# Table 1 of the supplementary, in its column order (optimizer, epochs, LR steps, LR init, ramp-up
# lambda and T, cosine tau, SNE tau and temperature, kNN k); then the labeling the paper reports for
# the dataset and, from the official code, the network, the split (train + test) and the crops.
# None: the paper gives no value for that labeling on that dataset.
PAPER_DEFAULTS = {
    "cifar10": dict(optimizer="sgd", epochs=220, milestones=[140, 180], lr=0.1, rampup_weight=5.0,
                    rampup_length=100, cosine_threshold=0.9, sne_threshold=0.01, sne_temperature=1.0,
                    knn_k=20, labeling="knn", backbone="resnet18", split="all", crop_padding=4,
                    flip=True),
    "cifar100-20": dict(optimizer="sgd", epochs=200, milestones=[170], lr=0.1, rampup_weight=25.0,
                        rampup_length=150, cosine_threshold=0.95, sne_threshold=0.01,
                        sne_temperature=0.5, knn_k=10, labeling="sne", backbone="resnet18",
                        split="all", crop_padding=4, flip=True),
    "stl10": dict(optimizer="sgd", epochs=200, milestones=[140, 180], lr=0.1, rampup_weight=5.0,
                  rampup_length=50, cosine_threshold=None, sne_threshold=0.01, sne_temperature=0.5,
                  knn_k=None, labeling="sne", backbone="resnet18", split="all", crop_padding=12,
                  flip=True),
    "mnist": dict(optimizer="sgd", epochs=15, milestones=[], lr=0.1, rampup_weight=5.0,
                  rampup_length=50, cosine_threshold=None, sne_threshold=None, sne_temperature=None,
                  knn_k=10, labeling="knn", backbone="resnet18", split="all", crop_padding=2,
                  flip=False),
    "reuters10k": dict(optimizer="adam", epochs=75, milestones=[], lr=0.001, rampup_weight=25.0,
                       rampup_length=100, cosine_threshold=None, sne_threshold=None,
                       sne_temperature=None, knn_k=5, labeling="knn", backbone="mlp", split="all",
                       crop_padding=0, flip=False, mix="mixup"),
    # Not in the paper: a CPU demo that learns in one to two minutes. With so few steps the paper's
    # settings stall below 50 % ACC with empty clusters: small batches (RotNet 32, LSD-C 64, with
    # k = 5 so that links stay inside a class of about 6 per batch) give more steps for the same
    # work, and lr 0.15 with only the stem + layer1 frozen lets the features leave the RotNet's
    # partition (with layer2 frozen too, some seeds stay near 0.67 ACC).
    "synthetic": dict(optimizer="sgd", epochs=10, milestones=[8], lr=0.15, rampup_weight=5.0,
                      rampup_length=6, cosine_threshold=0.9, sne_threshold=0.01,
                      sne_temperature=1.0, knn_k=5, labeling="knn", backbone="resnet18",
                      split="all", crop_padding=4, flip=True, width=8, rotnet_epochs=4,
                      rotnet_milestones=[3], batch_size=64, rotnet_batch_size=32, frozen_blocks=1),
}
# Shared by every dataset: the clustering stage (the supplementary's text and the official code)
# and RotNet (AutoNovel's recipe).
SHARED_DEFAULTS = dict(batch_size=256, momentum=0.9, mixup_weight_decay=1e-4, lr_gamma=0.1,
                       mix="ricap", mix_beta=0.3, width=64, frozen_blocks=3, rotnet_epochs=200,
                       rotnet_milestones=[60, 120, 160], rotnet_lr=0.1, rotnet_gamma=0.2,
                       rotnet_batch_size=128, rotnet_weight_decay=5e-4)
LABELING_PARAMS = {"knn": ["knn_k"], "cosine": ["cosine_threshold"],
                   "sne": ["sne_threshold", "sne_temperature"]}
# Flags that may change on --resume: extend the schedule, lower a learning rate after a divergence.
RESUMABLE = ("epochs", "lr", "rotnet_lr")


def dataset_defaults(dataset):
    """The Table 1 row of `dataset` over the shared settings. Other datasets of common.py take
    CIFAR-10's optimisation settings but no labeling threshold (those must be given), and cluster
    train + test, or the train split of a long-tailed dataset."""
    if dataset in PAPER_DEFAULTS:
        return {**SHARED_DEFAULTS, **PAPER_DEFAULTS[dataset]}
    unset = dict(cosine_threshold=None, sne_threshold=None, sne_temperature=None, knn_k=None)
    # a long-tailed dataset has no split "all": the balanced test set would dilute its tail
    split = "all" if "all" in common.SPLITS.get(dataset, ("all",)) else "train"
    return {**SHARED_DEFAULTS, **PAPER_DEFAULTS["cifar10"], **unset, "split": split}


# ================================================================================================
# Command line
# ================================================================================================
def parse_args(argv=None):
    dataset = common.peek_dataset(argv, "cifar10")
    p = common.ArgumentParser(
        description="LSD-C (Rebuffi et al., 2020): RotNet pre-training, then LSD-C clustering.",
        epilog=f"Defaults shown are those of --dataset {dataset}: Table 1 of the supplementary "
        "and the official code; `--dataset NAME --help` shows another row. "
        + common.resume_epilog(RESUMABLE))
    b = argparse.BooleanOptionalAction
    p.add_argument("--dataset", default="cifar10",
                   help="cifar10, cifar100-20, stl10, mnist, reuters10k (rows of Table 1) or synthetic "
                   "(CPU demo); any other dataset of common.py with explicit labeling flags")
    p.add_argument("--data-dir", default=common.default_data_dir(),
                   help="dataset folder (default: $DATA_DIR, else ./data)")
    p.add_argument("--reuters-file", help="DEC's preprocessed Reuters-10K, reutersidf10k.npy: a dict "
                   "with 'data' (10000 x 2000 tf-idf) and 'label' (default: <data-dir>/reutersidf10k.npy)")
    p.add_argument("--split", help="data clustered and scored; all = train + test (official code)")
    p.add_argument("--num-clusters", type=common.positive_int,
                   help="K, the head's outputs (default: the number of classes)")
    g = p.add_argument_group("clustering stage (Table 1 of the supplementary)")
    g.add_argument("--labeling", choices=["knn", "cosine", "sne"],
                   help="pairwise pseudo-labels from the features (Sec. 3.1 of the paper)")
    g.add_argument("--knn-k", type=common.positive_int,
                   help="kNN labeling: neighbours per row or column, self included (Table 1)")
    g.add_argument("--cosine-threshold", type=common.cosine, help="cosine labeling: tau (Table 1)")
    g.add_argument("--sne-threshold", type=common.open_fraction,
                   help="SNE labeling: tau, on affinities of at most 1 (Table 1)")
    g.add_argument("--sne-temperature", type=common.positive_float,
                   help="SNE labeling: temperature T (Table 1)")
    g.add_argument("--optimizer", choices=["sgd", "adam"], help="optimizer type (Table 1)")
    g.add_argument("--epochs", type=common.positive_int, help="epochs of the clustering stage (Table 1)")
    g.add_argument("--milestones", type=common.non_negative_int, nargs="*",
                   help="epochs at which the lr is multiplied by --lr-gamma (Table 1's LR steps)")
    g.add_argument("--lr", type=common.positive_float, help="initial learning rate (Table 1)")
    g.add_argument("--lr-gamma", type=common.decay_factor,
                   help="lr factor at each milestone (official code)")
    g.add_argument("--momentum", type=common.fraction, help="SGD momentum (official code)")
    g.add_argument("--weight-decay", type=common.non_negative_float,
                   help="weight decay (default: 5e-4 as the official code, "
                   "or --mixup-weight-decay with --mix mixup)")
    g.add_argument("--mixup-weight-decay", type=common.non_negative_float,
                   help="weight decay with MixUp (the supplementary lowers it to 1e-4)")
    g.add_argument("--rampup-weight", type=common.non_negative_float,
                   help="lambda of the MSE ramp-up (Table 1)")
    g.add_argument("--rampup-length", type=common.non_negative_int,
                   help="T of the MSE ramp-up, in epochs (Table 1)")
    g.add_argument("--batch-size", type=common.positive_int,
                   help="per device; the pairs live inside it (supplementary: 256; Table 5: 64-512)")
    g.add_argument("--mix", choices=["ricap", "mixup", "none"],
                   help="data composition of the two extra views (paper: RICAP)")
    g.add_argument("--mix-beta", type=common.positive_float,
                   help="Beta(beta, beta) of RICAP's sizes and MixUp's weights (supplementary)")
    g.add_argument("--mixed-targets", choices=["paper", "official-code"], default="paper",
                   help="axis the patch permutations act on in the soft pairwise targets: the mixed "
                   "view's (the paper's equation) or the clean view's (the released code)")
    g.add_argument("--mse", action=b, default=True,
                   help="consistency MSE between the two mixed views (Table 2 of the supplementary)")
    g.add_argument("--head", choices=["linear", "mlp"], default="linear",
                   help="clustering head; mlp = the 2-layer head of Table 2 of the supplementary")
    g.add_argument("--frozen-blocks", type=int, choices=[0, 1, 2, 3, 4],
                   help="stem + this many blocks stay frozen (paper: 3; Table 3 compares 2, 3, 4)")
    g.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "mlp"],
                   help="CIFAR ResNet with parameter-free shortcuts (official code); mlp for reuters10k")
    g.add_argument("--width", type=common.positive_int,
                   help="ResNet stem width (64 in the paper; smaller only for CPU runs)")
    g.add_argument("--crop-padding", type=common.non_negative_int,
                   help="RandomCrop padding of the training views (official code)")
    g.add_argument("--flip", action=b, help="random horizontal flips (official code)")
    g = p.add_argument_group("RotNet pre-training (AutoNovel's recipe, Gidaris et al., ICLR 2018)")
    g.add_argument("--rotnet-epochs", type=common.non_negative_int,
                   help="0 = no pre-training: LSD-C on a random network (a control, not in the paper)")
    g.add_argument("--rotnet-milestones", type=common.non_negative_int, nargs="*",
                   help="epochs at which the RotNet lr is multiplied by --rotnet-gamma")
    g.add_argument("--rotnet-lr", type=common.positive_float, help="SGD Nesterov learning rate")
    g.add_argument("--rotnet-gamma", type=common.decay_factor, help="lr factor at each milestone")
    g.add_argument("--rotnet-batch-size", type=common.positive_int,
                   help="images per batch, each in 4 rotations")
    g.add_argument("--rotnet-weight-decay", type=common.non_negative_float, help="weight decay")
    g.add_argument("--rotnet-checkpoint", help="use these RotNet weights instead of pre-training "
                   "(default: reuse <rotnet-dir>/rotnet__<dataset>__... when an earlier run made it)")
    g.add_argument("--rotnet-dir", default="runs/rotnet",
                   help="where pre-trained RotNets are kept for reuse")
    g.add_argument("--rotnet-only", action=b, default=False, help="stop after RotNet pre-training")
    g.add_argument("--kmeans-baseline", action=b, default=False,
                   help="k-means on the RotNet features instead of LSD-C (Table 2, first column)")
    common.add_run_arguments(p, "lsdc")
    p.set_defaults(**dataset_defaults(dataset))
    return common.parse_arguments(p, argv, "lsdc.py", check_args, RESUMABLE)


def check_args(p, args):
    """Combinations of flags that cannot work: refused before anything runs (exit code 2)."""
    known = [*common.DATASETS, "reuters10k"]
    if args.dataset not in known:
        p.error(f"unknown dataset {args.dataset!r}; choose one of {', '.join(known)}")
    if args.dataset != "reuters10k" and args.split not in common.dataset_splits(args.dataset):
        p.error(f"{args.dataset} has no split {args.split!r}; choose one of "
                f"{', '.join(common.dataset_splits(args.dataset))}")
    missing = [k for k in LABELING_PARAMS[args.labeling] if getattr(args, k) is None]
    if missing:
        flags = " and ".join("--" + k.replace("_", "-") for k in missing)
        p.error(f"--labeling {args.labeling} needs {flags}: Table 1 gives no value for {args.dataset}")
    if args.weight_decay is None:
        args.weight_decay = args.mixup_weight_decay if args.mix == "mixup" else 5e-4
    if args.labeling == "knn" and args.knn_k > args.batch_size:
        p.error(f"--knn-k {args.knn_k} is larger than the batch ({args.batch_size}); lower it")
    if args.dataset == "reuters10k" and (args.backbone != "mlp" or args.mix == "ricap"):
        p.error("reuters10k is vector data: use --backbone mlp and --mix mixup or none")
    if args.backbone == "mlp" and args.dataset != "reuters10k":
        p.error("--backbone mlp is for reuters10k; images use a ResNet")
    if args.kmeans_baseline and args.rotnet_only:
        p.error("--kmeans-baseline and --rotnet-only exclude each other")
    if args.dataset == "reuters10k" and (args.kmeans_baseline or args.rotnet_only or args.rotnet_checkpoint):
        p.error("reuters10k has no RotNet stage (MLP on tf-idf vectors)")


# ================================================================================================
# Model
# ================================================================================================
class LSDCNet(nn.Module):
    def __init__(self, backbone, num_outputs, head="linear"):
        super().__init__()
        self.backbone = backbone
        d = backbone.feature_dim
        self.head = (nn.Linear(d, num_outputs) if head == "linear" else
                     nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True),
                                   nn.Linear(d, num_outputs)))

    def forward(self, *views):
        """One view: its logits. Several: the logits of each, run through the network separately
        (BatchNorm statistics per view, as the official code), and the features z of the first.
        One call for all views keeps DistributedDataParallel to one forward per backward."""
        features = [self.backbone(v) for v in views]
        logits = [self.head(z) for z in features]
        return logits[0] if len(views) == 1 else (logits, features[0])


def make_optimizer(model, args):
    """The clustering stage's optimizer over the trainable parameters (Table 1: SGD, or Adam for
    Reuters-10K) and its step schedule (lr x --lr-gamma at each milestone)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=args.lr)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, args.lr_gamma)


def freeze_blocks(backbone, frozen_blocks):
    """Freeze the stem and the first `frozen_blocks` macro-blocks (paper: 3, after RotNet). Their
    BatchNorm layers stay in training mode, as in the official code (model.train() for all)."""
    if frozen_blocks == 0 or not hasattr(backbone, "layer1"):
        return
    blocks = [getattr(backbone, f"layer{i}") for i in range(1, frozen_blocks + 1)]
    for module in [backbone.conv1, backbone.bn1, *blocks]:
        module.requires_grad_(False)


# ================================================================================================
# Method: pairwise pseudo-labels from the detached features z (B, d) of the clean view (Sec. 3.1)
# ================================================================================================
def knn_labels(z, k):
    """s_ij = 1 if D_ij = ||z_i - z_j||^2 is strictly below the k-th smallest distance of row i or of
    column j (self included: D_ii = 0), so each sample links to its k - 1 nearest neighbours, and the
    relation is made symmetric."""
    d = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    kth_of_row = d.kthvalue(k, dim=1, keepdim=True).values
    kth_of_col = d.kthvalue(k, dim=0, keepdim=True).values
    return ((d < kth_of_row) | (d < kth_of_col)).float()


def cosine_labels(z, tau):
    """s_ij = 1[cos(z_i, z_j) >= tau]."""
    zn = F.normalize(z, dim=1)
    return (zn @ zn.T >= tau).float()


def sne_labels(z, tau, temperature):
    """A_ij = -||(z_i - z_j) / T||^2 with the diagonal masked; P = 1/2 softmax_rows(A)
    + 1/2 softmax_cols(A) + I (a symmetrised SNE affinity); s_ij = 1[P_ij > tau]."""
    zt = z / temperature
    a = -torch.cdist(zt, zt, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    eye = torch.eye(len(z), device=z.device, dtype=torch.bool)
    a = a.masked_fill(eye, float("-inf"))
    p = 0.5 * a.softmax(1) + 0.5 * a.softmax(0) + eye.float()
    return (p > tau).float()


def pairwise_labels(z, args):
    z = z.detach().float()
    if args.labeling == "knn":
        return knn_labels(z, args.knn_k)
    if args.labeling == "cosine":
        return cosine_labels(z, args.cosine_threshold)
    return sne_labels(z, args.sne_threshold, args.sne_temperature)


def pair_label_quality(s, labels):
    """Diagnostic only (the ground truth never reaches the loss): of the off-diagonal pairs that the
    pseudo-labels s link, the share of same-class ones (precision), and of the same-class pairs, the
    share that s links (recall)."""
    same = (labels[:, None] == labels[None, :]).float()
    off_diagonal = 1.0 - torch.eye(len(s), device=s.device)
    linked, same = s * off_diagonal, same * off_diagonal
    true_links = (linked * same).sum()
    return true_links / linked.sum().clamp(min=1), true_links / same.sum().clamp(min=1)


# ================================================================================================
# Method: the pairwise loss on mixed views and the consistency ramp-up (Sec. 3.2, Eq. 3)
# ================================================================================================
def mixed_pair_targets(s, mix, axis="paper"):
    """Targets for P_ij = <p_i, p'_j> where the mixed image j holds images perm_k(j) in proportions
    W_k: s~_ij = sum_k W_k s_{i, perm_k(j)} (Sec. 3.2), the permutation acting on the mixed axis.
    axis="official-code" permutes the rows instead, as the released code does."""
    if mix is None:
        return s
    if axis == "official-code":
        return sum(w * s[perm] for w, perm in zip(mix["weights"].tolist(), mix["perms"]))
    return sum(w * s[:, perm] for w, perm in zip(mix["weights"].tolist(), mix["perms"]))


def lsdc_loss(logits_clean, logits_mix1, logits_mix2, targets, mse_weight, eps=1e-7):
    """BCE(P, s~) averaged over all B^2 pairs, P = softmax(f(x1)) softmax(f(mix(x2)))^T, plus
    w(t) * MSE(p', p'') between the two mixed views (Eq. 3 of the paper). Computed in fp32."""
    p, p1, p2 = (lg.float().softmax(1) for lg in (logits_clean, logits_mix1, logits_mix2))
    P = p @ p1.T
    bce = -(targets * torch.log(P + eps) + (1 - targets) * torch.log(1 - P + eps)).mean()
    mse = F.mse_loss(p1, p2)
    return bce + mse_weight * mse, bce, mse


def rampup(epoch, weight, length):
    """w(t) = lambda * exp(-5 (1 - min(t, T) / T)^2) (Laine and Aila's ramp-up), t in epochs from 0."""
    if length == 0:
        return weight
    phase = 1.0 - min(max(epoch, 0), length) / length
    return weight * float(np.exp(-5.0 * phase * phase))


def mse_weight(args, epoch):
    return rampup(epoch, args.rampup_weight, args.rampup_length) if args.mse else 0.0


# ================================================================================================
# Data and augmentation
# ================================================================================================
def load_reuters(path, device):
    """DEC's Reuters-10K (Xie et al., 2016): np.save of {'data': (10000, 2000) tf-idf, 'label': (10000,)}."""
    if not os.path.isfile(path):
        raise common.Abort(f"reuters10k: {path} not found. torchvision cannot download Reuters-10K: "
                           "build reutersidf10k.npy with the DEC repository's make_reuters_data script "
                           "(RCV1-v2, 4 root categories, 2000 most frequent words, tf-idf) and pass "
                           "--reuters-file PATH")
    try:
        raw = np.load(path, allow_pickle=True).item()
        x = torch.as_tensor(np.asarray(raw["data"]), dtype=torch.float32)
        y = torch.as_tensor(np.asarray(raw["label"])).long().flatten()
        assert x.dim() == 2 and len(x) == len(y)
    except Exception as error:
        raise common.Abort(f"reuters10k: {path} is not DEC's format ({type(error).__name__}: {error})")
    return common.TensorImages("reuters10k", x, y, int(y.max()) + 1, None, None).to(device)


def load_data_and_backbone(args, device):
    """The data clustered (args.split), the train split (RotNet) and the test split, and the
    backbone for them; sets args.num_clusters when unset. Sizes are checked here, before a run
    directory exists."""
    if args.dataset == "reuters10k":
        data = load_reuters(args.reuters_file or os.path.join(args.data_dir, "reutersidf10k.npy"), device)
        test_data = train_data = None
        backbone = common.MLP(data.images.shape[1])
    else:
        data = common.load_dataset(args.dataset, args.split, args.data_dir, device)
        train_data = common.load_dataset(args.dataset, "train", args.data_dir, device)
        test_data = common.load_dataset(args.dataset, "test", args.data_dir, device)
        channels = data.images.shape[1] if isinstance(data, common.TensorImages) else 3
        backbone = common.build_backbone(args.backbone, channels, shortcut="pad", width=args.width)
    args.num_clusters = args.num_clusters or data.num_classes
    if args.num_clusters > len(data):
        raise common.Abort(f"--num-clusters {args.num_clusters} is larger than {args.dataset} "
                           f"({len(data)} samples)")
    common.check_batch_size("--batch-size", args.batch_size, len(data), args.dataset)
    if train_data is not None and args.rotnet_epochs:
        common.check_batch_size("--rotnet-batch-size", args.rotnet_batch_size, len(train_data),
                                f"{args.dataset}'s train split")
    return data, train_data, test_data, backbone


def make_transforms(args, data, device):
    """uint8 batch -> normalised float batch: `augment` (RandomCrop with padding + flip) for the
    training views, `prepare` (no augmentation) for evaluation."""
    if data.mean is None:  # vector data: no augmentation
        return (lambda x: x), (lambda x: x)
    memory = common.memory_format(device)

    def prepare(x):
        return common.normalize(common.to_float(x), data.mean, data.std).contiguous(memory_format=memory)

    def augment(x):
        x = common.random_crop(x, x.shape[-1], args.crop_padding) if args.crop_padding else x
        x = common.to_float(x)
        x = common.horizontal_flip(x) if args.flip else x
        return common.normalize(x, data.mean, data.std).contiguous(memory_format=memory)

    return augment, prepare


# ================================================================================================
# Stage: RotNet pre-training (Gidaris et al., ICLR 2018; AutoNovel's recipe)
# ================================================================================================
ROTNET_RECIPE = ["backbone", "width", "rotnet_epochs", "rotnet_milestones", "rotnet_lr", "rotnet_gamma",
                 "rotnet_batch_size", "rotnet_weight_decay", "crop_padding", "flip", "seed"]


def rotnet_path(args, train_data):
    """Where this run's RotNet is kept for reuse: the name holds the dataset and a digest of every
    setting that shapes the pre-training and of the training images themselves, so a changed
    recipe or other data never picks up stale weights."""
    if args.rotnet_checkpoint:
        return args.rotnet_checkpoint
    recipe = {k: getattr(args, k) for k in ROTNET_RECIPE}
    recipe.update(world_size=common.world_size(), data=common.fingerprint(train_data))
    digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    name = (f"rotnet__{args.dataset}__{args.backbone}-w{args.width}__e{args.rotnet_epochs}"
            f"__seed{args.seed}__{digest}.pt")
    return os.path.join(args.rotnet_dir, name)


def load_rotnet_weights(backbone, path, args):
    """Load RotNet backbone weights, or stop with one line saying what the file holds instead."""
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise common.Abort(f"{path} is not a weights file ({type(error).__name__}); pass the RotNet "
                           "weights lsdc.py keeps in --rotnet-dir (runs/rotnet/), not a run's checkpoint.pt"
                           ) from None
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise common.Abort(f"{path} holds a {type(weights).__name__}, not a state dict of network weights")
    expected = backbone.state_dict()
    wrong = [k for k in expected if k not in weights or weights[k].shape != expected[k].shape]
    if wrong or len(weights) != len(expected):
        k = wrong[0] if wrong else next(k for k in weights if k not in expected)
        found = tuple(weights[k].shape) if k in weights else "missing"
        raise common.Abort(f"{path} does not hold weights of a {args.backbone} of width {args.width}: "
                           f"{k} is {found}, expected "
                           f"{tuple(expected[k].shape) if k in expected else 'absent'}")
    backbone.load_state_dict(weights)


def rotnet_stage(backbone, train_data, test_data, augment, prepare, args, run, device):
    """Pre-train the backbone as a RotNet, resume its pre-training, or keep the weights already
    loaded from the cache or --rotnet-checkpoint; returns where the weights are kept."""
    path = rotnet_path(args, train_data)
    if os.path.isfile(path) and run.resumed_stage != "rotnet":
        run.print(f"reusing RotNet weights from {path}")
        return path
    pretrain_rotnet(backbone, train_data, test_data, augment, prepare, args, run, device)
    if run.main:
        common.atomic_save(backbone.state_dict(), path)
    return path


def pretrain_rotnet(backbone, train_data, test_data, augment, prepare, args, run, device):
    """Predict the rotation (0/90/180/270) of all four rotations of every image (Gidaris et al.).
    SGD Nesterov, momentum 0.9, wd 5e-4, lr 0.1 divided by 5 at 60/120/160, 200 epochs."""
    raw_model = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, 4)).to(device)
    optimizer = torch.optim.SGD(raw_model.parameters(), lr=args.rotnet_lr, momentum=0.9, nesterov=True,
                                weight_decay=args.rotnet_weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.rotnet_milestones, args.rotnet_gamma)
    start = run.resume("rotnet", args.rotnet_epochs, lr_flag="rotnet_lr", model=raw_model,
                       optimizer=optimizer, scheduler=scheduler)
    model = common.wrap_model(raw_model, device, args.compile)
    for epoch in range(start, args.rotnet_epochs):
        t0, images_seen, meter = time.time(), 0, common.Meter()
        raw_model.train()
        for _, images, _ in run.batches(train_data, args.rotnet_batch_size, epoch, meter):
            x, y = common.rotations(augment(images))
            with common.autocast(device, args.amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            meter.add(loss=loss, train_acc=(logits.argmax(1) == y).float().mean())
            images_seen += len(x) * common.world_size()
        scheduler.step()
        metrics = meter.averages(epoch, run)  # waits for the device, so the time below is complete
        seconds = time.time() - t0
        metrics["test_rotation_acc"] = rotation_accuracy(raw_model, test_data, prepare, args, device)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        run.end_epoch(epoch, metrics, images_seen, seconds)


@torch.no_grad()
def rotation_accuracy(net, data, prepare, args, device):
    """Share of the four rotations of every test image whose rotation the RotNet predicts."""
    net.eval()
    correct = total = 0
    for _, images, _ in data.batches(torch.arange(len(data)), max(1, args.eval_batch_size // 4)):
        x, y = common.rotations(prepare(images))
        with common.autocast(device, args.amp):
            correct += (net(x).argmax(1) == y).sum()
        total += len(y)
    net.train()
    return (correct / total).item()


# ================================================================================================
# Stage: k-means on the RotNet features (Table 2 of the supplementary, first column)
# ================================================================================================
def kmeans(x, k, iters=100, restarts=10):
    """Plain Lloyd k-means (random initial centres, `restarts` tries, lowest inertia kept), the
    off-the-shelf k-means of the paper's baseline; deepcluster.py has its own, faiss-like one (a
    method file never imports another)."""
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        centres = x[torch.randperm(len(x), device=x.device)[:k]].clone()
        for _ in range(iters):
            assign = torch.cdist(x, centres).argmin(1)
            sums = torch.zeros_like(centres).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).unsqueeze(1)
            centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        inertia = (x - centres[assign]).pow(2).sum().item()
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best


def kmeans_baseline(backbone, data, prepare, args, run):
    features, labels = common.extract_features(backbone, data, prepare, args.eval_batch_size, args.amp)
    metrics = common.clustering_metrics(kmeans(features, args.num_clusters), labels, args.num_clusters,
                                        data.num_classes)
    metrics["confusion"] = metrics["confusion"].tolist()
    run.print(f"k-means on RotNet features: {common.format_scores(metrics)}")
    run.finish(metrics)


# ================================================================================================
# Training
# ================================================================================================
def train_one_epoch(model, optimizer, data, augment, args, epoch, run, device):
    """One epoch of LSD-C; returns the meter of losses and the number of images trained on."""
    meter, images_seen, weight = common.Meter(), 0, mse_weight(args, epoch)
    log_pair_quality = bool((data.labels >= 0).all())  # not on splits with unlabeled samples (label -1)
    for _, images, labels in run.batches(data, args.batch_size, epoch, meter):
        x1, x2, x3 = augment(images), augment(images), augment(images)
        mix = None
        if args.mix == "ricap":  # two mixed views: same boundary and permutations, new crop positions;
            # a patch larger than a quarter of the image keeps its own image (official code)
            x2, mix = common.ricap(x2, args.mix_beta, identity_above=0.25)
            x3, _ = common.ricap(x3, mix=mix)
        elif args.mix == "mixup":
            x2, mix = common.mixup(x2, args.mix_beta)
            x3, _ = common.mixup(x3, mix=mix)
        with common.autocast(device, args.amp):
            (logits1, logits2, logits3), z = model(x1, x2, x3)
        s = pairwise_labels(z, args)
        targets = mixed_pair_targets(s, mix, args.mixed_targets)
        loss, bce, mse = lsdc_loss(logits1, logits2, logits3, targets, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        quality = {}
        if log_pair_quality:
            quality = dict(zip(("pair_precision", "pair_recall"), pair_label_quality(s, labels)))
        meter.add(loss=loss, bce=bce, mse=mse, positive_pairs=s.mean(), **quality)
        images_seen += len(images) * common.world_size()
    return meter, images_seen


# ================================================================================================
# Evaluation
# ================================================================================================
def score(logits, labels, num_clusters, num_classes):
    """ACC (Hungarian), NMI, ARI of the head's argmax, LSD-C's confident-sample accuracy and share
    (max probability > 0.9, supplementary Fig. 1b), the median max probability, and the share of the
    smallest cluster. The median is the steady reading of confidence: when most max probabilities sit
    just below 0.9, small shifts of the logits' scale swing the share above 0.9 from epoch to epoch."""
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    metrics = common.clustering_metrics(pred, labels, num_clusters, num_classes)
    metrics["confident_acc"], metrics["confident_share"] = common.confident_accuracy(probs, labels, 0.9)
    metrics["median_confidence"] = probs.max(1).values.quantile(0.5).item()
    metrics["smallest_cluster"] = torch.bincount(pred, minlength=num_clusters).min().item() / len(pred)
    return metrics


@torch.no_grad()
def evaluate(model, data, test_data, prepare, args):
    """Scores on the clustered data and, under "test_" keys, on the test split (when the data is not
    the test split itself). With --split all the
    test split is the tail of the data (train + test): its predictions are sliced off, not recomputed
    (BatchNorm in eval mode makes each prediction independent of the rest of its batch)."""
    logits, labels = common.extract_features(model, data, prepare, args.eval_batch_size, args.amp)
    metrics = score(logits, labels, args.num_clusters, data.num_classes)
    if test_data is not None and args.split != "test":  # with --split test they are the scores above
        if args.split == "all":
            test_logits, test_labels = logits[-len(test_data):], labels[-len(test_data):]
        else:
            test_logits, test_labels = common.extract_features(model, test_data, prepare,
                                                               args.eval_batch_size, args.amp)
        test_scores = score(test_logits, test_labels, args.num_clusters, data.num_classes)
        metrics.update({f"test_{k}": v for k, v in test_scores.items()})
    return metrics


# ================================================================================================
# Main
# ================================================================================================
def main(argv=None):
    # --- set-up
    args = parse_args(argv)
    device = common.setup_device(args.device)
    common.init_distributed(device)
    common.seed_everything(args.seed, args.deterministic)  # the same initial network on every rank
    data, train_data, test_data, backbone = load_data_and_backbone(args, device)
    if common.rank():
        common.seed_everything(args.seed + common.rank(), args.deterministic)  # own augmentation draws
    backbone = backbone.to(device, memory_format=common.memory_format(device))
    augment, prepare = make_transforms(args, data, device)
    if train_data is not None:
        rotnet = rotnet_path(args, train_data)
        if os.path.isfile(rotnet):
            load_rotnet_weights(backbone, rotnet, args)
        elif args.rotnet_checkpoint:
            raise common.Abort(f"--rotnet-checkpoint {rotnet}: no such file")
        else:
            common.check_writable(args.rotnet_dir, "--rotnet-dir")
    run = common.Run("lsdc", args)  # once the data and weights are there: no empty runs
    run.print(f"run: {run.path} | {args.dataset} {args.split}: {len(data)} samples, "
              f"K={args.num_clusters} | device {device} x {common.world_size()}")

    # --- extra stages: RotNet pre-training (or its kept weights), then the k-means baseline
    if train_data is not None and run.resumed_stage != "lsdc":
        path = rotnet_stage(backbone, train_data, test_data, augment, prepare, args, run, device)
        if args.rotnet_only:
            return run.finish({"rotnet_checkpoint": path})
    if args.kmeans_baseline:
        return kmeans_baseline(backbone, data, prepare, args, run)

    # --- resume
    # re-seeded so that LSD-C's result depends on the RotNet weights and the seed only
    common.seed_everything(args.seed + 1 + common.rank(), args.deterministic)
    raw_model = LSDCNet(backbone, args.num_clusters, args.head).to(device)
    freeze_blocks(backbone, args.frozen_blocks)
    optimizer, scheduler = make_optimizer(raw_model, args)
    start = run.resume("lsdc", args.epochs, model=raw_model, optimizer=optimizer, scheduler=scheduler)
    model = common.wrap_model(raw_model, device, args.compile)

    # --- training
    for epoch in range(start, args.epochs):
        t0 = time.time()
        raw_model.train()
        meter, images_seen = train_one_epoch(model, optimizer, data, augment, args, epoch, run, device)
        scheduler.step()
        metrics = meter.averages(epoch, run)  # waits for the device, so the time below is complete
        seconds = time.time() - t0
        metrics.update(mse_weight=mse_weight(args, epoch), lr=optimizer.param_groups[0]["lr"])
        metrics.update(evaluate(raw_model, data, test_data, prepare, args))
        run.end_epoch(epoch, metrics, images_seen, seconds)

    # --- final evaluation
    result = evaluate(raw_model, data, test_data, prepare, args)
    result = {k: v.tolist() if "confusion" in k else v for k, v in result.items()}
    run.finish({**result, "epochs": args.epochs})
    test = f" | test: {common.format_scores(result, 'test_')}" if "test_acc" in result else ""
    run.print(f"final ({args.split}): {common.format_scores(result)} | median max probability "
              f"{result['median_confidence']:.3f}{test}")


if __name__ == "__main__":
    common.run_main(main)
