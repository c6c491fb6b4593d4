"""LSD-C: Linearly Separable Deep Clusters.

Paper: Sylvestre-Alvise Rebuffi, Sebastien Ehrhardt, Kai Han, Andrea Vedaldi, Andrew Zisserman,
"LSD-C: Linearly Separable Deep Clusters", arXiv:2006.10039 (2020); supplementary material in
../shared/seeds (Table 1 gives the hyper-parameters). Official code: github.com/srebuffi/lsd-clusters
(CIFAR-10 only); the RotNet recipe is the group's AutoNovel code (github.com/k-han/AutoNovel).

What it does:
  1. RotNet pre-training: a CIFAR ResNet-18 (parameter-free shortcuts) learns to predict which of
     0/90/180/270 degrees each image was rotated by (Gidaris et al., ICLR 2018).
  2. Freeze the stem and the first three macro-blocks; train layer4 + a linear head with K outputs.
  3. Per batch, connect pairs of samples whose (detached) features are close: kNN, cosine or SNE.
  4. Train the head so that <p_i, p'_j> (p = softmax of the head) predicts those connections with a
     binary cross-entropy over all pairs of the batch, p' coming from a RICAP/MixUp-mixed view,
     plus a ramped-up MSE consistency between two mixed views. Clusters = argmax of the head.
  5. Every epoch: ACC (Hungarian) / NMI / ARI on train+test and on the test split, confident samples
     (max probability > 0.9) and the median max probability,
     and two readings from the ground truth that never reach the loss: the precision and recall of
     the pairwise pseudo-labels, and the share of the smallest cluster.

Reproduce (one GPU):  python lsdc.py --dataset cifar10 --labeling knn --compile
  Paper: 81.7 +- 0.9 % ACC on CIFAR-10 (train+test, 10 seeds).
  This script: 82.1 % ACC (NMI 75.7, ARI 70.7), one seed, the full schedule (RotNet 200 epochs, LSD-C
  220), bf16, 28.4 min in all on one H100 with --compile. With RotNet cut to 60 epochs: 66.2 %.
  MNIST on a 2-core CPU: 97.0 % ACC (NMI 93.6, ARI 93.6) with the ResNet-18 narrowed to width 8 and
  RotNet cut to 6 epochs, the full 15-epoch LSD-C stage, 55 min.
  CIFAR-10 at CPU scale (width 8, RotNet 8 epochs, LSD-C 15 epochs): 34.9 % ACC with the paper's
  mixed-target axis, 33.5 % with the released code's, 24.6 % for k-means on the same features; on a
  2-epoch RotNet 27.2 % (k-means 24.0 %), so the RotNet's length matters even where k-means and the
  starting links cannot tell the two RotNets apart.
  Details and throughput figures: benchmarks/README.md.

Deliberate deviations from the official code (each is a flag away where it is a choice):
  - Mixed pairwise targets permute the *mixed* view's axis: s~_ij = sum_k W_k s_{i, perm_k(j)} for
    P_ij = <p_i, p'_j>, as the paper's equation reads. The released code permutes the other axis of
    the target matrix (s~_ij = sum_k W_k s_{perm_k(i), j}), which pairs a mixed image with targets of
    images it does not contain except for its identity-order patches; `--mixed-targets official-code`
    reproduces that.
  - The SNE diagonal is masked with -inf; the released code subtracts 1000, which is the same mask
    unless squared feature distances / T^2 exceed about 1000.
  - RotNet uses the LSD-C normalisation constants (BatchNorm makes the difference immaterial) and the
    modern MultiStepLR convention (lr 0.1 for epochs 0-59, 0.02 from 60, ...); AutoNovel's
    scheduler.step() at the start of each epoch shifts that by one epoch.
  - Augmentation runs batched on the device (identical distribution to torchvision's RandomCrop and
    RandomHorizontalFlip); the three views of one image use independent draws, as in the official code.
  - MNIST augmentation (not given anywhere): RandomCrop(28, padding 2), no flip. Reuters-10K: MLP
    d-500-500-2000 (UNVERIFIED), no RotNet, MixUp, no input augmentation, so the two mixed views
    agree and the MSE term vanishes.
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

# Table 1 of the supplementary (seed 000), row by row; `split`, `crop_padding`, `flip` and the
# backbone come from the official code (CIFAR-10: train+test together, RandomCrop(32, 4) + flip).
# None = the paper gives no value for that labeling on that dataset.
PAPER_DEFAULTS = {
    "cifar10": dict(optimizer="sgd", epochs=220, milestones=[140, 180], lr=0.1, rampup_weight=5.0,
                    rampup_length=100, cosine_threshold=0.9, sne_threshold=0.01, sne_temperature=1.0,
                    knn_k=20, labeling="knn", backbone="resnet18", split="all", crop_padding=4, flip=True),
    "cifar100-20": dict(optimizer="sgd", epochs=200, milestones=[170], lr=0.1, rampup_weight=25.0,
                        rampup_length=150, cosine_threshold=0.95, sne_threshold=0.01, sne_temperature=0.5,
                        knn_k=10, labeling="sne", backbone="resnet18", split="all", crop_padding=4, flip=True),
    "stl10": dict(optimizer="sgd", epochs=200, milestones=[140, 180], lr=0.1, rampup_weight=5.0,
                  rampup_length=50, cosine_threshold=None, sne_threshold=0.01, sne_temperature=0.5,
                  knn_k=None, labeling="sne", backbone="resnet18", split="all", crop_padding=12, flip=True),
    "mnist": dict(optimizer="sgd", epochs=15, milestones=[], lr=0.1, rampup_weight=5.0, rampup_length=50,
                  cosine_threshold=None, sne_threshold=None, sne_temperature=None, knn_k=10,
                  labeling="knn", backbone="resnet18", split="all", crop_padding=2, flip=False),
    "reuters10k": dict(optimizer="adam", epochs=75, milestones=[], lr=0.001, rampup_weight=25.0,
                       rampup_length=100, cosine_threshold=None, sne_threshold=None, sne_temperature=None,
                       knn_k=5, labeling="knn", backbone="mlp", split="all", crop_padding=0, flip=False,
                       mix="mixup"),
    # Not in the paper: small enough to learn in about a minute on a CPU.
    "synthetic": dict(optimizer="sgd", epochs=8, milestones=[6], lr=0.1, rampup_weight=5.0,
                      rampup_length=4, cosine_threshold=0.9, sne_threshold=0.01, sne_temperature=1.0,
                      knn_k=10, labeling="knn", backbone="resnet18", split="all", crop_padding=4, flip=True,
                      width=8, rotnet_epochs=4, rotnet_milestones=[3], batch_size=128),
}
# Settings shared by every dataset: the clustering stage (official code) and RotNet (AutoNovel).
COMMON_DEFAULTS = dict(batch_size=256, momentum=0.9, mixup_weight_decay=1e-4,
                       lr_gamma=0.1, mix="ricap", mix_beta=0.3, width=64, frozen_blocks=3,
                       rotnet_epochs=200, rotnet_milestones=[60, 120, 160], rotnet_lr=0.1, rotnet_gamma=0.2,
                       rotnet_batch_size=128, rotnet_weight_decay=5e-4)
LABELING_PARAMS = {"knn": ["knn_k"], "cosine": ["cosine_threshold"], "sne": ["sne_threshold", "sne_temperature"]}


def dataset_defaults(dataset):
    """The Table 1 row of `dataset` over the shared settings. Other datasets of common.py take
    CIFAR-10's optimisation settings but no labeling threshold: those must be given."""
    if dataset in PAPER_DEFAULTS:
        return {**COMMON_DEFAULTS, **PAPER_DEFAULTS[dataset]}
    unset = dict(cosine_threshold=None, sne_threshold=None, sne_temperature=None, knn_k=None)
    return {**COMMON_DEFAULTS, **PAPER_DEFAULTS["cifar10"], **unset}


