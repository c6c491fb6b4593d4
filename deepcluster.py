"""DeepCluster, with the analysis tools of "A Deep Dive into Deep Cluster".

Mathilde Caron, Piotr Bojanowski, Armand Joulin, Matthijs Douze, "Deep Clustering for Unsupervised
Learning of Visual Features", ECCV 2018, arXiv:1807.05520; official code:
github.com/facebookresearch/deepcluster.
Ahmad Mustapha, Wael Khreich, Wassim Masri, "A Deep Dive into Deep Cluster", 2022; the author's code:
github.com/AhmadM-DL/DeepClusterImplementation.

Each cycle: features of every training image (network in eval mode), PCA-whitened to 256 dimensions
and L2-normalised, are clustered by k-means (20 iterations, a new seed every cycle); a fresh linear
head is trained with the network for one epoch of cross-entropy on the cluster ids, images drawn
uniformly over the clusters. The Deep Dive adds halting the clustering after H cycles, and the
Initial Alignment IA(theta, k) = NMI(labels, k-means of a random network's features) over seeds.

Reproduce: python deepcluster.py --dataset fashion-mnist        (Deep Dive: LeNet-5, 50 cycles, k 5)
           python deepcluster.py --dataset fashion-mnist --ia-seeds 100   (IA distribution, Fig. 3a)
  paper: accuracies in figures only; IA for k = 5 in 0.37-0.41. here (2-core CPU): Conv-2 probe
  87.9 % in 8 min (untrained LeNet-5: 86.4 %); IA median 0.433 over 100 seeds. See benchmarks/deepcluster.md.
           python deepcluster.py --dataset cifar10-appendix-a --compile   (Appendix A: AlexNet, 224 px)
  paper: 65.47 % after 100 cycles (Table A.2, PCA 256); here: not run yet (needs a GPU).

Deviations (each a flag where it is a choice):
  - k-means in torch (not faiss); an empty cluster is re-seeded by splitting a cluster drawn with
    probability ~ size - 1 (as faiss) at the median of a random projection, so none stays empty
  - every cycle, halted ones included, gets a fresh head (both official codes); the head is one SGD
    parameter group without momentum (official: a second optimizer, the same update)
  - --reassign R trains on int(R * N) images per cycle; the last incomplete batch is dropped
  - probe (eval_linear.py): single-crop test (official: 10 crops), weight decay 1e-4 (eval_linear.sh: 1e-7)
  - Fashion-MNIST: the author's jobs' crops without flip, at 28 px (they zoom 28 -> 44 -> 32); text: --flip
  - Appendix A: k-means from k random points (official code; the author: scikit-learn's k-means++)
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


# ================================================================================================
# Defaults
# ================================================================================================
# The Deep Dive's settings (Sec. 3.3 "Training Optimization" and its Table 1 of grids searched and
# settings chosen; k is the one its IA study fixes "based on grid search", Sec. 4.1.2), and the
# original ImageNet recipe (main.sh; Caron et al. Sec. 4). probe_layer: the Deep Dive evaluates
# ReLU-5 (SVHN, CIFAR-10) and Conv-2 (Fashion-MNIST); eval_linear.sh conv 3, average-pooled.
PAPER_DEFAULTS = {
    # Fashion-MNIST trains on RandomResizedCrop without flip: every job behind the Deep Dive's figures
    # does (the author's jobs/FMNIST); its text's flip leaves the probe below the untrained network.
    "fashion-mnist": dict(backbone="lenet5", sobel=False, lr=0.1, weight_decay=1e-3, momentum=0.1,
                          batch_size=128, cycles=50, pca_dim=0, num_clusters=5, probe_layer="conv2",
                          probe_epochs=20, probe_avgpool=False, random_resized_crop=True, flip=False),
    "svhn": dict(backbone="alexnet-small", sobel=True, lr=0.1, weight_decay=1e-3, momentum=0.5,
                 batch_size=64, cycles=100, pca_dim=256, num_clusters=200, probe_layer="relu5",
                 probe_epochs=20, probe_avgpool=False),
    "cifar10": dict(backbone="alexnet-small", sobel=True, lr=0.1, weight_decay=1e-3, momentum=0.9,
                    batch_size=64, cycles=100, pca_dim=256, num_clusters=1000, probe_layer="relu5",
                    probe_epochs=20, probe_avgpool=False),
    # Appendix A, "CIFAR10 using AlexNet" (Tables A.1, A.2): its text's lr, momentum, weight decay, k, PCA,
    # batch, BN and Sobel; the rest from the author's job behind Table A.2 (jobs/CIFAR10/cifar_pca/cifar.py):
    # AlexNet_Small on CIFAR-10 upscaled to 224 px (Resize 256 + CenterCrop 224 to cluster,
    # RandomResizedCrop 224 + flip to train), 100 cycles, probe on relu_5 average-pooled to 9216, 30 epochs.
    # Table A.1's halting runs (cifar_with_halt/cifar.py) ran 150 cycles: --cycles 150 --halt-clustering H.
    "cifar10-appendix-a": dict(backbone="alexnet-deepdive", sobel=True, lr=0.05, weight_decay=1e-5,
                               momentum=0.9, batch_size=256, cycles=100, pca_dim=256, num_clusters=2000,
                               probe_layer="relu5", probe_epochs=30, probe_avgpool=True,
                               random_resized_crop=True, image_size=224),
    "imagenet": dict(backbone="alexnet", sobel=True, lr=0.05, weight_decay=1e-5, momentum=0.9,
                     batch_size=256, cycles=500, pca_dim=256, num_clusters=10000, probe_layer="relu3",
                     probe_epochs=90, probe_avgpool=True, random_resized_crop=True),
    # Not in any paper: a CPU demo that learns in about 20 seconds.
    "synthetic": dict(backbone="lenet5", sobel=True, lr=0.1, weight_decay=1e-4, momentum=0.9,
                      batch_size=64, cycles=16, pca_dim=32, num_clusters=50, probe_layer="relu2",
                      probe_epochs=10, probe_avgpool=False),
}
PAPER_DEFAULTS["imagefolder"] = PAPER_DEFAULTS["imagenet"]
DATA = {"imagenet": "imagefolder", "cifar10-appendix-a": "cifar10"}  # the rows whose data has another name
# Settings of the official code shared by every dataset: clustering.py (faiss k-means, 20 iterations,
# random initial centroids), main.py (uniform sampling over clusters, --reassign 1), eval_linear.py.
SHARED_DEFAULTS = dict(kmeans_iters=20, kmeans_init="random", balance="sampler", reassign=1.0, flip=True,
                       random_resized_crop=False, image_size=0, width=64, probe_lr=0.01, probe_momentum=0.9,
                       probe_weight_decay=1e-4, probe_batch_size=256)
# common.build_backbone's feature sizes; the CIFAR ResNet-18's is 8 x its --width
FEATURE_DIMS = {"alexnet": 4096, "alexnet-small": 2048, "alexnet-deepdive": 2048, "lenet5": 84,
                "resnet18": None}
CONV_LAYERS = {"alexnet": 5, "alexnet-small": 5, "alexnet-deepdive": 5, "lenet5": 2, "resnet18": 0}
# eval_linear.py's RegLog: AvgPool2d(kernel, stride, padding) that brings AlexNet conv n to ~9k features
OFFICIAL_PROBE_POOL = {1: (6, 6, 3), 2: (4, 4, 0), 3: (3, 3, 1), 4: (3, 3, 1), 5: (2, 2, 0)}
# Flags that may change on --resume: extend the cycles, lower the learning rate after a divergence, or
# change the probe (it runs after training; a finished run is not probed again).
RESUMABLE = ("cycles", "lr", "probe_epochs")


# ================================================================================================
# Command line
# ================================================================================================
def parse_args(argv=None):
    dataset = common.peek_dataset(argv, "cifar10")
    p = common.ArgumentParser(
        description="DeepCluster (Caron et al., 2018) with the Deep Dive's Initial Alignment and halting.",
        epilog=f"Defaults shown are those of --dataset {dataset}: the Deep Dive's Table 1 and Sec. 3.3 "
        "(cifar10-appendix-a: its Appendix A and the author's code), or the official code; "
        "`--dataset NAME --help` shows another row. " + common.resume_epilog(RESUMABLE))
    b = argparse.BooleanOptionalAction
    p.add_argument("--dataset", default="cifar10",
                   help="fashion-mnist, svhn, cifar10 (the Deep Dive), cifar10-appendix-a (CIFAR-10 with the "
                   "Deep Dive's Appendix A recipe: AlexNet at 224 px), imagenet or imagefolder (the original "
                   "recipe on a folder of class folders), synthetic (CPU demo)")
    p.add_argument("--data-dir", default=common.default_data_dir(),
                   help="dataset folder (default: $DATA_DIR, else ./data)")
    g = p.add_argument_group("DeepCluster (the Deep Dive's Table 1 / the official main.sh)")
    g.add_argument("--backbone", choices=list(FEATURE_DIMS),
                   help="alexnet: BN AlexNet, 224 px (official); alexnet-small: the Deep Dive's 32 px "
                   "AlexNet; alexnet-deepdive: its Appendix A AlexNet (the author's AlexNet_Small: convs 64, "
                   "192, 384, 256, 256, fc 2048, for 224 px); lenet5: the Deep Dive's Fashion-MNIST network; "
                   "resnet18: CIFAR ResNet-18 (not in the papers)")
    g.add_argument("--width", type=common.positive_int, help="ResNet-18 stem width (not in the papers)")
    g.add_argument("--sobel", action=b, help="fixed grayscale + Sobel front-end (official code)")
    g.add_argument("--cycles", type=common.non_negative_int,
                   help="clustering + training cycles (main.py's --epochs: 200; paper: 500); 0 = the "
                   "untrained network's probe")
    g.add_argument("--num-clusters", "--k", type=common.positive_int,
                   help="k of k-means (ImageNet 10000; the Deep Dive 5 / 200 / 1000)")
    g.add_argument("--pca-dim", type=common.non_negative_int,
                   help="PCA-whitening dimension before L2 normalisation; 0 = no PCA (clustering.py)")
    g.add_argument("--kmeans-iters", type=common.non_negative_int, help="k-means iterations (clustering.py)")
    g.add_argument("--kmeans-init", choices=["random", "kmeans++"],
                   help="random = k distinct points, as faiss; kmeans++ (Arthur and Vassilvitskii)")
    g.add_argument("--balance", choices=["sampler", "weight", "none"],
                   help="sampler: images drawn uniformly over clusters (official code); weight: loss "
                   "weighted by 1 / cluster size (paper, slides); none")
    g.add_argument("--reassign", type=common.positive_float,
                   help="epochs of training per clustering (main.py --reassign)")
    g.add_argument("--halt-clustering", type=common.positive_int, metavar="H",
                   help="cluster only in the first H cycles, then keep training on the last "
                   "pseudo-labels (the Deep Dive, Sec. 4.2; default: never halt)")
    g.add_argument("--lr", type=common.positive_float,
                   help="SGD learning rate of the body and of each cycle's head")
    g.add_argument("--momentum", type=common.fraction,
                   help="SGD momentum of the body; the head has none (official code)")
    g.add_argument("--weight-decay", type=common.non_negative_float, help="body and head")
    g.add_argument("--batch-size", type=common.positive_int, help="per device")
    g.add_argument("--flip", action=b, help="random horizontal flip in training")
    g.add_argument("--random-resized-crop", action=b,
                   help="RandomResizedCrop(0.08-1) in training: the official ImageNet code, and the Deep "
                   "Dive author's code (without flip), not its text")
    g.add_argument("--image-size", type=common.non_negative_int,
                   help="upscale the images to this side: bilinear to 8/7 of it, then a centre crop to "
                   "cluster and test, a random one for the probe's training (the Deep Dive author's Resize "
                   "256 + CenterCrop 224 for Appendix A); 0 = the dataset's own size")
    g = p.add_argument_group("linear probe at the end (eval_linear.py's protocol)")
    g.add_argument("--probe-layer", help="reluN (after the N-th conv's ReLU; the Deep Dive's ReLU-5), "
                   "convN (the N-th convolution's output; its Conv-2 of LeNet-5) or output (the features)")
    g.add_argument("--probe-avgpool", action=b,
                   help="eval_linear.py's average pooling of AlexNet conv layers to ~9k features")
    g.add_argument("--probe-epochs", type=common.non_negative_int,
                   help="the Deep Dive: 20; eval_linear.py: 90; 0 = no probe")
    g.add_argument("--probe-lr", type=common.positive_float, help="lr0 of lr_t = lr0 / sqrt(1 + lr0 wd t)")
    g.add_argument("--probe-momentum", type=common.fraction, help="SGD momentum of the probe")
    g.add_argument("--probe-weight-decay", type=common.non_negative_float,
                   help="weight decay of the probe, as eval_linear.py (eval_linear.sh passes 1e-7)")
    g.add_argument("--probe-batch-size", type=common.positive_int, help="per device")
    g = p.add_argument_group("Initial Alignment (the Deep Dive, Sec. 4.1: no training, needs labels)")
    g.add_argument("--ia-seeds", type=common.non_negative_int, default=0,
                   help="sample IA over this many random networks (seeds --seed, --seed + 1, ...; the "
                   "paper uses 100); 0 = train instead")
    g.add_argument("--ia-k", type=common.positive_int, nargs="+",
                   help="values of k (default: --num-clusters)")
    g.add_argument("--ia-pca", type=common.non_negative_int, nargs="+",
                   help="PCA dimensions, 0 = none (default: --pca-dim)")
    common.add_run_arguments(p, "deepcluster")
    p.set_defaults(**{**SHARED_DEFAULTS, **PAPER_DEFAULTS.get(dataset, PAPER_DEFAULTS["cifar10"])})
    return common.parse_arguments(p, argv, "deepcluster.py", check_args, RESUMABLE)


def check_args(p, args):
    """Combinations of flags that cannot work: refused before anything runs (exit code 2)."""
    if args.dataset not in PAPER_DEFAULTS:
        p.error(f"unknown dataset {args.dataset!r}; choose one of {', '.join(PAPER_DEFAULTS)}")
    args.ia_k, args.ia_pca = args.ia_k or [args.num_clusters], args.ia_pca or [args.pca_dim]
    feature_dim = FEATURE_DIMS[args.backbone] or 8 * args.width
    for pca in [args.pca_dim, *args.ia_pca]:
        if pca > feature_dim:
            p.error(f"--pca-dim {pca} is larger than the {args.backbone} features ({feature_dim})")
    match = re.fullmatch(r"(conv|relu)([1-9])|output", args.probe_layer)
    if not match or (match.group(2) and int(match.group(2)) > CONV_LAYERS[args.backbone]):
        p.error(f"--probe-layer {args.probe_layer} does not exist in {args.backbone}: use output or convN / "
                f"reluN with N <= {CONV_LAYERS[args.backbone]}")
    if args.probe_avgpool and args.probe_layer == "output":
        p.error("--probe-avgpool pools a conv layer; --probe-layer output has no spatial dimensions")
    if args.image_size and DATA.get(args.dataset) == "imagefolder":
        p.error("--image-size is for datasets held in memory; folder images are resized by the loader")


# ================================================================================================
# Model
# ================================================================================================
# Sobel front-end + backbone, whose last fc layer before its ReLU is clustered, + a head.
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
    """`features(x)`: what is clustered, the backbone's last fc layer before its ReLU (the official
    code removes that ReLU to cluster and appends it again, with the head, to train). `forward(x)`:
    the head's logits over the k pseudo-classes, head(ReLU(features(x)))."""

    def __init__(self, backbone, num_clusters, sobel_channels=0):
        super().__init__()
        self.sobel = Sobel(sobel_channels) if sobel_channels else nn.Identity()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_clusters)

    def features(self, x):
        return self.backbone(self.sobel(x))

    def forward(self, x):
        return self.head(F.relu(self.features(x)))


