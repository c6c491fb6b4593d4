"""DeepCluster, and the analysis tools of "A Deep Dive into Deep Cluster".

Papers: Mathilde Caron, Piotr Bojanowski, Armand Joulin, Matthijs Douze, "Deep Clustering for
Unsupervised Learning of Visual Features", ECCV 2018, arXiv:1807.05520 (slides in ../shared/seeds).
Ahmad Mustapha, Wael Khreich, Wassim Masri, "A Deep Dive into Deep Cluster", arXiv preprint 2022
(../shared/seeds; Table 1 gives the grids searched and the settings chosen).
Official code: github.com/facebookresearch/deepcluster; the Deep Dive author's code:
github.com/AhmadM-DL/DeepClusterImplementation.

What it does, one cycle at a time:
  1. Features of every training image from the network in eval mode, deterministic transform.
  2. PCA-whitening (to 256 dimensions) and L2 normalisation of the features.
  3. k-means (20 iterations, a new seed every cycle); the cluster ids become pseudo-labels.
  4. A fresh linear head is trained with the network for one epoch of cross-entropy on the
     pseudo-labels, images drawn uniformly over the clusters, with augmentation.
  The Deep Dive adds: halting the clustering after H cycles, and the Initial Alignment
  IA(theta, k) = NMI(labels, k-means of the random network's features) sampled over seeds.

Reproduce:  python deepcluster.py --dataset fashion-mnist                 (Deep Dive: LeNet-5, 50 cycles, k 5)
            python deepcluster.py --dataset fashion-mnist --ia-seeds 100   (IA distribution, Fig. 3a)
            python deepcluster.py --dataset imagenet --data-dir IMAGENET   (original recipe)
  Papers: the Deep Dive gives its accuracies in figures only; IA on Fashion-MNIST for k = 5 spans
  0.37-0.41. DeepCluster, ImageNet, linear probe on conv3: 41.0 (Table 1 of Caron et al.).
  This script (2-core CPU VM, torch 2.14.1): Fashion-MNIST, 50 cycles in 7 min, Conv-2 probe 85.2%
  test accuracy (the untrained LeNet-5: 86.4%; with the author's augmentation, --random-resized-crop
  --no-flip: 87.9%); IA for k = 5 over 100 seeds (4 min): median 0.433, quartiles 0.408-0.446,
  range 0.335-0.504. So with the paper's text settings DeepCluster does not beat the random network
  on Fashion-MNIST here. k-means on one H100, 1.28M x 256, k = 10,000: 0.061 s per iteration.

Deliberate deviations (each is a flag away where it is a choice):
  - k-means is written here in torch instead of faiss. Empty clusters are fixed as faiss does, by
    splitting a cluster drawn with probability ~ (size - 1), but on the points (split at the median
    of a random projection) rather than by moving two centroids by +-1/1024 and waiting for the next
    assignment: the returned clustering never has an empty cluster (faiss' can, with tied points).
    On CUDA the distance matmul runs in TF32 (common.setup_device allows it; faiss computes in fp32):
    0.061 s instead of 0.176 s per ImageNet-size iteration on an H100, with 0.04 % of assignments
    differing from a float64 argmin (0.02 % by more than 1e-5); centroid means stay in fp32.
    --kmeans-init kmeans++ is the plain algorithm (scikit-learn's tries 2 + log k candidates per step).
  - Every cycle, halted ones included, gets a fresh head, as in both official codes.
  - `--reassign R` trains on int(R * N) sampled images per cycle, as the official flag. The last
    incomplete batch of a cycle is dropped.
  - The linear probe follows eval_linear.py (SGD 0.01, momentum 0.9, wd 1e-4, lr_t = lr0 /
    sqrt(1 + lr0 wd t), batch 256, BatchNorm frozen) on the layer named by --probe-layer. ImageNet:
    training crops are Resize 292 + CenterCrop 256 + RandomCrop 224 + flip (official: Resize 256
    first), single-crop test (official: 10 crops). Deep Dive datasets: no augmentation (the
    author's Fashion-MNIST script flips). Probe weight decay 1e-4 (eval_linear.sh passes 1e-7).
  - Fashion-MNIST stays 28x28 (LeNet-5's first convolution pads by 2, which equals the zero-padded
    32x32 image); the author's code resizes to 44 and center-crops 32. Training adds a flip (paper
    text; the author's code: RandomResizedCrop, no flip = --random-resized-crop --no-flip).
    ImageNet: 500 cycles (paper Table 1; main.py: 200).
"""
import argparse
import math
import re
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

