"""CLD: Cross-Level instance-group Discrimination, on NPID or MoCo.

Xudong Wang, Ziwei Liu, Stella X. Yu, "Unsupervised Feature Learning by Cross-Level Instance-Group
Discrimination", CVPR 2021, arXiv:2008.03813. Official code: github.com/frank-xwang/CLD-UnsupervisedLearning.

A ResNet's pooled feature h forks into an instance head f_I and a group head f_G (L2-normalised).
f_I learns instance discrimination (NPID: a memory bank of every image; MoCo: a key encoder and a
queue). In every batch, each of two views is grouped by k-means on f_G; each view's f_G must then
pick, among the other view's centroids, the group its twin belongs to (cross-view, cross-level
contrast). Loss: L_instance + lambda L_CLD. Evaluation: weighted kNN on f_I.

Reproduce: python cld.py --dataset cifar10 --compile          (NPID+CLD, 200 epochs)
  paper: 86.7 % kNN top-1 on CIFAR-10 (official README; Table A.2: 86.5). Not yet run on a GPU here;
  CPU demo: python cld.py --dataset synthetic --device cpu. See benchmarks/cld.md.

Deviations from the official code (each a flag where it is a choice):
  - the last incomplete batch of an epoch is dropped (official: a last CIFAR batch of 80 images,
    fewer than K = 128 groups), so every batch holds at least K samples
  - an empty group keeps its previous centroid (official: a zero centroid); none is NaN
  - the memory bank is updated after the backward pass (view 1, then view 2), so both views'
    gradients use the bank they were scored against (official: updated inside backward)
  - STL-10 pools the whole 12x12 feature map (official avg_pool2d(out, 7) pools one corner)
  - augmentation runs batched on the device; imagefolder views are cropped from the 224 centre crop
  - no official code: cifar10-lt / cifar100-lt (imbalance --imbalance, default 100) and STL-10
    take the CIFAR rows' settings
"""
import argparse
import math
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common


# ================================================================================================
# Defaults
# ================================================================================================
# The official CIFAR scripts (scripts/cifar/train_<dataset>_<base>_cld.sh), in the order of their
# variables: batch size, groups K, weight decay, lambda, CLD temperature, instance temperature,
# queue (MoCo); lr is the scripts' 0.03 x batch / 128. The supplementary's text (Sec. 2) says lr
# 0.03 and weight decay 1e-4 for every CIFAR run. ImageNet: the MoCo-v2+CLD script.
PAPER_DEFAULTS = {
    "npid": {
        "cifar10": dict(batch_size=256, num_clusters=128, weight_decay=7e-4, cld_lambda=1.0,
                        cld_temperature=0.2, instance_temperature=0.1, lr=0.06),
        "cifar100": dict(batch_size=256, num_clusters=200, weight_decay=7e-4, cld_lambda=1.0,
                         cld_temperature=0.2, instance_temperature=0.1, lr=0.06),
        # ImageNet-size folders: the supplementary's Sec. 2 (batch 256, lr 0.03, wd 1e-4, 224 px),
        # Table A.3's best lambda 0.25, NPID's ImageNet temperature 0.07, K as the MoCo row.
        "imagefolder": dict(batch_size=256, num_clusters=120, weight_decay=1e-4, cld_lambda=0.25,
                            cld_temperature=0.2, instance_temperature=0.07, lr=0.03,
                            backbone="resnet50-imagenet"),
        # Not in the papers: a CPU run on the synthetic images (2,000, 10 classes of a shape in a
        # hue): a narrow network, small batches (K 16 groups of the 10 classes), crops and flips
        # only (colour jitter would teach invariance to the hue, half of what tells the classes
        # apart). NPID learns slowly here (the bank is refreshed once an epoch); the CPU demo is MoCo.
        "synthetic": dict(batch_size=64, num_clusters=16, weight_decay=5e-4, cld_lambda=1.0,
                          cld_temperature=0.2, instance_temperature=0.1, lr=0.06, epochs=12,
                          warmup_epochs=1, width=8, probe_epochs=30, augmentation="crop"),
    },
    "moco": {
        "cifar10": dict(batch_size=256, num_clusters=200, weight_decay=8e-4, cld_lambda=0.8,
                        cld_temperature=0.2, instance_temperature=0.07, queue_size=12288, lr=0.06),
        "cifar100": dict(batch_size=128, num_clusters=100, weight_decay=7e-4, cld_lambda=0.25,
                         cld_temperature=0.2, instance_temperature=0.07, queue_size=4096, lr=0.03),
        "imagefolder": dict(batch_size=256, num_clusters=120, weight_decay=1e-4, cld_lambda=0.25,
                            cld_temperature=0.4, instance_temperature=0.2, queue_size=65536, lr=0.1,
                            backbone="resnet50-imagenet", mlp_head=True),
        # Not in the papers: the CPU demo (under a minute on one core), crops and flips only as
        # NPID's row. The key encoder trails by 0.99, not 0.999: over the demo's 124 steps, 0.999
        # would leave it 88 % at its initialisation.
        "synthetic": dict(batch_size=64, num_clusters=16, weight_decay=5e-4, cld_lambda=0.8,
                          cld_temperature=0.2, instance_temperature=0.07, queue_size=512, lr=0.06,
                          epochs=4, warmup_epochs=1, width=8, probe_epochs=30, key_momentum=0.99,
                          augmentation="crop"),
    },
}
# Datasets without a script of their own take the row of their kin (no official code for them).
KIN = {"cifar10-lt": "cifar10", "cifar100-lt": "cifar100", "stl10": "cifar10", "imagefolder": "cifar10"}
# Shared by every run: the official train_cifar_*_cld.py and lib/lr_scheduler.py.
SHARED_DEFAULTS = dict(epochs=200, momentum=0.9, warmup_epochs=5, warmup_multiplier=100.0, final_lr=1e-6,
                       kmeans_iters=5, feature_dim=128, bank_momentum=0.5, key_momentum=0.999,
                       backbone="resnet18", width=64, mlp_head=False, knn_k=200, probe_epochs=100)