def build_model(args, channels, image_side):
    backbone = common.build_backbone(args.backbone, 2 if args.sobel else channels, width=args.width,
                                     image_size=args.image_size or image_side)
    return DeepClusterNet(backbone, args.num_clusters, channels if args.sobel else 0)


@torch.no_grad()
def reset_head(head, generator):
    """A fresh classifier each cycle (cluster ids mean nothing across cycles): N(0, 0.01) weights, zero
    bias (main.py). Drawn from `generator`, so every rank draws the same head."""
    head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
    head.bias.zero_()


# ================================================================================================
# Method: PCA-whitening, L2 normalisation, k-means (clustering.py: preprocess_features, run_kmeans)
# ================================================================================================
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
    """The nearest centroid of each row of x: argmin_j ||x_i - c_j||^2 = argmin_j (||c_j||^2 - 2 x_i.c_j),
    one block of rows (about `chunk_elements` distances) at a time. x: float32 (N, d), centroids:
    float32 (k, d); returns int64 (N,), the first index among tied minima.
    CUDA: argmin of each (rows, k) block (the matmul in TF32 when the process allows it, as
    common.setup_device does). CPU: torch's argmin is a scalar loop that costs as much as the matmul,
    so each block is computed transposed, s = 2 C x_b^T - ||c||^2 of shape (k, rows) (the negated
    distances, bit for bit: scaling by +-2 is exact and rounding is symmetric), and its argmax over k
    is a channels-last max_pool2d, vectorised across the rows (strict >, so also the first index)."""
    if x.is_cuda:
        c_sq = (centroids ** 2).sum(1)
        rows = max(1, chunk_elements // len(centroids))
        return torch.cat([torch.addmm(c_sq, xb, centroids.T, alpha=-2).argmin(1) for xb in x.split(rows)])
    k = len(centroids)
    neg_c_sq = -(centroids ** 2).sum(1, keepdim=True)
    rows = max(1, chunk_elements // k)
    labels, scores = x.new_empty(len(x), dtype=torch.long), x.new_empty(k, min(rows, len(x)))
    for start in range(0, len(x), rows):
        xb = x[start:start + rows]
        s = torch.addmm(neg_c_sq, centroids, xb.T, alpha=2, out=scores[:, :len(xb)])
        # (k, rows) seen as a (1, rows, 1, k) image, channels last: one max over its k pixels per channel
        _, best = F.max_pool2d(s[None, None].permute(0, 3, 1, 2), (1, k), return_indices=True)
        labels[start:start + len(xb)] = best.view(-1)
    return labels


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
    # GPU: few big matmuls; CPU: blocks of 8 MB, a few per pass: fewer parallel regions, which cost
    # much on a busy machine (benchmarks/deepcluster.md, k-means on the CPU)
    chunk_elements = chunk_elements or 2 ** (27 if x.is_cuda else 21)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    centroids = init_centroids(x, k, init, generator)
    for it in range(iters + 1):
        labels, centroids = split_empty_clusters(x, assign(x, centroids, chunk_elements), centroids,
                                                 generator)
        if it == iters:
            break
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)
        centroids = torch.zeros_like(centroids).index_add_(0, labels, x) / counts
    rows = max(1, chunk_elements // x.shape[1])
    inertia = sum(((xb - centroids[yb]) ** 2).sum(dtype=torch.float64).item()  # the same for any block size
                  for xb, yb in zip(x.split(rows), labels.split(rows)))
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


def cluster(model, data, prepare, labels, args, cycle, device):
    """One clustering (clustering.py): features, PCA-whitening, k-means; the new pseudo-labels
    replace `labels` in place. Returns the k-means loss, the NMIs with the previous labels and the
    ground truth, and the time it took."""
    t0 = time.time()
    features, _ = common.extract_features(model.features, data, prepare, args.eval_batch_size, args.amp)
    new, _, inertia = kmeans(preprocess(features, args.pca_dim), args.num_clusters, args.kmeans_iters,
                             args.kmeans_init, cycle_seed(args.seed, cycle, 0))
    if dist.is_initialized():  # identical inputs and seed; rank 0's result is the reference
        dist.broadcast(new, 0)
    metrics = assignment_nmis(new, labels if bool((labels >= 0).all()) else None, data.labels)
    labels.copy_(new)
    return {"kmeans_loss": inertia, **metrics, "cluster_seconds": time.time() - t0}


# ================================================================================================
# Method: balancing the pseudo-classes (main.py: UnifLabelSampler; slides: inverse-size loss weights)
# ================================================================================================
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
    return torch.cat([torch.randperm(len(labels), generator=generator)
                      for _ in range(math.ceil(args.reassign))])[:n]


# ================================================================================================
# Data and augmentation
# ================================================================================================
def load_data(args, device):
    """The training images, the probe's training and test splits (loaded now, so that a missing
    test split is found before the cycles, not after them), their channels and side. Sizes are
    checked here, before a run directory exists."""
    name = DATA.get(args.dataset, args.dataset)
    data = common.load_dataset(name, "train", args.data_dir, device)
    n = len(data)
    for k in [args.num_clusters, *args.ia_k]:
        if k > n:
            raise common.Abort(f"--num-clusters {k} is larger than {args.dataset} ({n} training images)")
    if max(args.pca_dim, *args.ia_pca) >= n:
        raise common.Abort(f"--pca-dim {max(args.pca_dim, *args.ia_pca)} needs more than {n} training images")
    per_cycle = int(args.reassign * n)
    common.check_batch_size("--batch-size", args.batch_size, per_cycle,
                            f"the images of one cycle (--reassign {args.reassign:g} x {n})")
    probe_train = probe_test = None
    if args.probe_epochs and not args.ia_seeds:
        # eval_linear.py on ImageNet: 256 px centre crops, then a random 224 crop; else the same images
        probe_train = (common.load_dataset(name, "train", args.data_dir, device, image_size=256)
                       if name == "imagefolder" else data)
        probe_test = common.load_dataset(name, "test", args.data_dir, device)
        common.check_batch_size("--probe-batch-size", args.probe_batch_size, len(probe_train),
                                f"{args.dataset}'s train split")
    channels, side = (data.images.shape[1], data.images.shape[-1]) if hasattr(data, "images") else (3, 224)
    return data, probe_train, probe_test, channels, side


def upscale(x, size):
    """float (B, C, s, s) -> (B, C, 8 size / 7, 8 size / 7), bilinear: the author's Resize(256) before
    its 224 crops."""
    return F.interpolate(x, size=size * 8 // 7, mode="bilinear", align_corners=False)


def center_crop(x, size):
    top = (x.shape[-1] - size) // 2
    return x[..., top:top + size, top:top + size]


def make_transforms(args, data, device):
    """uint8 batch -> normalised float batch: `prepare` for the clustering pass (deterministic; folder
    images are Resize + CenterCrop'ed by the loader, --image-size ones here), `augment` for training: +
    RandomResizedCrop to the image size (done by the loader's workers for folder images) and random flip."""
    memory = common.memory_format(device)
    crop_here = args.random_resized_crop and isinstance(data, common.TensorImages)

    def prepare(x):
        x = common.to_float(x)
        x = center_crop(upscale(x, args.image_size), args.image_size) if args.image_size else x
        return common.normalize(x, data.mean, data.std).contiguous(memory_format=memory)

    def augment(x):
        x = common.to_float(x)
        if crop_here:
            x = common.random_resized_crop(x, args.image_size or x.shape[-1])
        elif args.image_size:
            x = center_crop(upscale(x, args.image_size), args.image_size)
        x = common.horizontal_flip(x) if args.flip else x
        return common.normalize(x, data.mean, data.std).contiguous(memory_format=memory)

    return augment, prepare


# ================================================================================================
# Stage: Initial Alignment (the Deep Dive, Sec. 4.1.1 and 4.3, Fig. 3, 6, B.1-B.3)
# ================================================================================================
def initial_alignment(args, data, prepare, run, device, channels, side):
    """IA(theta, k) = NMI(Y, k-means_k(f_theta(X))) for randomly initialised networks theta: the network of
    seed s is the one a training run with --seed s starts from, clustered as its first cycle."""
    values = {(k, pca): [] for k in args.ia_k for pca in args.ia_pca}
    run.start_stage("initial-alignment", args.ia_seeds)
    for i in range(args.ia_seeds):
        t0, seed = time.time(), args.seed + i
        common.seed_everything(seed, args.deterministic)
        model = build_model(args, channels, side).to(device)
        features, _ = common.extract_features(model.eval().features, data, prepare, args.eval_batch_size,
                                              args.amp)
        line = {}
        for pca in args.ia_pca:
            x = preprocess(features, pca)
            for k in args.ia_k:
                labels = kmeans(x, k, args.kmeans_iters, args.kmeans_init, cycle_seed(seed, 0, 0))[0]
                known = data.labels >= 0  # unknown labels (-1) are not a class
                values[(k, pca)].append(common.nmi(labels[known], data.labels[known]))
                line[f"ia_k{k}_pca{pca}"] = values[(k, pca)][-1]
        run.log(i, line, len(data), time.time() - t0)
    summary = {}
    for (k, pca), v in values.items():
        q = torch.tensor(v, dtype=torch.float64).quantile(torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0],
                                                                       dtype=torch.float64))
        summary[f"k{k}_pca{pca}"] = {"k": k, "pca_dim": pca, "min": q[0].item(), "q1": q[1].item(),
                                     "median": q[2].item(), "q3": q[3].item(), "max": q[4].item(),
                                     "values": v}
        run.print(f"IA k={k} pca={pca or 'off'} over {len(v)} seeds: median {q[2]:.4f} quartiles "
                  f"[{q[1]:.4f}, {q[3]:.4f}] range [{q[0]:.4f}, {q[4]:.4f}]")
    run.finish({"initial_alignment": summary, "seeds": list(range(args.seed, args.seed + args.ia_seeds))})


# ================================================================================================
# Stage: linear probe on a frozen layer (eval_linear.py)
# ================================================================================================
def probe_features(model, x, layer, avgpool):
    """eval_linear.py's forward: through the Sobel front-end and the conv stack up to `layer` (reluN:
    after the N-th ReLU; convN: the N-th convolution's output), average-pooled as RegLog, flattened."""
    if layer == "output":
        return model.features(x)
    kind, n = layer[:4], int(layer[4:])
    x, count = model.sobel(x), 0
    for module in model.backbone.features:
        x = module(x)
        count += isinstance(module, nn.ReLU if kind == "relu" else nn.Conv2d)
        if count == n:
            break
    return (F.avg_pool2d(x, *OFFICIAL_PROBE_POOL[n]) if avgpool else x).flatten(1)


def eval_linear_probe(model, train, test, augment, prepare, args, device):
    """Logistic regression on a frozen layer, eval_linear.py's protocol as the Deep Dive uses it: network
    in eval mode (BatchNorm frozen), SGD with momentum, lr_t = lr0 / sqrt(1 + lr0 wd t) at step t.
    Returns the last epoch's training loss and accuracy, and the test accuracy."""
    model.eval()

    def frozen(x):
        return probe_features(model, x, args.probe_layer, args.probe_avgpool).float()

    _, images, _ = next(test.batches(torch.arange(2), 2))
    with torch.no_grad():  # the probed layer's width, read off two test images
        dim = frozen(prepare(images)).shape[1]
    reglog = nn.Linear(dim, train.num_classes).to(device)
    optimizer = torch.optim.SGD(reglog.parameters(), lr=args.probe_lr, momentum=args.probe_momentum,
                                weight_decay=args.probe_weight_decay)
    decay = args.probe_lr * args.probe_weight_decay
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 / math.sqrt(1 + decay * t))
    step = common.wrap_model(reglog, device)
    for epoch in range(args.probe_epochs):
        meter = common.Meter()
        for _, images, y in common.EpochBatches(train, args.probe_batch_size, args.seed + 1, epoch):
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
    predictions, labels = common.extract_features(lambda x: reglog(frozen(x)).argmax(1, keepdim=True), test,
                                                  prepare, args.eval_batch_size, args.amp)
    test_acc = (predictions.flatten().long() == labels).float().mean().item()
    return {"probe_loss": train_metrics["loss"], "probe_train_acc": train_metrics["acc"],
            "probe_test_acc": test_acc}