# The Deep Dive's settings (Sec. 3.3 "Training Optimization", Table 1 of seed 002, whose bold marks are
# lost in the text we have; k is the one its IA study fixes "based on grid search", Sec. 4.1.2), and the
# original ImageNet recipe (main.sh; Caron et al. Sec. 4).
# probe_layer: the Deep Dive evaluates ReLU-5 (SVHN, CIFAR-10) and Conv-2 (Fashion-MNIST); eval_linear.sh
# uses conv 3 on ImageNet with official avg-pooling to ~9k features.
PAPER_DEFAULTS = {
    "fashion-mnist": dict(backbone="lenet5", sobel=False, lr=0.1, weight_decay=1e-3, momentum=0.1, batch_size=128,
                          cycles=50, pca_dim=0, num_clusters=5, probe_layer="conv2", probe_epochs=20, probe_avgpool=False),
    "svhn": dict(backbone="alexnet-small", sobel=True, lr=0.1, weight_decay=1e-3, momentum=0.5, batch_size=64,
                 cycles=100, pca_dim=256, num_clusters=200, probe_layer="relu5", probe_epochs=20, probe_avgpool=False),
    "cifar10": dict(backbone="alexnet-small", sobel=True, lr=0.1, weight_decay=1e-3, momentum=0.9, batch_size=64,
                    cycles=100, pca_dim=256, num_clusters=1000, probe_layer="relu5", probe_epochs=20, probe_avgpool=False),
    "imagenet": dict(backbone="alexnet", sobel=True, lr=0.05, weight_decay=1e-5, momentum=0.9, batch_size=256,
                     cycles=500, pca_dim=256, num_clusters=10000, probe_layer="relu3", probe_epochs=90, probe_avgpool=True,
                     random_resized_crop=True),
    # Not in any paper: small enough to learn in about a minute on a CPU.
    "synthetic": dict(backbone="lenet5", sobel=True, lr=0.1, weight_decay=1e-4, momentum=0.9, batch_size=64,
                      cycles=16, pca_dim=32, num_clusters=50, probe_layer="relu2", probe_epochs=10, probe_avgpool=False),
}
PAPER_DEFAULTS["imagefolder"] = PAPER_DEFAULTS["imagenet"]
# Settings of the official code shared by every dataset: clustering.py (faiss k-means, 20 iterations,
# random initial centroids), main.py (uniform sampling over clusters, --reassign 1), eval_linear.py.
COMMON_DEFAULTS = dict(kmeans_iters=20, kmeans_init="random", balance="sampler", reassign=1.0, flip=True,
                       random_resized_crop=False, width=64,
                       probe_lr=0.01, probe_momentum=0.9, probe_weight_decay=1e-4, probe_batch_size=256)
FEATURE_DIMS = {"alexnet": 4096, "alexnet-small": 2048, "lenet5": 84, "resnet18": None}  # common.build_backbone's
CONV_LAYERS = {"alexnet": 5, "alexnet-small": 5, "lenet5": 2, "resnet18": 0}
# eval_linear.py's RegLog: AvgPool2d(kernel, stride, padding) that brings AlexNet conv n to ~9k features
OFFICIAL_PROBE_POOL = {1: (6, 6, 3), 2: (4, 4, 0), 3: (3, 3, 1), 4: (3, 3, 1), 5: (2, 2, 0)}