def parse_args(argv=None):
    # Flags left unset take the row of the chosen dataset; reading --dataset first lets --help show it.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dataset", default="cifar10")
    dataset = pre.parse_known_args(argv)[0].dataset
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " RotNet pre-training, then LSD-C.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog=f"Defaults shown are those of --dataset {dataset} (Table 1 of the "
                                "supplementary and the official code); `--dataset NAME --help` shows another row.")
    known = [*common.DATASETS, "reuters10k"]
    p.add_argument("--dataset", default="cifar10", help="cifar10, cifar100-20, stl10, mnist, reuters10k "
                   "(Table 1 defaults) or synthetic; any other dataset of common.py with explicit flags")
    p.add_argument("--data-dir", default=common.default_data_dir(), help="dataset folder ($DATA_DIR)")
    p.add_argument("--reuters-file", default=None, help="DEC's preprocessed Reuters-10K (reutersidf10k.npy: "
                   "a dict with 'data' (10000 x 2000 tf-idf) and 'label'); default <data-dir>/reutersidf10k.npy")
    p.add_argument("--split", help="data clustered and evaluated: all = train+test, as the official code")
    p.add_argument("--num-clusters", type=int, help="K, the head's outputs (default: the number of classes)")
    g = p.add_argument_group("clustering stage (Table 1 of the supplementary; unset = the dataset's row)")
    g.add_argument("--labeling", choices=["knn", "cosine", "sne"], help="pairwise pseudo-labels")
    g.add_argument("--knn-k", type=int, help="kNN labeling: neighbours per row or column (self included)")
    g.add_argument("--cosine-threshold", type=float, help="cosine labeling: tau")
    g.add_argument("--sne-threshold", type=float, help="SNE labeling: tau")
    g.add_argument("--sne-temperature", type=float, help="SNE labeling: temperature T")
    g.add_argument("--optimizer", choices=["sgd", "adam"])
    g.add_argument("--epochs", type=int)
    g.add_argument("--milestones", type=int, nargs="*", help="epochs at which the lr is multiplied by --lr-gamma")
    g.add_argument("--lr", type=float)
    g.add_argument("--lr-gamma", type=float, help="lr decay at each milestone (official code: 0.1)")
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float, help="unset: 5e-4 (official code), or --mixup-weight-decay "
                   "with --mix mixup (the paper lowers it to 1e-4 with MixUp)")
    g.add_argument("--mixup-weight-decay", type=float)
    g.add_argument("--rampup-weight", type=float, help="lambda of the MSE ramp-up")
    g.add_argument("--rampup-length", type=int, help="T of the MSE ramp-up, in epochs")
    g.add_argument("--batch-size", type=int, help="per device; the pairs live inside it (Table 5: 64-512)")
    g.add_argument("--mix", choices=["ricap", "mixup", "none"], help="data composition of the two extra views")
    g.add_argument("--mix-beta", type=float, help="Beta(beta, beta) for RICAP sizes and MixUp weights")
    g.add_argument("--mixed-targets", choices=["paper", "official-code"], default="paper",
                   help="axis the patch permutations act on in the soft pairwise targets: the mixed view's "
                   "(paper's equation) or the clean view's (the released code)")
    g.add_argument("--mse", action=argparse.BooleanOptionalAction, default=True,
                   help="consistency MSE between the two mixed views (Table 2 ablates it)")
    g.add_argument("--head", choices=["linear", "mlp"], default="linear",
                   help="clustering head; mlp = the 2-layer head of Table 2")
    g.add_argument("--frozen-blocks", type=int, choices=[0, 1, 2, 3, 4],
                   help="stem + this many macro-blocks stay frozen (paper: 3; Table 3 compares 2, 3, 4)")
    g.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "mlp"])
    g.add_argument("--width", type=int, help="ResNet stem width (64 in the paper; smaller for CPU runs)")
    g.add_argument("--crop-padding", type=int, help="RandomCrop padding of the training views")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips")
    g = p.add_argument_group("RotNet pre-training (AutoNovel recipe)")
    g.add_argument("--rotnet-epochs", type=int, help="0 = no pre-training: LSD-C on a randomly initialised "
                   "network (a control, not in the paper)")
    g.add_argument("--rotnet-milestones", type=int, nargs="*")
    g.add_argument("--rotnet-lr", type=float)
    g.add_argument("--rotnet-gamma", type=float)
    g.add_argument("--rotnet-batch-size", type=int, help="images per batch (x4 rotations)")
    g.add_argument("--rotnet-weight-decay", type=float)
    g.add_argument("--rotnet-checkpoint", help="use these RotNet weights instead of pre-training "
                   "(default: reuse <rotnet-dir>/rotnet__<dataset>__... when a run made it already)")
    g.add_argument("--rotnet-dir", default="runs/rotnet", help="where pre-trained RotNets are kept for reuse")
    g.add_argument("--rotnet-only", action="store_true", help="stop after RotNet pre-training")
    g.add_argument("--kmeans-baseline", action="store_true",
                   help="instead of LSD-C, k-means on the RotNet features (Table 2, first column)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", help="cuda (default when available) or cpu")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the network (one H100: the CIFAR-10 pipeline in 28.4 min, about 35 without)")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    g.add_argument("--eval-batch-size", type=int, default=1024)
    g.add_argument("--out-dir", help="run directory (default runs/lsdc__<dataset>__<seed>__<time>)")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR with its saved settings")
    p.set_defaults(**dataset_defaults(dataset))
    args = p.parse_args(argv)

    if args.resume:  # the saved settings win, so the continued run is the same run
        saved = common.Run.saved_args(args.resume)
        args = argparse.Namespace(**{**saved, "resume": args.resume, "device": args.device or saved["device"]})
        return args
    if args.dataset not in known:
        p.error(f"unknown dataset {args.dataset!r}; choose one of {', '.join(known)}")
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
    for name in ("epochs", "batch_size", "rotnet_batch_size", "eval_batch_size", "width"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rotnet_epochs < 0:
        p.error("--rotnet-epochs must be 0 (no pre-training) or more")
    return args


# ------------------------------------------------------------------------------------------------
# The model: backbone -> head
# ------------------------------------------------------------------------------------------------
class LSDCNet(nn.Module):
    def __init__(self, backbone, num_outputs, head="linear"):
        super().__init__()
        self.backbone = backbone
        d = backbone.feature_dim
        self.head = (nn.Linear(d, num_outputs) if head == "linear" else
                     nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True), nn.Linear(d, num_outputs)))

    def forward(self, *views):
        """One view: its logits. Several: the logits of each, run through the network separately
        (BatchNorm statistics per view, as the official code), and the features z of the first.
        One call for all views keeps DistributedDataParallel to one forward per backward."""
        features = [self.backbone(v) for v in views]
        logits = [self.head(z) for z in features]
        return logits[0] if len(views) == 1 else (logits, features[0])