# ================================================================================================
# Training
# ================================================================================================
def train_one_epoch(model, optimizer, data, augment, args, epoch, run, device, labels):
    """One cycle's training on the pseudo-labels (an "epoch" of the common loop is a cycle): Caron et
    al.'s Eq. 1, min over theta and W of 1/N sum_n l(g_W(f_theta(x_n)), y_n), with l the cross-entropy,
    g_W the fresh head and y_n the cluster ids, body and head updated; images drawn by `cycle_order`
    (uniformly over the clusters by default). Returns the meter of losses and the number of images
    trained on."""
    k = args.num_clusters
    weights = (1.0 / torch.bincount(labels, minlength=k).clamp(min=1).float()
               if args.balance == "weight" else None)
    meter, images_seen = common.Meter(), 0
    order = cycle_order(labels, k, args, epoch)
    for idx, images, _ in run.batches(data, args.batch_size, epoch, meter, order, args.random_resized_crop):
        with common.autocast(device, args.amp):
            logits = model(augment(images))
        loss = F.cross_entropy(logits.float(), labels[idx], weight=weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.add(loss=loss)
        images_seen += len(idx) * common.world_size()
    return meter, images_seen


# ================================================================================================
# Evaluation
# ================================================================================================
def kmeans_on_classes(model, data, prepare, args):
    """ACC / NMI / ARI of k-means with K = the number of classes on the training images' learned features,
    preprocessed as `cluster` does (PCA-whitened, L2-normalised): the clustering scores LSD-C reports,
    so that DeepCluster sits in the same results table."""
    features, _ = common.extract_features(model.eval().features, data, prepare, args.eval_batch_size,
                                          args.amp)
    labels = kmeans(preprocess(features, args.pca_dim), data.num_classes, args.kmeans_iters, args.kmeans_init,
                    cycle_seed(args.seed, args.cycles, 0))[0]  # a seed no training cycle used
    scores = common.clustering_metrics(labels, data.labels, data.num_classes, data.num_classes)
    return {key: scores[key] for key in ("acc", "nmi", "ari")}


def evaluate(raw_model, data, labels, probe_train, probe_test, augment, prepare, args, device):
    """NMI of the last pseudo-labels with the ground truth, k-means with K = the classes on the learned
    features, and the linear probe's accuracies."""
    result = assignment_nmis(labels, None, data.labels) if bool((labels >= 0).all()) else {}
    if bool((data.labels >= 0).any()):
        result.update(kmeans_on_classes(raw_model, data, prepare, args))
    if args.probe_epochs:
        def probe_augment(u8):  # eval_linear.py: a random 224 crop of 256, flip; the author's for
            if args.dataset in ("imagenet", "imagefolder"):  # Appendix A: the same of its upscaled images
                u8 = common.horizontal_flip(common.random_crop(u8, 224))
            elif args.image_size:
                x = common.random_crop(upscale(common.to_float(u8), args.image_size), args.image_size)
                x = common.normalize(common.horizontal_flip(x), probe_train.mean, probe_train.std)
                return x.contiguous(memory_format=common.memory_format(device))
            return prepare(u8)
        result.update(eval_linear_probe(raw_model, probe_train, probe_test, probe_augment, prepare, args,
                                        device))
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
    data, probe_train, probe_test, channels, side = load_data(args, device)
    raw_model = build_model(args, channels, side).to(device, memory_format=common.memory_format(device))
    if common.rank():
        common.seed_everything(args.seed + common.rank(), args.deterministic)  # own augmentation draws
    augment, prepare = make_transforms(args, data, device)
    run = common.Run("deepcluster", args)  # once the data is there: no empty runs
    run.print(f"run: {run.path} | {args.dataset}: {len(data)} images, k={args.num_clusters}, {args.backbone}"
              f"{' + Sobel' if args.sobel else ''} | device {device} x {common.world_size()}")

    # --- extra stages: Initial Alignment (no training)
    if args.ia_seeds:
        return initial_alignment(args, data, prepare, run, device, channels, side)

    # --- resume
    head = list(raw_model.head.parameters())
    body = [p for p in raw_model.parameters() if all(p is not h for h in head)]
    optimizer = torch.optim.SGD([{"params": body, "momentum": args.momentum},
                                 {"params": head, "momentum": 0.0}],
                                lr=args.lr, weight_decay=args.weight_decay)
    labels = torch.full((len(data),), -1, dtype=torch.long, device=device)  # -1: not clustered yet
    clustering = {}  # the metrics of this cycle's clustering, kept by a checkpoint taken inside the cycle
    start = run.resume("train", args.cycles, model=raw_model, optimizer=optimizer, labels=labels,
                       clustering=clustering)
    model = common.wrap_model(raw_model, device, args.compile)

    # --- training
    for epoch in range(start, args.cycles):  # an epoch is a cycle: clustering, then training
        if not run.inside_epoch:  # a run stopped inside this cycle continues it with its labels and head
            clustering.clear()
            if args.halt_clustering is None or epoch < args.halt_clustering:  # Deep Dive Sec. 4.2
                raw_model.eval()
                clustering.update(cluster(raw_model, data, prepare, labels, args, epoch, device))
            reset_head(raw_model.head, torch.Generator().manual_seed(cycle_seed(args.seed, epoch, 2)))
        t0 = time.time()
        raw_model.train()
        meter, images_seen = train_one_epoch(model, optimizer, data, augment, args, epoch, run, device,
                                             labels)
        metrics = meter.averages(epoch, run)  # waits for the device, so the time below is complete
        seconds = time.time() - t0
        metrics.update(lr=optimizer.param_groups[0]["lr"], **clustering)
        run.end_epoch(epoch, metrics, images_seen, seconds)

    # --- final evaluation
    result = {"cycles": args.cycles, **evaluate(raw_model, data, labels, probe_train, probe_test, augment,
                                                prepare, args, device)}
    run.finish(result)
    run.print("final: " + " | ".join(f"{key} {value:.4f}" for key, value in result.items()
                                     if key != "cycles"))


if __name__ == "__main__":
    common.run_main(main)