def parse_args(argv=None):
    # Flags left unset take the row of the chosen dataset; reading --dataset first lets --help show it.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dataset", default="cifar10")
    dataset = pre.parse_known_args(argv)[0].dataset
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog=f"Defaults shown are those of --dataset {dataset} (Deep Dive Table 1 / the "
                                "official code); `--dataset NAME --help` shows another row.")
    p.add_argument("--dataset", default="cifar10", help="fashion-mnist, svhn, cifar10 (Deep Dive, Table 1), "
                   "imagenet or imagefolder (original recipe, a folder of class folders), synthetic (CPU demo)")
    p.add_argument("--data-dir", default=common.default_data_dir(), help="dataset folder ($DATA_DIR)")
    g = p.add_argument_group("DeepCluster (unset = the dataset's row: Deep Dive Table 1 / official main.sh)")
    g.add_argument("--backbone", choices=list(FEATURE_DIMS), help="alexnet: BN AlexNet, 224 px; alexnet-small: "
                   "the Deep Dive's 32 px AlexNet; lenet5: Fashion-MNIST; resnet18: CIFAR ResNet-18 (not in the papers)")
    g.add_argument("--width", type=int, help="ResNet-18 stem width")
    g.add_argument("--sobel", action=argparse.BooleanOptionalAction, help="fixed grayscale + Sobel front-end")
    g.add_argument("--cycles", type=int, help="clustering + training cycles (main.py's --epochs: 200; paper: 500)")
    g.add_argument("--num-clusters", "--k", type=int, help="k of k-means (ImageNet 10000; Deep Dive 5/200/1000)")
    g.add_argument("--pca-dim", type=int, help="PCA-whitening dimension before L2 normalisation; 0 = no PCA")
    g.add_argument("--kmeans-iters", type=int, help="k-means iterations (clustering.py: 20)")
    g.add_argument("--kmeans-init", choices=["random", "kmeans++"], help="random = k distinct points (faiss)")
    g.add_argument("--balance", choices=["sampler", "weight", "none"], help="sampler: images drawn uniformly "
                   "over clusters (official code); weight: loss weighted by 1/cluster size (paper, slides)")
    g.add_argument("--reassign", type=float, help="epochs of training per clustering (main.py --reassign)")
    g.add_argument("--halt-clustering", type=int, metavar="H", help="cluster only in the first H cycles, "
                   "then keep training on the last pseudo-labels (Deep Dive Sec. 4.2); None = never halt")
    g.add_argument("--lr", type=float, help="SGD learning rate of the body and of each cycle's head")
    g.add_argument("--momentum", type=float, help="body only; the head's SGD has none (official code)")
    g.add_argument("--weight-decay", type=float, help="body and head")
    g.add_argument("--batch-size", type=int, help="per device")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flip in training")
    g.add_argument("--random-resized-crop", action=argparse.BooleanOptionalAction, help="RandomResizedCrop(0.08-1) "
                   "in training: official ImageNet code; the Deep Dive author's code (without flip), not its text")
    g = p.add_argument_group("linear probe at the end (eval_linear.py's protocol)")
    g.add_argument("--probe-layer", help="reluN (after the N-th conv's ReLU; Deep Dive ReLU-5), convN (the N-th "
                   "convolution's output; Deep Dive Conv-2 of LeNet-5) or output (the backbone's features)")
    g.add_argument("--probe-avgpool", action=argparse.BooleanOptionalAction,
                   help="eval_linear.py's average pooling of AlexNet conv layers to ~9k features")
    g.add_argument("--probe-epochs", type=int, help="Deep Dive: 20; eval_linear.py: 90; 0 = no probe")
    g.add_argument("--probe-lr", type=float, help="lr0 of lr_t = lr0 / sqrt(1 + lr0 wd t)")
    g.add_argument("--probe-momentum", type=float, help="SGD momentum of the probe")
    g.add_argument("--probe-weight-decay", type=float, help="eval_linear.py default 1e-4 (eval_linear.sh: 1e-7)")
    g.add_argument("--probe-batch-size", type=int, help="per device")
    g = p.add_argument_group("Initial Alignment (Deep Dive Sec. 4.1: no training, needs labels)")
    g.add_argument("--ia-seeds", type=int, default=0, help="sample IA over this many random networks "
                   "(seeds --seed, --seed + 1, ...; the paper uses 100); 0 = train instead")
    g.add_argument("--ia-k", type=int, nargs="+", help="values of k (default: --num-clusters)")
    g.add_argument("--ia-pca", type=int, nargs="+", help="PCA dimensions, 0 = none (default: --pca-dim)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", help="cuda (default when available) or cpu")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    g.add_argument("--eval-batch-size", type=int, default=1024)
    g.add_argument("--out-dir", help="run directory (default runs/deepcluster__<dataset>__<seed>__<time>)")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR with its saved settings")
    p.set_defaults(**{**COMMON_DEFAULTS, **PAPER_DEFAULTS.get(dataset, PAPER_DEFAULTS["cifar10"])})
    args = p.parse_args(argv)

    if args.resume:  # the saved settings win, so the continued run is the same run
        saved = common.Run.saved_args(args.resume)
        return argparse.Namespace(**{**saved, "resume": args.resume, "device": args.device or saved["device"]})
    if args.dataset not in PAPER_DEFAULTS:
        p.error(f"unknown dataset {args.dataset!r}; choose one of {', '.join(PAPER_DEFAULTS)}")
    args.ia_k, args.ia_pca = args.ia_k or [args.num_clusters], args.ia_pca or [args.pca_dim]
    feature_dim = FEATURE_DIMS[args.backbone] or 8 * args.width
    for pca in [args.pca_dim, *args.ia_pca]:
        if pca > feature_dim:
            p.error(f"--pca-dim {pca} is larger than the {args.backbone} features ({feature_dim})")
    for name in ("cycles", "kmeans_iters", "probe_epochs", "pca_dim", "ia_seeds"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative")
    for name in ("num_clusters", "batch_size", "eval_batch_size", "probe_batch_size", "halt_clustering", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.ia_k) < 1 or min(args.ia_pca) < 0:
        p.error("--ia-k values must be at least 1 and --ia-pca values not negative")
    if args.reassign <= 0:
        p.error("--reassign must be positive")
    match = re.fullmatch(r"(conv|relu)([1-9])|output", args.probe_layer)
    if not match or (match.group(2) and int(match.group(2)) > CONV_LAYERS[args.backbone]):
        p.error(f"--probe-layer {args.probe_layer} does not exist in {args.backbone}: use output or convN / reluN "
                f"with N <= {CONV_LAYERS[args.backbone]}")
    if args.probe_avgpool and args.probe_layer == "output":
        p.error("--probe-avgpool pools a conv layer; --probe-layer output has no spatial dimensions")
    return args


# ------------------------------------------------------------------------------------------------
# The network: Sobel front-end + backbone; the clustered features are the last fc before its ReLU
# ------------------------------------------------------------------------------------------------
class Sobel(nn.Module):
    """Fixed, non-trainable (models/alexnet.py): a 1x1 convolution to grayscale (weights 1/C), then
    the 3x3 Sobel kernels [[1,0,-1],[2,0,-2],[1,0,-1]] and its transpose (padding 1): two channels of
    image gradients. Both are linear without bias, so they are folded into one 3x3 convolution."""

    def __init__(self, in_channels):
        super().__init__()
        gx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        kernel = torch.stack([gx, gx.T]).unsqueeze(1).repeat(1, in_channels, 1, 1) / in_channels
        self.register_buffer("weight", kernel)

    def forward(self, x):
        return F.conv2d(x, self.weight.to(x.dtype), padding=1)


class DeepClusterNet(nn.Module):
    """Returns the features that are clustered: the backbone's last fc layer before its ReLU (the
    official code removes that ReLU to cluster and appends it again, with the head, to train)."""

    def __init__(self, backbone, sobel_channels=0):
        super().__init__()
        self.sobel = Sobel(sobel_channels) if sobel_channels else nn.Identity()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(self.sobel(x))


def build_model(args, channels, image_side):
    backbone = common.build_backbone(args.backbone, 2 if args.sobel else channels, width=args.width,
                                     image_size=image_side)
    return DeepClusterNet(backbone, channels if args.sobel else 0)


def new_head(dim, k, device):
    """A fresh classifier each cycle (cluster ids mean nothing across cycles): N(0, 0.01) weights, zero bias."""
    head = nn.Linear(dim, k).to(device)
    nn.init.normal_(head.weight, 0, 0.01)
    nn.init.zeros_(head.bias)
    return head


# ------------------------------------------------------------------------------------------------
# Clustering: PCA-whitening, L2 normalisation, k-means (clustering.py: preprocess_features, run_kmeans)
# ------------------------------------------------------------------------------------------------
def pca_whiten(x, dim, eps=1e-8, chunk_elements=2 ** 24):
    """faiss.PCAMatrix(d, dim, eigen_power=-0.5): y = diag(lambda_1..dim + eps lambda_1)^(-1/2)
    U_dim^T (x - mean), with (lambda, U) the leading eigenpairs of the covariance (float64), so
    cov(y) = I on the components well above eps lambda_1. x: float (N, D); returns float32 (N, dim).
    The floor eps * lambda_1 is relative to the spectrum, so whitening x or s * x gives the same y
    (an absolute floor whitened the rank-deficient directions' rounding noise up to signal level
    once features were large). x is centred in float64, `chunk_elements` at a time, before the
    float32 projection: no centred copy of x (ImageNet: 1.28M x 4096), and no float32
    cancellation between x @ P and mean @ P when the features have a large mean."""
    rows = max(1, chunk_elements // x.shape[1])
    mean = x.mean(0, dtype=torch.float64)
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for chunk in x.split(rows):
        centred = chunk.double() - mean
        cov += centred.T @ centred
    eigenvalues, eigenvectors = torch.linalg.eigh(cov / len(x))  # ascending order
    top = eigenvalues.flip(0)[:dim].clamp(min=0)
    floored = top + eps * top[0]
    scale = torch.where(floored > 0, floored.rsqrt(), 0.0)  # constant x (all-zero spectrum): y = 0
    projection = (eigenvectors.flip(1)[:, :dim] * scale).float()
    return torch.cat([(chunk.double() - mean).float() @ projection for chunk in x.split(rows)])


def preprocess(features, pca_dim):
    """DeepCluster's preprocess_features: PCA-whitening (skipped when pca_dim is 0), L2 normalisation."""
    return F.normalize(pca_whiten(features, pca_dim) if pca_dim else features, dim=1)


def assign(x, centroids, chunk_elements):
    """argmin_j ||x_i - c_j||^2 = argmin_j (||c_j||^2 - 2 x_i.c_j), by row chunks of x (float32; the
    matmul in TF32 on CUDA when the process allows it, as common.setup_device does)."""
    c_sq = (centroids ** 2).sum(1)
    rows = max(1, chunk_elements // len(centroids))
    return torch.cat([torch.addmm(c_sq, xb, centroids.T, alpha=-2).argmin(1) for xb in x.split(rows)])


def split_empty_clusters(x, labels, centroids, generator):
    """Caron et al. Sec. 3.3, empty clusters: an empty cluster i is re-seeded from a non-empty cluster j,
    drawn with probability ~ |C_j| - 1 as faiss does, and j is split in two: its points are cut at the
    median of their projection on a random direction, and c_i, c_j become the means of the two halves.
    No cluster is left empty (needs N >= k)."""
    counts = torch.bincount(labels, minlength=len(centroids))
    for i in (counts == 0).nonzero().flatten().tolist():
        j = torch.multinomial((counts - 1).clamp(min=0).float(), 1, generator=generator)
        members = (labels == j).nonzero().flatten()
        direction = torch.randn(x.shape[1], 1, generator=generator, device=x.device)
        order = (x[members] @ direction).flatten().argsort()
        stay, moved = members[order[:len(members) // 2]], members[order[len(members) // 2:]]
        labels[moved] = i
        counts[i], counts[j] = len(moved), len(stay)
        centroids[i], centroids[j] = x[moved].mean(0), x[stay].mean(0)
    return labels, centroids


def init_centroids(x, k, init, generator):
    if torch.is_tensor(init):
        return init.to(x.device, x.dtype).clone()
    if init == "random":  # faiss: k distinct points drawn at random
        return x[torch.randperm(len(x), generator=generator, device=x.device)[:k]].clone()
    # k-means++ (Arthur and Vassilvitskii, 2007): the next centroid is a point drawn with probability
    # proportional to its squared distance to the nearest centroid chosen so far
    x_sq, centroids = (x ** 2).sum(1), x.new_empty(k, x.shape[1])
    d2 = torch.ones_like(x_sq)  # the first centroid is drawn uniformly
    for c in range(k):
        # (clamped: once every distinct point is a centroid, all d2 are 0 and the draw is uniform)
        centroids[c] = x[torch.multinomial(d2.clamp(min=1e-30), 1, generator=generator)[0]]
        d2_new = (x_sq - 2 * (x @ centroids[c]) + centroids[c] @ centroids[c]).clamp(min=0)
        d2 = d2_new if c == 0 else torch.minimum(d2, d2_new)
    return centroids


def kmeans(x, k, iters=20, init="random", seed=0, chunk_elements=None):
    """Lloyd's k-means with squared L2 distances as faiss.Clustering in clustering.py: `iters` rounds of
    (assign every point, move each centroid to the mean of its points), then the final assignment;
    all points are used (max_points_per_centroid is huge there). `init` is "random", "kmeans++" or a
    (k, d) tensor. Returns labels (N,), centroids (k, d), inertia sum_i ||x_i - c_{y_i}||^2."""
    x = x.float()
    chunk_elements = chunk_elements or 2 ** (27 if x.is_cuda else 22)  # GPU: few big matmuls; CPU: cache-sized
    generator = torch.Generator(device=x.device).manual_seed(seed)
    centroids = init_centroids(x, k, init, generator)
    for it in range(iters + 1):
        labels, centroids = split_empty_clusters(x, assign(x, centroids, chunk_elements), centroids, generator)
        if it == iters:
            break
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)
        centroids = torch.zeros_like(centroids).index_add_(0, labels, x) / counts
    rows = max(1, chunk_elements // x.shape[1])
    inertia = sum(((xb - centroids[yb]) ** 2).sum().item() for xb, yb in zip(x.split(rows), labels.split(rows)))
    return labels, centroids, inertia


def cycle_seed(seed, cycle, stream):
    """Seeds that change every cycle (clustering.py draws a new k-means seed each time) and depend on
    (seed, cycle) only, so every rank and a resumed run draw the same: stream 0 k-means, 1 sampling."""
    return (seed * 100003 + cycle) * 2 + stream


def assignment_nmis(labels, previous, targets):
    """Deep Dive Sec. 3.2: NMI(Y^p_{c-1}, Y^p_c) between consecutive clusterings (DeepCluster Fig. 2)
    and NMI(Y^p_c, Y) with the ground truth, on the images whose label is known."""
    out = {} if previous is None else {"nmi_prev": common.nmi(labels, previous)}
    known = targets >= 0
    if known.any():
        out["nmi_gt"] = common.nmi(labels[known], targets[known])
    return out


# ------------------------------------------------------------------------------------------------
# Balancing the pseudo-classes (main.py: UnifLabelSampler; slides: inverse-size loss weights)
# ------------------------------------------------------------------------------------------------
def uniform_cluster_sample(labels, k, n, generator):
    """util.py's UnifLabelSampler: m = n // k' + 1 images from each of the k' non-empty clusters, drawn
    without replacement from clusters larger than m and with replacement from the others; shuffled
    and cut to n. Vectorised: a random order of all images grouped by cluster, then m picks per cluster."""
    counts = torch.bincount(labels, minlength=k)
    clusters = (counts > 0).nonzero().flatten()
    m = n // len(clusters) + 1
    perm = torch.randperm(len(labels), generator=generator)
    grouped = perm[labels[perm].argsort(stable=True)]  # members of cluster 0, then 1, ..., each shuffled
    start = (counts.cumsum(0) - counts)[clusters].unsqueeze(1)
    size = counts[clusters].unsqueeze(1)
    with_replacement = (torch.rand(len(clusters), m, generator=generator) * size).long()
    offset = torch.where(size > m, torch.arange(m).expand(len(clusters), m), with_replacement)
    picks = grouped[start + offset].flatten()
    return picks[torch.randperm(len(picks), generator=generator)][:n]


def cycle_order(labels, k, args, cycle):
    """The images of one cycle's training: int(reassign * N) indices, the same on every rank."""
    generator = torch.Generator().manual_seed(cycle_seed(args.seed, cycle, 1))
    labels = labels.cpu()
    n = int(args.reassign * len(labels))
    if args.balance == "sampler":
        return uniform_cluster_sample(labels, k, n, generator)
    return torch.cat([torch.randperm(len(labels), generator=generator) for _ in range(math.ceil(args.reassign))])[:n]


# ------------------------------------------------------------------------------------------------
# Features, training, linear probe
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def compute_features(fn, data, transform, args, device):
    """fn(transform(images)) for every image, in dataset order, as float32. Under torchrun each rank
    computes one slice (the last padded with repeats) and the slices are gathered."""
    n, world = len(data), common.world_size()
    per_rank = -(-n // world)
    order = torch.arange(common.rank() * per_rank, (common.rank() + 1) * per_rank).clamp(max=n - 1)
    out = []
    for _, images, _ in data.batches(order, args.eval_batch_size):
        with common.autocast(device, args.amp):
            out.append(fn(transform(images)).float())
    return common.all_gather_cat(torch.cat(out))[:n]


def train_cycle(net, optimizers, data, labels, order, weights, augment, args, device):
    """One pass over `order`: cross-entropy of the head on the pseudo-labels, body and head updated."""
    meter, seen = common.Meter(), 0
    batches = common.shard_batches(order.to(labels.device), args.batch_size).flatten()
    for idx, images, _ in data.batches(batches, args.batch_size, random_crop=args.random_resized_crop):
        with common.autocast(device, args.amp):
            logits = net(augment(images))
        loss = F.cross_entropy(logits.float(), labels[idx], weight=weights)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        meter.add(loss=loss)
        seen += len(idx)
    return meter, seen


def probe_features(model, x, layer, avgpool):
    """eval_linear.py's forward: through the Sobel front-end and the conv stack up to `layer` (reluN:
    after the N-th ReLU; convN: the N-th convolution's output), average-pooled as RegLog, flattened."""
    if layer == "output":
        return model(x)
    kind, n = layer[:4], int(layer[4:])
    x, count = model.sobel(x), 0
    for module in model.backbone.features:
        x = module(x)
        count += isinstance(module, nn.ReLU if kind == "relu" else nn.Conv2d)
        if count == n:
            break
    return (F.avg_pool2d(x, *OFFICIAL_PROBE_POOL[n]) if avgpool else x).flatten(1)


def linear_probe(model, train, test, augment, prepare, args, device):
    """Logistic regression on a frozen layer, eval_linear.py's protocol as the Deep Dive uses it: network
    in eval mode (BatchNorm frozen), SGD with momentum, lr_t = lr0 / sqrt(1 + lr0 wd t) at step t.
    Returns the last epoch's training loss and accuracy, and the test accuracy."""
    model.eval()
    frozen = lambda x: probe_features(model, x, args.probe_layer, args.probe_avgpool).float()  # noqa: E731
    _, images, _ = next(test.batches(torch.arange(2), 2))
    with torch.no_grad():
        dim = frozen(prepare(images)).shape[1]
    reglog = nn.Linear(dim, train.num_classes).to(device)
    optimizer = torch.optim.SGD(reglog.parameters(), lr=args.probe_lr, momentum=args.probe_momentum,
                                weight_decay=args.probe_weight_decay)
    decay = args.probe_lr * args.probe_weight_decay
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 / math.sqrt(1 + decay * t))
    step, bs = common.wrap_ddp(reglog, device), args.probe_batch_size
    for epoch in range(args.probe_epochs):
        meter = common.Meter()
        order = common.epoch_order(len(train), args.seed + 1, epoch, device)
        for _, images, y in train.batches(common.shard_batches(order, bs).flatten(), bs):
            with torch.no_grad(), common.autocast(device, args.amp):
                features = frozen(augment(images))
            logits = step(features)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            meter.add(loss=loss, acc=(logits.argmax(1) == y).float().mean())
        train_metrics = meter.averages(epoch)
    predictions = compute_features(lambda x: reglog(frozen(x)).argmax(1, keepdim=True), test, prepare, args, device)
    test_acc = (predictions.flatten().long() == test.labels).float().mean().item()
    return {"probe_loss": train_metrics["loss"], "probe_train_acc": train_metrics["acc"], "probe_test_acc": test_acc}


def make_transforms(args, data, device):
    """uint8 batch -> normalised float batch: `prepare` for the clustering pass (deterministic; folder
    images are Resize + CenterCrop'ed by the loader), `augment` for training: + RandomResizedCrop (done
    by the loader's workers for folder images) and random flip."""
    memory = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    crop_here = args.random_resized_crop and isinstance(data, common.TensorImages)

    def prepare(x):
        return common.normalize(common.to_float(x), data.mean, data.std).contiguous(memory_format=memory)

    def augment(x):
        x = common.to_float(x)
        x = common.random_resized_crop(x, x.shape[-1]) if crop_here else x
        x = common.horizontal_flip(x) if args.flip else x
        return common.normalize(x, data.mean, data.std).contiguous(memory_format=memory)

    return augment, prepare


# ------------------------------------------------------------------------------------------------
# Initial Alignment (Deep Dive Sec. 4.1.1 and 4.3, Fig. 3, 6, B.1-B.3)
# ------------------------------------------------------------------------------------------------
def initial_alignment(args, data, prepare, run, device, channels, side):
    """IA(theta, k) = NMI(Y, k-means_k(f_theta(X))) for randomly initialised networks theta: the network of
    seed s is the one a training run with --seed s starts from, clustered as its first cycle."""
    values = {(k, pca): [] for k in args.ia_k for pca in args.ia_pca}
    run.start_stage("initial-alignment", args.ia_seeds)
    for i in range(args.ia_seeds):
        t0, seed = time.time(), args.seed + i
        common.seed_everything(seed, args.deterministic)
        model = build_model(args, channels, side).to(device).eval()
        features = compute_features(model, data, prepare, args, device)
        line = {}
        for pca in args.ia_pca:
            x = preprocess(features, pca)
            for k in args.ia_k:
                labels = kmeans(x, k, args.kmeans_iters, args.kmeans_init, cycle_seed(seed, 0, 0))[0]
                values[(k, pca)].append(common.nmi(labels, data.labels))
                line[f"ia_k{k}_pca{pca}"] = values[(k, pca)][-1]
        run.log(i, line, len(data), time.time() - t0)
    summary = {}
    for (k, pca), v in values.items():
        q = torch.tensor(v, dtype=torch.float64).quantile(torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
        summary[f"k{k}_pca{pca}"] = {"k": k, "pca_dim": pca, "min": q[0].item(), "q1": q[1].item(),
                                     "median": q[2].item(), "q3": q[3].item(), "max": q[4].item(), "values": v}
        run.print(f"IA k={k} pca={pca or 'off'} over {len(v)} seeds: median {q[2]:.4f} quartiles "
                  f"[{q[1]:.4f}, {q[3]:.4f}] range [{q[0]:.4f}, {q[4]:.4f}]")
    run.finish({"initial_alignment": summary, "seeds": list(range(args.seed, args.seed + args.ia_seeds))})


def main(argv=None):
    args = parse_args(argv)
    device = common.setup_device(args.device)
    common.init_distributed(device)
    name = "imagefolder" if args.dataset in ("imagenet", "imagefolder") else args.dataset
    data = common.load_dataset(name, "train", args.data_dir, device)
    n = len(data)
    for k in [args.num_clusters, *args.ia_k]:
        if k > n:
            raise common.Abort(f"--num-clusters {k} is larger than {args.dataset} ({n} training images)")
    if max(args.pca_dim, *args.ia_pca) >= n:
        raise common.Abort(f"--pca-dim {max(args.pca_dim, *args.ia_pca)} needs more than {n} training images")
    channels, side = (data.images.shape[1], data.images.shape[-1]) if hasattr(data, "images") else (3, 224)
    augment, prepare = make_transforms(args, data, device)
    run = common.Run("deepcluster", args, args.out_dir, args.resume)
    run.print(f"run: {run.path} | {args.dataset}: {n} images, k={args.num_clusters}, {args.backbone}"
              f"{' + Sobel' if args.sobel else ''} | device {device} x {common.world_size()}")
    if args.ia_seeds:
        initial_alignment(args, data, prepare, run, device, channels, side)
        return

    # DeepCluster's cycles (main.py), then the final NMI and linear probe
    common.seed_everything(args.seed, args.deterministic)  # the same network on every rank: it is clustered
    model = build_model(args, channels, side).to(device)  # before DistributedDataParallel syncs it
    if common.rank():
        common.seed_everything(args.seed + common.rank(), args.deterministic)  # own augmentation draws
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    state, labels, start = run.load_checkpoint() if args.resume else None, None, 0
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        labels, start = state["labels"].to(device), state["epoch"] + 1
        common.set_rng_state(state["rng"])
    k = args.num_clusters
    run.start_stage("train", args.cycles, start)
    for cycle in range(start, args.cycles):
        metrics = {}
        if args.halt_clustering is None or cycle < args.halt_clustering:  # Deep Dive Sec. 4.2
            t0 = time.time()
            model.eval()
            x = preprocess(compute_features(model, data, prepare, args, device), args.pca_dim)
            new_labels, _, metrics["kmeans_loss"] = kmeans(x, k, args.kmeans_iters, args.kmeans_init,
                                                           cycle_seed(args.seed, cycle, 0))
            if dist.is_initialized():  # identical inputs and seed; rank 0's result is the reference
                dist.broadcast(new_labels, 0)
            metrics.update(assignment_nmis(new_labels, labels, data.labels))
            labels, metrics["cluster_seconds"] = new_labels, time.time() - t0
        head = new_head(model.backbone.feature_dim, k, device)
        head_optimizer = torch.optim.SGD(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        net = common.wrap_ddp(nn.Sequential(model, nn.ReLU(), head), device)
        weights = 1.0 / torch.bincount(labels, minlength=k).clamp(min=1).float() if args.balance == "weight" else None
        model.train()
        t0 = time.time()
        meter, seen = train_cycle(net, [optimizer, head_optimizer], data, labels, cycle_order(labels, k, args, cycle),
                                  weights, augment, args, device)
        metrics.update(meter.averages(cycle, run))  # waits for the GPU, so the time below is complete
        run.log(cycle, metrics, seen * common.world_size(), time.time() - t0)
        run.save_checkpoint({"stage": "train", "epoch": cycle, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "labels": labels.cpu()})

    result = {"cycles": args.cycles}
    if labels is not None:
        result.update(assignment_nmis(labels, None, data.labels))
    if args.probe_epochs:
        if name == "imagefolder":  # eval_linear.py: 256 px centre crop, random 224 crop, flip
            probe_train = common.load_dataset(name, "train", args.data_dir, device, image_size=256)
            probe_augment = lambda u8: prepare(common.horizontal_flip(common.random_crop(u8, 224)))  # noqa: E731
        else:  # the Deep Dive: the clustering transform, no augmentation
            probe_train, probe_augment = data, prepare
        test = common.load_dataset(name, "test", args.data_dir, device)
        result.update(linear_probe(model, probe_train, test, probe_augment, prepare, args, device))
    run.finish(result)
    run.print("final: " + " | ".join(f"{key} {value:.4f}" for key, value in result.items() if key != "cycles"))


if __name__ == "__main__":
    common.run_main(main)