BASE_DEFAULTS = {  # NPID: the plain script; MoCo: --normlinear --aug-plus --erasing --three-imgs
    "npid": dict(normlinear=False, augmentation="npid", erasing=False, queue_size=None),
    "moco": dict(normlinear=True, augmentation="mocov2", erasing=True),
}
DEFAULT_BASE = {"imagefolder": "moco"}  # the ImageNet recipe the official code gives
DATASETS = ["cifar10", "cifar100", "cifar10-lt", "cifar100-lt", "stl10", "imagefolder", "synthetic"]
# Flags that may change on --resume: extend the schedule, lower the learning rate after a divergence.
RESUMABLE = ("epochs", "lr", "eval_every")


def defaults(base, dataset):
    row = PAPER_DEFAULTS[base].get(dataset) or PAPER_DEFAULTS[base][KIN.get(dataset, "cifar10")]
    image_size = {"stl10": 96, "imagefolder": 224}.get(dataset, 32)
    return {**SHARED_DEFAULTS, **BASE_DEFAULTS[base], **row, "image_size": image_size}


# ================================================================================================
# Command line
# ================================================================================================
def parse_args(argv=None):
    dataset = common.peek_dataset(argv, "cifar10")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--base", default=DEFAULT_BASE.get(dataset, "npid"))
    base = pre.parse_known_args(argv)[0].base
    p = common.ArgumentParser(
        description="CLD (Wang, Liu, Yu, CVPR 2021): instance discrimination (NPID or MoCo) + "
        "cross-level instance-group discrimination.",
        epilog=f"Defaults shown are those of --dataset {dataset} with --base {base}: the official scripts "
        "(scripts/cifar/*.sh); `--dataset NAME --base B --help` shows another row. "
        + common.resume_epilog(RESUMABLE))
    b = argparse.BooleanOptionalAction
    p.add_argument("--dataset", default="cifar10",
                   help="cifar10, cifar100 (official scripts), cifar10-lt, cifar100-lt, stl10 "
                   "(train+unlabeled, 96 px), imagefolder (ImageNet-100, ImageNet, Kitchen-HC: 224 px) "
                   "or synthetic (CPU demo)")
    p.add_argument("--data-dir", default=common.default_data_dir(),
                   help="dataset folder (default: $DATA_DIR, else ./data)")
    p.add_argument("--imbalance", type=common.positive_float, default=100.0,
                   help="-lt datasets: largest / smallest class size of the long-tailed train split "
                   "(no official code; 100 is the common choice of Cao et al.)")
    g = p.add_argument_group("instance discrimination (the base method)")
    g.add_argument("--base", choices=["npid", "moco"], default=DEFAULT_BASE.get(dataset, "npid"),
                   help="npid: memory bank, full softmax (train_cifar_npid_cld.py); moco: key encoder "
                   "and queue, three views (train_cifar_moco_cld.py; imagefolder: the MoCo-v2+CLD "
                   "ImageNet script)")
    g.add_argument("--backbone", choices=["resnet18", "resnet50", "resnet50-imagenet"],
                   help="CIFAR ResNet with 1x1-conv shortcuts (official), or torchvision's ResNet-50 "
                   "at 224 px")
    g.add_argument("--width", type=common.positive_int,
                   help="CIFAR ResNet stem width (64 in the paper; smaller only for CPU runs)")
    g.add_argument("--feature-dim", type=common.positive_int, help="output size of both heads (low_dim)")
    g.add_argument("--normlinear", action=b,
                   help="cosine linear heads without bias (the MoCo scripts' NormedLinear)")
    g.add_argument("--mlp-head", action=b,
                   help="instance head Linear-ReLU-Linear (MoCo-v2's --mlp, the ImageNet script)")
    g.add_argument("--instance-temperature", type=common.positive_float,
                   help="T of the instance logits (NPID --nce-t 0.1, MoCo 0.07; Table A.4)")
    g.add_argument("--bank-momentum", type=common.fraction,
                   help="NPID: v_i <- normalize(m v_i + (1 - m) f_I(x_i)) (--nce-m)")
    g.add_argument("--queue-size", type=common.positive_int,
                   help="MoCo: negative keys kept (--nce-k: CIFAR-10 12288, CIFAR-100 4096)")
    g.add_argument("--key-momentum", type=common.fraction,
                   help="MoCo: key encoder = EMA of the query encoder's parameters (--alpha)")
    g = p.add_argument_group("cross-level instance-group discrimination (Sec. 3 and supplementary)")
    g.add_argument("--cld-lambda", type=common.non_negative_float,
                   help="lambda of L_CLD; 0 = the base method alone (Table A.2, first row; Table A.3)")
    g.add_argument("--num-clusters", "--groups", type=common.positive_int,
                   help="K, groups per view and batch (--clusters; the supplementary's Table A.1)")
    g.add_argument("--cld-temperature", type=common.positive_float,
                   help="T_c of the instance-group logits (--cld_t; Table A.4)")
    g.add_argument("--grouping", choices=["kmeans", "spectral"], default="kmeans",
                   help="kmeans (official scripts) or spectral: normalised-Laplacian eigenvectors, then "
                   "k-means (Table A.1)")
    g.add_argument("--kmeans", choices=["euclidean", "spherical"], default="euclidean",
                   help="euclidean: squared distances and plain means (official code); spherical: cosine "
                   "assignment and normalised means (the supplementary's eq. 1)")
    g.add_argument("--kmeans-iters", type=common.positive_int, help="k-means iterations (--num_iters)")
    g.add_argument("--eigenvectors", type=common.positive_int,
                   help="spectral grouping: eigenvectors kept (default: K)")
    g.add_argument("--subspace", choices=["separate", "shared"], default="separate",
                   help="separate: own group head (the method); shared: groups on f_I (Table A.2)")
    g.add_argument("--cross-view", action=b, default=True,
                   help="score each view against the other view's groups (Table A.2, last row); "
                   "--no-cross-view: against its own")
    g = p.add_argument_group("optimisation (official scripts; the supplementary's text: lr 0.03, wd 1e-4)")
    g.add_argument("--epochs", type=common.non_negative_int,
                   help="training epochs (0 = evaluate the untrained network)")
    g.add_argument("--batch-size", type=common.positive_int, help="per device; groups live inside it")
    g.add_argument("--lr", type=common.positive_float, help="SGD learning rate (0.03 x batch / 128)")
    g.add_argument("--momentum", type=common.fraction, help="SGD momentum")
    g.add_argument("--weight-decay", type=common.non_negative_float, help="SGD weight decay")
    g.add_argument("--warmup-epochs", type=common.non_negative_int,
                   help="per-step linear warm-up from lr / --warmup-multiplier (lib/lr_scheduler.py)")
    g.add_argument("--warmup-multiplier", type=common.positive_float, help="warm-up starts at lr / this")
    g.add_argument("--final-lr", type=common.non_negative_float, help="the cosine's last learning rate")
    g.add_argument("--augmentation", choices=["npid", "mocov2", "crop"],
                   help="npid: crop 0.2-1, jitter 0.4 (hue 0.4) always, grayscale 0.2, flip; mocov2 adds "
                   "blur and jitter hue 0.1 with p 0.8 (--aug-plus); crop: crop and flip only (the MoCo "
                   "script's --aug NULL)")
    g.add_argument("--erasing", action=b, help="random erasing after normalisation (MoCo scripts' --erasing)")
    g.add_argument("--image-size", type=common.positive_int, help="training crop side in pixels")
    g = p.add_argument_group("evaluation")
    g.add_argument("--knn-k", type=common.positive_int,
                   help="neighbours of the weighted kNN on f_I, votes exp(sim / instance T) (NPID)")
    g.add_argument("--eval-every", type=common.positive_int, default=1,
                   help="kNN every this many epochs (official: every epoch) and at the end")
    g.add_argument("--probe-epochs", type=common.non_negative_int,
                   help="linear probe on the backbone features at the end; 0 = none")
    common.add_run_arguments(p, "cld")
    p.set_defaults(**defaults(base if base in BASE_DEFAULTS else "npid", dataset))
    return common.parse_arguments(p, argv, "cld.py", check_args, RESUMABLE)