def freeze_blocks(backbone, frozen_blocks):
    """Freeze the stem and the first `frozen_blocks` macro-blocks (paper: 3, after RotNet). Their
    BatchNorm layers stay in training mode, as in the official code (model.train() for all)."""
    if frozen_blocks == 0 or not hasattr(backbone, "layer1"):
        return
    for module in [backbone.conv1, backbone.bn1] + [getattr(backbone, f"layer{i}") for i in range(1, frozen_blocks + 1)]:
        module.requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Pairwise pseudo-labels from the detached features z (B, d) of the clean view (paper, Sec. 3.1)
# ------------------------------------------------------------------------------------------------
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
    a = -torch.cdist(z / temperature, z / temperature, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
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


def mixed_pair_targets(s, mix, axis="paper"):
    """Targets for P_ij = <p_i, p'_j> where the mixed image j holds images perm_k(j) in proportions
    W_k: s~_ij = sum_k W_k s_{i, perm_k(j)}, the permutation acting on the mixed (column) axis.
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


def kmeans(x, k, iters=100, restarts=10):
    """Plain Lloyd k-means (random initial centres, `restarts` tries, lowest inertia kept), for the
    k-means-on-RotNet-features baseline of Table 2."""
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


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def load_reuters(path, device):
    """DEC's Reuters-10K (Xie et al., 2016): np.save of {'data': (10000, 2000) tf-idf, 'label': (10000,)}."""
    if not os.path.isfile(path):
        raise common.Abort(f"reuters10k: {path} not found. torchvision cannot download Reuters-10K: build "
                           "reutersidf10k.npy with the DEC repository's make_reuters_data script (RCV1-v2, 4 "
                           "root categories, 2000 most frequent words, tf-idf) and pass --reuters-file PATH")
    try:
        raw = np.load(path, allow_pickle=True).item()
        x, y = torch.as_tensor(np.asarray(raw["data"]), dtype=torch.float32), torch.as_tensor(np.asarray(raw["label"])).long().flatten()
        assert x.dim() == 2 and len(x) == len(y)
    except Exception as error:
        raise common.Abort(f"reuters10k: {path} is not DEC's format ({type(error).__name__}: {error})")
    return common.TensorImages("reuters10k", x, y, int(y.max()) + 1, None, None).to(device)


def load_data_and_backbone(args, device):
    """The data clustered (args.split), the train split (RotNet) and the test split, and the
    backbone for them; sets args.num_clusters when unset."""
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
    if args.batch_size > len(data):
        raise common.Abort(f"--batch-size {args.batch_size} is larger than {args.dataset} ({len(data)} samples)")
    return data, train_data, test_data, backbone


def make_augment(args, data, device):
    """uint8 batch -> normalised float batch; RandomCrop(padding) + flip for training views."""
    if data.mean is None:  # vector data: no augmentation
        return (lambda x: x), (lambda x: x)
    channels_last = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    def prepare(x):
        return common.normalize(common.to_float(x), data.mean, data.std).contiguous(memory_format=channels_last)

    def augment(x):
        x = common.random_crop(x, x.shape[-1], args.crop_padding) if args.crop_padding else x
        x = common.to_float(x)
        x = common.horizontal_flip(x) if args.flip else x
        return common.normalize(x, data.mean, data.std).contiguous(memory_format=channels_last)

    return augment, prepare


# ------------------------------------------------------------------------------------------------
# Stage 1: RotNet pre-training
# ------------------------------------------------------------------------------------------------
ROTNET_RECIPE = ["backbone", "width", "rotnet_epochs", "rotnet_milestones", "rotnet_lr", "rotnet_gamma",
                 "rotnet_batch_size", "rotnet_weight_decay", "crop_padding", "flip", "seed"]


def rotnet_path(args):
    """Where this run's RotNet is kept for reuse: the name holds the dataset and a digest of every
    setting that shapes the pre-training, so a changed recipe never picks up stale weights."""
    if args.rotnet_checkpoint:
        return args.rotnet_checkpoint
    recipe = {k: getattr(args, k) for k in ROTNET_RECIPE} | {"world_size": common.world_size()}
    digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    name = f"rotnet__{args.dataset}__{args.backbone}-w{args.width}__e{args.rotnet_epochs}__seed{args.seed}__{digest}.pt"
    return os.path.join(args.rotnet_dir, name)


def pretrain_rotnet(backbone, train_data, test_data, augment, prepare, args, run, device, state=None):
    """Predict the rotation (0/90/180/270) of all four rotations of every image (Gidaris et al.).
    SGD Nesterov, momentum 0.9, wd 5e-4, lr 0.1 divided by 5 at 60/120/160, 200 epochs."""
    head = nn.Linear(backbone.feature_dim, 4).to(device)
    rotnet = nn.Sequential(backbone, head)
    net = common.wrap_ddp(rotnet, device)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.rotnet_lr, momentum=0.9, nesterov=True,
                                weight_decay=args.rotnet_weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.rotnet_milestones, args.rotnet_gamma)
    start = 0
    if state:
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["epoch"] + 1
        common.set_rng_state(state["rng"])
    step = torch.compile(net) if args.compile else net
    run.start_stage("rotnet", args.rotnet_epochs, start)
    for epoch in range(start, args.rotnet_epochs):
        net.train()
        meter, t0, seen = common.Meter(), time.time(), 0
        order = common.epoch_order(len(train_data), args.seed, epoch, device)
        for idx, images, _ in train_data.batches(common.shard_batches(order, args.rotnet_batch_size).flatten(),
                                                 args.rotnet_batch_size):
            x, y = common.rotations(augment(images))
            with common.autocast(device, args.amp):
                logits = step(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            meter.add(loss=loss, train_acc=(logits.argmax(1) == y).float().mean())
            seen += len(x)
        scheduler.step()
        metrics = meter.averages(epoch, run)  # waits for the GPU, so the time below is complete
        train_seconds = time.time() - t0
        metrics["test_rotation_acc"] = rotation_accuracy(rotnet, test_data, prepare, args, device)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        run.log(epoch, metrics, seen * common.world_size(), train_seconds)
        run.save_checkpoint({"stage": "rotnet", "epoch": epoch, "backbone": backbone.state_dict(),
                             "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict()})


@torch.no_grad()
def rotation_accuracy(net, data, prepare, args, device):
    net.eval()
    correct = total = 0
    for _, images, _ in data.batches(torch.arange(len(data)), args.eval_batch_size // 4):
        x, y = common.rotations(prepare(images))
        with common.autocast(device, args.amp):
            correct += (net(x).argmax(1) == y).sum()
        total += len(y)
    net.train()
    return (correct / total).item()


# ------------------------------------------------------------------------------------------------
# Stage 2: LSD-C
# ------------------------------------------------------------------------------------------------
def pair_label_quality(s, labels):
    """Diagnostic only (the ground truth never reaches the loss): of the off-diagonal pairs that the
    pseudo-labels s link, the share of same-class ones (precision), and of the same-class pairs, the
    share that s links (recall)."""
    same = (labels[:, None] == labels[None, :]).float()
    off_diagonal = 1.0 - torch.eye(len(s), device=s.device)
    linked, same = s * off_diagonal, same * off_diagonal
    true_links = (linked * same).sum()
    return true_links / linked.sum().clamp(min=1), true_links / same.sum().clamp(min=1)


def train_epoch(model, step, optimizer, data, augment, args, epoch, device, log_pair_quality=True):
    """One epoch of LSD-C; returns the meter of losses and the number of images seen."""
    mse_weight = rampup(epoch, args.rampup_weight, args.rampup_length) if args.mse else 0.0
    meter, seen = common.Meter(), 0
    order = common.epoch_order(len(data), args.seed, epoch, device)
    for idx, images, labels in data.batches(common.shard_batches(order, args.batch_size).flatten(), args.batch_size):
        x1, x2, x3 = augment(images), augment(images), augment(images)
        mix = None
        if args.mix == "ricap":  # two mixed views: same boundary and permutations, new crop positions
            x2, mix = common.ricap(x2, args.mix_beta, identity_above=0.25)
            x3, _ = common.ricap(x3, mix=mix)
        elif args.mix == "mixup":
            x2, mix = common.mixup(x2, args.mix_beta)
            x3, _ = common.mixup(x3, mix=mix)
        with common.autocast(device, args.amp):
            (logits1, logits2, logits3), z = step(x1, x2, x3)
        s = pairwise_labels(z, args)
        targets = mixed_pair_targets(s, mix, args.mixed_targets)
        loss, bce, mse = lsdc_loss(logits1, logits2, logits3, targets, mse_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        quality = dict(zip(("pair_precision", "pair_recall"), pair_label_quality(s, labels))) if log_pair_quality else {}
        meter.add(loss=loss, bce=bce, mse=mse, positive_pairs=s.mean(), **quality)
        seen += len(images)
    return meter, seen, mse_weight


def score(logits, labels, num_clusters):
    """ACC (Hungarian), NMI, ARI of the head's argmax, LSD-C's confident-sample accuracy and share
    (max probability > 0.9, supplementary Fig. 1b), the median max probability, and the share of the
    smallest cluster. The median is the steady reading of confidence: when most max probabilities sit
    just below 0.9, small shifts of the logits' scale swing the share above 0.9 from epoch to epoch."""
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    metrics = common.clustering_metrics(pred, labels, num_clusters)
    metrics["confident_acc"], metrics["confident_share"] = common.confident_accuracy(probs, labels, 0.9)
    metrics["median_confidence"] = probs.max(1).values.quantile(0.5).item()
    metrics["smallest_cluster"] = torch.bincount(pred, minlength=num_clusters).min().item() / len(pred)
    return metrics


@torch.no_grad()
def evaluate(model, data, test_data, prepare, args):
    """Scores on the clustered data and, under "test_" keys, on the test split. With --split all the
    test split is the tail of the data (train + test): its predictions are sliced off, not recomputed
    (BatchNorm in eval mode makes each prediction independent of the rest of its batch)."""
    logits, labels = common.extract_features(model, data, prepare, args.eval_batch_size, args.amp)
    metrics = score(logits, labels, args.num_clusters)
    if test_data is not None:
        if args.split == "all":
            test_logits, test_labels = logits[-len(test_data):], labels[-len(test_data):]
        else:
            test_logits, test_labels = common.extract_features(model, test_data, prepare, args.eval_batch_size, args.amp)
        metrics.update({f"test_{k}": v for k, v in score(test_logits, test_labels, args.num_clusters).items()})
    return metrics


def main(argv=None):
    args = parse_args(argv)
    device = common.setup_device(args.device)
    common.init_distributed(device)
    common.seed_everything(args.seed + common.rank(), args.deterministic)

    data, train_data, test_data, backbone = load_data_and_backbone(args, device)
    run = common.Run("lsdc", args, args.out_dir, args.resume)  # only once the data is there: no empty runs
    state = run.load_checkpoint() if args.resume else None
    backbone = backbone.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    augment, prepare = make_augment(args, data, device)
    run.print(f"run: {run.path} | {args.dataset} {args.split}: {len(data)} samples, K={args.num_clusters} | "
              f"device {device}")

    # Stage 1: RotNet (trained here, resumed, or reused from an earlier run / --rotnet-checkpoint)
    if args.dataset != "reuters10k" and not (state and state["stage"] == "lsdc"):
        path = rotnet_path(args)
        if state and state["stage"] == "rotnet":
            backbone.load_state_dict(state["backbone"])
        if (state and state["stage"] == "rotnet") or not os.path.isfile(path):
            if args.rotnet_checkpoint:
                raise common.Abort(f"--rotnet-checkpoint {path}: no such file")
            pretrain_rotnet(backbone, train_data, test_data, augment, prepare, args, run, device,
                            state if state and state["stage"] == "rotnet" else None)
            if run.main:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                common.atomic_save(backbone.state_dict(), path)
            state = None
        else:
            run.print(f"reusing RotNet weights from {path}")
            try:
                backbone.load_state_dict(torch.load(path, map_location=device, weights_only=True))
            except (RuntimeError, OSError) as error:
                raise common.Abort(f"{path} does not hold RotNet weights for this backbone ({str(error)[:200]})")
        if args.rotnet_only:
            run.finish({"rotnet_checkpoint": path})
            return
    if args.kmeans_baseline:
        features, labels = common.extract_features(backbone, data, prepare, args.eval_batch_size, args.amp)
        metrics = common.clustering_metrics(kmeans(features, args.num_clusters), labels, args.num_clusters)
        metrics["confusion"] = metrics["confusion"].tolist()
        run.print(f"k-means on RotNet features: acc {metrics['acc']:.4f} nmi {metrics['nmi']:.4f} ari {metrics['ari']:.4f}")
        run.finish(metrics)
        return

    # Stage 2: LSD-C. Re-seeded so its result depends only on the RotNet weights and the seed.
    if not state:
        common.seed_everything(args.seed + 1 + common.rank(), args.deterministic)
    model = LSDCNet(backbone, args.num_clusters, args.head).to(device)
    freeze_blocks(backbone, args.frozen_blocks)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=args.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, args.lr_gamma)
    start = 0
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["epoch"] + 1
        common.set_rng_state(state["rng"])
    log_pair_quality = bool((data.labels >= 0).all())  # not on splits with unlabeled samples (label -1)
    ddp_model = common.wrap_ddp(model, device)
    step = torch.compile(ddp_model) if args.compile else ddp_model
    run.start_stage("lsdc", args.epochs, start)
    for epoch in range(start, args.epochs):
        model.train()
        t0 = time.time()
        meter, seen, mse_weight = train_epoch(model, step, optimizer, data, augment, args, epoch, device,
                                              log_pair_quality)
        scheduler.step()
        metrics = {**meter.averages(epoch, run), "mse_weight": mse_weight, "lr": optimizer.param_groups[0]["lr"]}
        train_seconds = time.time() - t0
        metrics.update({k: v for k, v in evaluate(model, data, test_data, prepare, args).items() if "confusion" not in k})
        run.log(epoch, metrics, seen * common.world_size(), train_seconds)
        run.save_checkpoint({"stage": "lsdc", "epoch": epoch, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})

    result = {k: v.tolist() if "confusion" in k else v for k, v in evaluate(model, data, test_data, prepare, args).items()}
    run.finish({**result, "epochs": args.epochs})
    run.print(f"final ({args.split}): acc {result['acc']:.4f} nmi {result['nmi']:.4f} ari {result['ari']:.4f} | "
              f"confident {result['confident_acc']:.4f} of {result['confident_share']:.2%} "
              f"(median max probability {result['median_confidence']:.3f})"
              + (f" | test acc {result['test_acc']:.4f}" if test_data is not None else ""))


if __name__ == "__main__":
    common.run_main(main)