def check_args(p, args):
    """Combinations of flags that cannot work: refused before anything runs (exit code 2)."""
    if args.dataset not in DATASETS:
        p.error(f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    if args.cld_lambda and args.num_clusters > args.batch_size:
        p.error(f"--num-clusters {args.num_clusters} is larger than the batch ({args.batch_size}): "
                "k-means needs at least K samples per view; lower it or raise --batch-size")
    if args.eigenvectors and args.grouping != "spectral":
        p.error("--eigenvectors is for --grouping spectral")
    if args.base == "moco" and args.queue_size is None:
        p.error("--base moco needs --queue-size")
    if args.base == "npid" and args.queue_size is not None:
        p.error("--queue-size is for --base moco (NPID keeps a bank of every image)")
    if (args.backbone == "resnet50-imagenet") != (args.dataset == "imagefolder"):
        p.error("--backbone resnet50-imagenet is for imagefolder (224 px); small images use a CIFAR ResNet")


# ================================================================================================
# Model
# ================================================================================================
class NormedLinear(nn.Module):
    """Cosine linear layer without bias (the MoCo scripts' --normlinear): normalize(x) W^T with
    each row of W normalised; weights drawn uniform in (-1, 1) as the official NormedLinear."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).T


class L2Norm(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=1)


def head(in_dim, out_dim, normlinear, mlp=False):
    """A projection to the unit sphere: [Linear-ReLU] + Linear (or NormedLinear) + L2 norm."""
    layers = [nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True)] if mlp else []
    return nn.Sequential(*layers, (NormedLinear if normlinear else nn.Linear)(in_dim, out_dim), L2Norm())


class CLDNet(nn.Module):
    """backbone -> h; f_I = instance_head(h), f_G = group_head(h), both (B, feature_dim) on the
    unit sphere. With a shared subspace (Table A.2, second row) f_G = f_I."""

    def __init__(self, backbone, args):
        super().__init__()
        d = backbone.feature_dim
        self.backbone = backbone
        self.instance_head = head(d, args.feature_dim, args.normlinear, args.mlp_head)
        self.group_head = head(d, args.feature_dim, args.normlinear) if args.subspace == "separate" else None

    def encode(self, x):
        h = self.backbone(x)
        f_instance = self.instance_head(h)
        return f_instance, (self.group_head(h) if self.group_head is not None else f_instance)

    def forward(self, *views):
        """Each view through the network separately (BatchNorm statistics per view, as the
        official code); one call for all views keeps DistributedDataParallel to one forward."""
        return [self.encode(v) for v in views]


# ================================================================================================
# Method: instance discrimination, NPID (Wu et al., CVPR 2018) and MoCo (He et al., CVPR 2020)
# ================================================================================================
def init_bank(n, dim, generator=None):
    """NPID's memory bank V (n, dim), uniform in (-s, s) with s = 1 / sqrt(dim / 3) (LinearAverage)."""
    s = 1.0 / math.sqrt(dim / 3)
    return torch.rand(n, dim, generator=generator) * 2 * s - s


def npid_loss(f, bank, index, temperature):
    """Full-softmax instance discrimination: CE(f V^T / T, index), f (B, d) on the sphere, V the
    bank (N, d), index (B,) the images' positions in the dataset (NPID, Eq. 2; --nce-k 0)."""
    return F.cross_entropy(f @ bank.T / temperature, index)


@torch.no_grad()
def update_bank(bank, index, f, momentum):
    """v_i <- normalize(m v_i + (1 - m) f_i) for the rows `index` (NPID, Eq. 7), in place."""
    bank[index] = F.normalize(momentum * bank[index] + (1 - momentum) * f, dim=1)


def moco_loss(q, k, queue, temperature):
    """InfoNCE: logits [q.k, q.queue^T] / T, the positive key first (target 0). q, k (B, d), queue
    (Q, d); keys carry no gradient (MoCo, Eq. 1)."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def make_state(args, raw_model, n, device):
    """What instance discrimination keeps beside the network: NPID's bank of the n training images;
    MoCo's key encoder (a copy of the query encoder, no gradients), its queue and write pointer."""
    if args.base == "npid":
        return {"bank": init_bank(n, args.feature_dim).to(device)}
    key_model = CLDNet(common.build_backbone(args.backbone, 3, "conv", args.width), args)
    key_model.load_state_dict(raw_model.state_dict())
    key_model.to(device, memory_format=common.memory_format(device)).requires_grad_(False)
    return {"key_model": key_model, "queue": init_bank(args.queue_size, args.feature_dim).to(device),
            "pointer": torch.zeros(1, dtype=torch.long, device=device)}


@torch.no_grad()
def enqueue(queue, pointer, keys):
    """Write `keys` (B, d) over the oldest entries of the ring buffer `queue` (Q, d) from
    `pointer` (a 1-element int64 tensor), wrapping around its end; move the pointer past them."""
    slots = (pointer + torch.arange(len(keys), device=queue.device)) % len(queue)
    queue[slots] = keys
    pointer.copy_((pointer + len(keys)) % len(queue))


@torch.no_grad()
def ema_update(key_model, query_model, momentum):
    """theta_k <- m theta_k + (1 - m) theta_q over the parameters (MoCo, Eq. 2); each encoder keeps
    its own BatchNorm statistics."""
    for k, q in zip(key_model.parameters(), query_model.parameters()):
        k.mul_(momentum).add_(q.detach(), alpha=1 - momentum)


@torch.no_grad()
def shuffled_keys(key_model, x):
    """The key encoder's f_I of `x` with shuffle-BN (MoCo Sec. 3.3): under torchrun the batch of all
    ranks is permuted before the forward, so BatchNorm cannot see which key sits with which query,
    and put back after. On one device BatchNorm runs over the whole batch, where a shuffle changes
    nothing, so it is skipped. Returns this rank's keys and all ranks' keys, both (B, d)."""
    if not dist.is_initialized():
        keys = key_model.encode(x)[0]
        return keys, keys
    x_all = common.all_gather_cat(x)
    perm = torch.randperm(len(x_all), device=x.device)
    dist.broadcast(perm, 0)
    mine = perm.view(common.world_size(), -1)[common.rank()]
    keys_all = common.all_gather_cat(key_model.encode(x_all[mine])[0])[perm.argsort()]
    return keys_all.view(common.world_size(), len(x), -1)[common.rank()], keys_all


# ================================================================================================
# Method: grouping inside the batch (supplementary Sec. 3: k-means, eq. 1, and spectral clustering)
# ================================================================================================
def batch_kmeans(f, k, iters, spherical=False):
    """k-means of the rows of f (B, d), differentiable through the centroids. Centroids start at
    the first k rows (the batch is shuffled); each iteration assigns every row to the nearest
    centroid (euclidean: squared distance; spherical: cosine, eq. 1 of the supplementary) and
    recomputes the centroids as means of their members (spherical: normalised). A group left
    empty keeps its previous centroid, so none is NaN or a silent zero. Returns labels int64 (B,)
    and centroids (k, d) consistent with them; raises ValueError when k > B."""
    if k > len(f):
        raise ValueError(f"k-means of {len(f)} samples into {k} groups")
    centroids = f[:k]
    for _ in range(iters):
        with torch.no_grad():
            if spherical:
                labels = (f @ F.normalize(centroids, dim=1).T).argmax(1)
            else:  # ||f||^2 is the same for every centroid: argmin of ||c||^2 - 2 f.c
                labels = ((centroids * centroids).sum(1) - 2 * f @ centroids.T).argmin(1)
        members = F.one_hot(labels, k).to(f.dtype)  # (B, k)
        counts = members.sum(0)
        means = members.T @ f / counts.clamp(min=1).unsqueeze(1)
        centroids = torch.where(counts.unsqueeze(1) > 0, means, centroids)
        if spherical:
            centroids = F.normalize(centroids, dim=1)
    return labels, centroids


@torch.no_grad()
def spectral_embedding(f, num_vectors):
    """Normalised-cut embedding (supplementary Sec. 3, eq. 2): W_ij = |cos(f_i, f_j)| with a zero
    diagonal (official code), L = D^-1/2 (D - W) D^-1/2; the eigenvectors of the num_vectors
    smallest eigenvalues of L (the largest of D^-1/2 W D^-1/2), rows L2-normalised (Ng et al.)."""
    fn = F.normalize(f.float(), dim=1)
    w = (fn @ fn.T).abs().fill_diagonal_(0)
    d = w.sum(1).clamp(min=1e-12).rsqrt()
    laplacian = torch.eye(len(f), device=f.device) - d[:, None] * w * d[None, :]
    _, vectors = torch.linalg.eigh(laplacian)  # eigenvalues in ascending order
    return F.normalize(vectors[:, :num_vectors], dim=1)


def group(f, args):
    """Labels (B,) and centroids (K, d) of one view's group features f (B, d). Spectral grouping
    clusters the spectral embedding and takes the centroids as means of f over each group (an
    empty group: the sample its k-means started from, as batch_kmeans)."""
    spherical, k = args.kmeans == "spherical", args.num_clusters
    if args.grouping == "kmeans":
        return batch_kmeans(f, k, args.kmeans_iters, spherical)
    embedding = spectral_embedding(f, args.eigenvectors or k)
    labels, _ = batch_kmeans(embedding, k, args.kmeans_iters, spherical)
    members = F.one_hot(labels, k).to(f.dtype)
    counts = members.sum(0).unsqueeze(1)
    centroids = torch.where(counts > 0, members.T @ f / counts.clamp(min=1), f[:k])
    return labels, (F.normalize(centroids, dim=1) if spherical else centroids)


def cld_loss(g1, g2, args):
    """Cross-level discrimination (paper Eq. 5 and Fig. 3): each view's groups (labels y_v,
    centroids M_v); L_CLD = 1/2 [CE(g1 M2^T / T_c, y2) + CE(g2 M1^T / T_c, y1)], so an instance of
    view 1 must pick the group its twin of view 2 fell into. --no-cross-view scores each view
    against its own groups (Table A.2, third row). Returns the loss and the share of instances of
    view 1 whose highest logit is their target group."""
    y1, m1 = group(g1, args)
    y2, m2 = group(g2, args)
    if not args.cross_view:
        (y1, m1), (y2, m2) = (y2, m2), (y1, m1)
    logits1 = g1 @ m2.T / args.cld_temperature
    logits2 = g2 @ m1.T / args.cld_temperature
    loss = 0.5 * (F.cross_entropy(logits1, y2) + F.cross_entropy(logits2, y1))
    return loss, (logits1.argmax(1) == y2).float().mean()


# ================================================================================================
# Method: learning-rate schedule (official lib/lr_scheduler.py: per-step warm-up, then cosine)
# ================================================================================================
def make_optimizer(model, args, steps_per_epoch):
    """SGD over every parameter and its per-step schedule (lr_factor); the last incomplete batch of
    an epoch is dropped, so an epoch is len(data) // (batch size x processes) steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: lr_factor(t, steps_per_epoch, args))
    return optimizer, schedule


def lr_factor(step, steps_per_epoch, args):
    """lr(t) / lr for step t (from 0): linear from 1 / multiplier to 1 over the warm-up steps W,
    then final + (1 - final) (1 + cos(pi (t - W) / (total - W))) / 2, final = final_lr / lr."""
    warmup, total = args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch
    m = args.warmup_multiplier
    if step <= warmup and warmup > 0:
        return (1 + (m - 1) * step / warmup) / m
    final = args.final_lr / args.lr
    progress = (step - warmup) / max(1, total - warmup)
    return final + (1 - final) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2


# ================================================================================================
# Data and augmentation
# ================================================================================================
def load_data(args, device):
    """The training images (train split; STL-10: train+unlabeled), the labelled train split the
    kNN votes with, and the test split. Sizes are checked before a run directory exists."""
    load = lambda split: common.load_dataset(args.dataset, split, args.data_dir, device,  # noqa: E731
                                             imbalance=args.imbalance, seed=0, image_size=args.image_size)
    data = load("train+unlabeled" if args.dataset == "stl10" else "train")
    train = load("train") if args.dataset == "stl10" else data
    test = load("test")
    common.check_batch_size("--batch-size", args.batch_size, len(data), f"{args.dataset}'s training images")
    return data, train, test


def random_erasing(x, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0.0):
    """torchvision's RandomErasing(p=1), batched: per sample, a box of area fraction ~ U(scale) and
    log aspect ratio ~ U(log ratio) inside the image (10 tries, else none) set to `value`."""
    B, _, H, W = x.shape
    area = H * W * torch.empty(B, 10, device=x.device).uniform_(*scale)
    log_r = torch.empty(B, 10, device=x.device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    h, w = (area * log_r.exp()).sqrt().round(), (area / log_r.exp()).sqrt().round()
    ok = (h < H) & (w < W)
    first = ok.float().argmax(1, keepdim=True)
    h, w = h.gather(1, first)[:, 0] * ok.any(1), w.gather(1, first)[:, 0] * ok.any(1)
    top = (torch.rand(B, device=x.device) * (H - h + 1)).floor()
    left = (torch.rand(B, device=x.device) * (W - w + 1)).floor()
    rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    inside_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
    inside_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
    box = (inside_rows[:, :, None] & inside_cols[:, None, :]).unsqueeze(1)
    return x.masked_fill(box, value)


def make_transforms(args, data, device):
    """uint8 batch -> normalised float batch: `augment` draws one view (the official transforms,
    batched), `prepare` is the test transform (no augmentation; resized to --image-size when the
    images have another size, so that evaluation sees the training resolution)."""
    memory = common.memory_format(device)

    def prepare(x):
        x = common.to_float(x)
        if x.shape[-1] != args.image_size:
            x = F.interpolate(x, size=args.image_size, mode="bilinear", antialias=True, align_corners=False)
        return common.normalize(x, data.mean, data.std).contiguous(memory_format=memory)

    def augment(x):
        x = common.random_resized_crop(common.to_float(x), args.image_size, scale=(0.2, 1.0))
        if args.augmentation == "npid":
            x = common.color_jitter(x, 0.4, 0.4, 0.4, 0.4)
            x = common.random_grayscale(x, 0.2)
        elif args.augmentation == "mocov2":
            x = common.color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=0.8)
            x = common.random_grayscale(x, 0.2)
            x = common.gaussian_blur(x, 0.5, (0.1, 2.0))
        x = common.normalize(common.horizontal_flip(x), data.mean, data.std)
        x = random_erasing(x) if args.erasing else x
        return x.contiguous(memory_format=memory)

    return augment, prepare


# ================================================================================================
# Training
# ================================================================================================
def train_one_epoch(model, optimizer, data, augment, args, epoch, run, device, scheduler, raw_model,
                    state):
    """One epoch of NPID+CLD or MoCo+CLD; `state` holds the bank (NPID) or the key encoder, queue
    and pointer (MoCo). Returns the meter and the number of images trained on."""
    meter, images_seen = common.Meter(), 0
    for index, images, _ in run.batches(data, args.batch_size, epoch, meter):
        x1, x2 = augment(images), augment(images)
        with common.autocast(device, args.amp):
            (i1, g1), (i2, g2) = model(x1, x2)
            if args.base == "moco":
                keys, keys_all = shuffled_keys(state["key_model"], augment(images))
        i1, g1, i2, g2 = i1.float(), g1.float(), i2.float(), g2.float()
        if args.base == "npid":  # both views against the bank as it was before this step
            instance = 0.5 * (npid_loss(i1, state["bank"], index, args.instance_temperature)
                              + npid_loss(i2, state["bank"], index, args.instance_temperature))
        else:
            keys = keys.float()
            instance = 0.5 * (moco_loss(i1, keys, state["queue"], args.instance_temperature)
                              + moco_loss(i2, keys, state["queue"], args.instance_temperature))
        loss, extra = instance, {}
        if args.cld_lambda:
            cld, group_acc = cld_loss(g1, g2, args)
            loss, extra = instance + args.cld_lambda * cld, dict(cld_loss=cld, group_acc=group_acc)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if args.base == "npid":  # every rank's images, in rank order: the same bank on every rank
            all_index = common.all_gather_cat(index)
            for f in (i1, i2):
                update_bank(state["bank"], all_index, common.all_gather_cat(f.detach()), args.bank_momentum)
        else:
            ema_update(state["key_model"], raw_model, args.key_momentum)
            enqueue(state["queue"], state["pointer"], keys_all.float())
        meter.add(loss=loss, instance_loss=instance, **extra)
        images_seen += len(images) * common.world_size()
    return meter, images_seen


# ================================================================================================
# Evaluation
# ================================================================================================
def kmeans_assignments(x, k, restarts=5, iters=50, generator=None):
    """Labels of the lowest-inertia of `restarts` euclidean k-means runs on the rows of x (N, d),
    each started from k distinct random rows (batch_kmeans on a permuted copy)."""
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        labels, centroids = batch_kmeans(x[order], k, iters)
        inertia = (x[order] - centroids[labels]).pow(2).sum().item()
        if inertia < best_inertia:
            best, best_inertia = torch.empty_like(labels).scatter_(0, order, labels), inertia
    return best


@torch.no_grad()
def evaluate(raw_model, train, test, prepare, args, final=False):
    """kNN top-1 on the test split: f_I of the labelled train images (test transform) vote with
    exp(sim / T) among the k nearest (NPID's protocol). With `final`, also a linear probe on the
    backbone features and ACC/NMI/ARI of k-means (K = classes) on the test split's f_I and f_G
    (the backbone runs once; the heads are applied to its features)."""
    net = raw_model.module if hasattr(raw_model, "module") else raw_model
    encoder = net.backbone if final else nn.Sequential(net.backbone, net.instance_head)
    train_h, test_h = (common.extract_features(encoder, d, prepare, args.eval_batch_size, args.amp)[0]
                       for d in (train, test))

    def project(head, h):  # in slices: an MLP head's hidden layer on 1.28M rows would not fit
        return torch.cat([head(part) for part in h.split(65536)]) if final else h

    train_f, test_f = project(net.instance_head, train_h), project(net.instance_head, test_h)
    predictions = common.knn_predict(train_f, train.labels, test_f, test.num_classes, args.knn_k,
                                     args.instance_temperature)
    metrics = {"knn_acc": (predictions == test.labels).float().mean().item()}
    if not final:
        return metrics
    if args.probe_epochs:
        metrics["probe_acc"] = common.linear_probe(train_h, train.labels, test_h, test.labels,
                                                   test.num_classes, args.probe_epochs)
    group_head = net.group_head if net.group_head is not None else net.instance_head
    generator = torch.Generator().manual_seed(args.seed)
    for f, prefix in ((test_f, "kmeans_"), (project(group_head, test_h), "group_kmeans_")):
        labels = kmeans_assignments(f, test.num_classes, generator=generator)
        scores = common.clustering_metrics(labels, test.labels, test.num_classes, test.num_classes)
        metrics.update({prefix + k: scores[k] for k in ("acc", "nmi", "ari")})
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
    data, train, test = load_data(args, device)
    backbone = common.build_backbone(args.backbone, 3, shortcut="conv", width=args.width)
    raw_model = CLDNet(backbone, args).to(device, memory_format=common.memory_format(device))
    state = make_state(args, raw_model, len(data), device)
    if common.rank():
        common.seed_everything(args.seed + common.rank(), args.deterministic)  # own augmentation draws
    augment, prepare = make_transforms(args, data, device)
    run = common.Run("cld", args)  # once the data is there: no empty runs
    method = f"{args.base}+CLD (K={args.num_clusters}, lambda={args.cld_lambda})" if args.cld_lambda else \
        f"{args.base} alone (lambda 0)"
    run.print(f"run: {run.path} | {method} on {args.dataset}: {len(data)} images | device {device} x "
              f"{common.world_size()}")

    # --- resume
    steps_per_epoch = len(data) // (args.batch_size * common.world_size())
    optimizer, scheduler = make_optimizer(raw_model, args, steps_per_epoch)
    history = {"best_knn_acc": 0.0, "best_epoch": -1}  # diagnostic only: chosen on the test set
    start = run.resume("train", args.epochs, model=raw_model, optimizer=optimizer, scheduler=scheduler,
                       history=history, **state)
    model = common.wrap_model(raw_model, device, args.compile)

    # --- training
    for epoch in range(start, args.epochs):
        t0 = time.time()
        raw_model.train()
        if args.base == "moco":
            state["key_model"].train()  # the key encoder's BatchNorm uses batch statistics (official)
        meter, images_seen = train_one_epoch(model, optimizer, data, augment, args, epoch, run, device,
                                             scheduler, raw_model, state)
        metrics = meter.averages(epoch, run)  # waits for the device, so the time below is complete
        seconds = time.time() - t0
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            metrics.update(evaluate(raw_model, train, test, prepare, args))
            if metrics["knn_acc"] > history["best_knn_acc"]:
                history.update(best_knn_acc=metrics["knn_acc"], best_epoch=epoch)
        run.end_epoch(epoch, metrics, images_seen, seconds)

    # --- final evaluation
    result = evaluate(raw_model, train, test, prepare, args, final=True)
    result.update(epochs=args.epochs, diagnostic_best_epoch_knn_acc_on_test=history["best_knn_acc"],
                  diagnostic_best_epoch=history["best_epoch"])
    run.finish(result)
    probe = f" | linear probe {result['probe_acc']:.4f}" if "probe_acc" in result else ""
    run.print(f"final: kNN top-1 {result['knn_acc']:.4f}{probe} | k-means on f_I: "
              f"{common.format_scores(result, 'kmeans_')} | on f_G: "
              f"{common.format_scores(result, 'group_kmeans_')}")


if __name__ == "__main__":
    common.run_main(main)
