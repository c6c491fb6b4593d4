"""Shared parts of the method scripts: data, batched GPU augmentation, backbones, evaluation and
run plumbing (seeding, devices, run directories, checkpoints, distributed helpers).

Nothing here is specific to one method: the clustering, losses and schedules of each method live
in its own file. Images are uint8 tensors (N, C, H, W) kept on the training device; augmentation
works on float batches in [0, 1] with per-sample randomness drawn from torch's global generator,
so `torch.manual_seed` makes it reproducible and checkpoints capture it.
"""
import argparse
import contextlib
import datetime
import fcntl
import functools
import glob
import gzip
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class Abort(Exception):
    """A problem the user can fix (bad flag, missing file, diverged run): one line, no traceback."""

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


# Exit codes of every method script: 0 finished, 1 training diverged, 2 usage error (bad flag,
# missing file), 3 stopped on purpose and resumable (--time-limit, SIGTERM/SIGUSR1), 130 Ctrl-C.
EXIT_STOPPED = 3


class Stopped(Abort):
    """The run stopped on purpose, with nothing lost: a time limit or a scheduler's signal (exit code
    3, resumable), or nothing left to do (exit code 0)."""

    def __init__(self, message, exit_code=EXIT_STOPPED):
        super().__init__(message, exit_code)


def run_main(main):
    """Call `main()` as a command: SIGTERM and SIGUSR1 stop it resumably from the start
    (catch_stop_signals), an Abort becomes one line on stderr and its exit code, running out of
    memory one line and exit 2 (sizes too large for the device: nothing is lost, checkpoints are
    written atomically), Ctrl-C one line saying how to resume (exit 130), and the torchrun process
    group is left cleanly."""
    prog = os.path.basename(sys.argv[0])
    catch_stop_signals()
    try:
        main()
    except Stopped as stop:
        if rank() == 0:
            print(f"{prog}: {stop}", flush=True)
        sys.exit(stop.exit_code)
    except Abort as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {Run.resume_hint()}", file=sys.stderr)
        sys.exit(130)
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
        text = str(error)
        oom = isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text
        if not oom:
            raise  # a fault of the code, not of the sizes
        wanted = re.search(r"allocate (\d+) bytes|Tried to allocate ([\d.]+ [KMGT]iB)", text)
        size = (f" ({int(wanted[1]) / 2**30:,.1f} GiB at once)" if wanted and wanted[1] else
                f" ({wanted[2]} at once)" if wanted else "")
        print(f"{prog}: error: out of memory{size}: lower the sizes (--batch-size, --width, --global-size, "
              "...) or use a device with more memory", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def catch_stop_signals():
    """From now on SIGTERM and SIGUSR1 (a scheduler's notice before preemption) only set
    Run.stop_signal: the training loop checkpoints after its next step and stops with exit code 3,
    also when the signal came during the start-up (data loading, building the network)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _request_stop)


def _request_stop(signum, frame):
    Run.stop_signal = signum


# ================================================================================================
# Data (used by every method file)
# ================================================================================================
# name: (torchvision class, cache name, classes, channel mean, channel std)
DATASETS = {
    "mnist": ("MNIST", "mnist", 10, (0.1307,), (0.3081,)),
    "fashion-mnist": ("FashionMNIST", "fashion-mnist", 10, (0.2860,), (0.3530,)),
    "svhn": ("SVHN", "svhn", 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "cifar10": ("CIFAR10", "cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ("CIFAR100", "cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "cifar100-20": ("CIFAR100", "cifar100", 20, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "cifar10-lt": ("CIFAR10", "cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100-lt": ("CIFAR100", "cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ("STL10", "stl10", 10, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagefolder": (None, None, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": (None, None, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}
# splits of each dataset, when not ("train", "test", "all"); see dataset_splits
SPLITS = {"stl10": ("train", "test", "unlabeled", "train+unlabeled", "all"),
          "cifar10-lt": ("train", "test"), "cifar100-lt": ("train", "test")}
UNLABELED_SPLITS = {("stl10", "unlabeled")}  # the stored splits whose labels are all -1 (unknown)
SYNTHETIC_SIZES = {"train": 2000, "test": 500}


def dataset_splits(name):
    """The splits `load_dataset(name, split)` accepts, as a tuple of str: train, test and all
    (train + test) for most; STL-10 adds unlabeled and train+unlabeled; the long-tailed -lt
    datasets have only train (long-tailed) and test (balanced, as Cao et al. evaluate), since
    all would dilute the tail with the balanced test set. Raises Abort for an unknown name."""
    if name not in DATASETS:
        raise Abort(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return SPLITS.get(name, ("train", "test", "all"))


def default_data_dir():
    return os.environ.get("DATA_DIR", "./data")


class TensorImages:
    """A small dataset held as one uint8 tensor on the training device; batches are index slices."""

    def __init__(self, name, images, labels, num_classes, mean, std):
        self.name, self.images, self.labels, self.num_classes = name, images, labels, num_classes
        self.mean, self.std = mean, std

    def __len__(self):
        return len(self.labels)

    def to(self, device):
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def batches(self, order, batch_size, random_crop=False):
        """Yield (indices, uint8 images, labels) for consecutive slices of `order`.
        `random_crop` is for folder datasets, whose workers crop; here the caller augments."""
        order = order.to(self.labels.device)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield idx, self.images[idx], self.labels[idx]




def torchvision():
    """torchvision, imported when first needed: importing it also imports torch's compiler (about 3 s
    of CPU), which runs on tensor datasets never need."""
    import torchvision
    return torchvision


class _FolderItems(torch.utils.data.Dataset):
    """(index, uint8 image (3, size, size), label, error) per sample. An image that cannot be
    decoded (PIL: truncated or not an image, with LOAD_TRUNCATED_IMAGES left off) gives a blank
    image and the error's text instead of raising in a DataLoader worker, which would end in a
    traceback that never names the file; FolderImages.batches names it."""

    def __init__(self, samples, transform, size):
        self.samples, self.transform, self.size = samples, transform, size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            image = torchvision().datasets.folder.default_loader(path)  # decoded to RGB here
        except Exception as error:  # OSError, SyntaxError, ValueError, DecompressionBombError
            blank = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
            return index, blank, label, f"{type(error).__name__}: {error}"
        return index, self.transform(image), label, ""


class FolderImages:
    """Images in folders, streamed by DataLoader workers that decode and crop to `image_size`
    (uint8); the rest of the augmentation runs batched on the device. `samples`: (path, class id)
    pairs (see `image_folder_samples`), `classes`: the class names, id = position."""

    def __init__(self, samples, classes, image_size=224, device="cpu", workers=None):
        self.samples, self.classes = samples, classes
        self.name, self.image_size, self.device = "imagefolder", image_size, torch.device(device)
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.long, device=self.device)
        self.num_classes = len(classes)
        self.mean, self.std = DATASETS["imagefolder"][3:]
        self.workers = min(8, os.cpu_count() or 1) if workers is None else workers

    def __len__(self):
        return len(self.samples)

    def to(self, device):
        self.device, self.labels = torch.device(device), self.labels.to(device)
        return self

    def batches(self, order, batch_size, random_crop=False):
        """Yield (indices, uint8 images, labels): RandomResizedCrop(0.08-1) when `random_crop`,
        else the standard Resize(size * 8/7) + CenterCrop(size). Abort naming the first image
        of a batch that cannot be decoded."""
        T = torchvision().transforms
        size = self.image_size
        crop = (T.RandomResizedCrop(size, antialias=True) if random_crop
                else T.Compose([T.Resize(size * 8 // 7, antialias=True), T.CenterCrop(size)]))
        loader = torch.utils.data.DataLoader(
            _FolderItems(self.samples, T.Compose([crop, T.PILToTensor()]), size),
            batch_sampler=[b.tolist() for b in order.cpu().split(batch_size)],
            num_workers=self.workers, pin_memory=self.device.type == "cuda")
        for idx, images, labels, errors in loader:
            bad = [i for i, error in enumerate(errors) if error]
            if bad:
                raise Abort(f"cannot read the image {self.samples[idx[bad[0]]][0]} "
                            f"({' '.join(errors[bad[0]].split())}); remove or replace it")
            yield (idx.to(self.device, non_blocking=True), images.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))


def image_folder_samples(root, split):
    """The (path, class id) pairs and class names of `split` of an image folder, as torchvision's
    ImageFolder reads one (class = sub-folder name, files with an extension of its IMG_EXTENSIONS).
    When `root` holds train/ and val/ or test/ (val first), train is train/, test is val/ (else
    test/) and all is both, concatenated; else `root` itself is the data of every split (test then
    scores the training images). Class ids come from one list for every split: the sorted union
    of the class folder names of train/ and val/ (or test/), as find_classes sorts, so a class
    missing from val/ keeps its id. Returns (list of (str, int), list of str). Abort naming the
    folder when `root` is missing, a split folder is missing or holds no image, there is no class
    folder, or a class folder holds no image in any split."""
    if not os.path.isdir(root):
        raise Abort(f"imagefolder: {os.path.abspath(root)} is not a folder; point --data-dir at "
                    "a folder of class sub-folders (or one with train/ and val/ inside)")
    present = {s: os.path.join(root, s) for s in ("train", "val", "test")
               if os.path.isdir(os.path.join(root, s))}
    if present:
        train, test = present.get("train"), present.get("val", present.get("test"))
        roots = {"train": [train], "test": [test], "all": [train, test]}[split]
        if None in roots:
            missing = "train/" if train is None else "val/ or test/"
            raise Abort(f"imagefolder: {os.path.abspath(root)} has no {missing} for the {split} split; "
                        "add it, or point --data-dir at one folder of class folders "
                        "to use it for every split")
        used = [r for r in (train, test) if r is not None]
    else:
        roots = used = [root]
    image_extensions = torchvision().datasets.folder.IMG_EXTENSIONS
    extensions = " ".join(image_extensions)
    classes = sorted({entry.name for r in used for entry in os.scandir(r) if entry.is_dir()})
    if not classes:
        raise Abort(f"imagefolder: no class folder in {os.path.abspath(used[0])}; put the images of each "
                    f"class in a sub-folder of their own, <folder>/<class>/<image> ({extensions})")
    class_ids = {c: i for i, c in enumerate(classes)}
    found = {r: torchvision().datasets.folder.make_dataset(r, class_ids, image_extensions, allow_empty=True)
             for r in used}
    has_images = {label for samples in found.values() for _, label in samples}
    empty = [c for c in classes if class_ids[c] not in has_images]
    if empty:
        folders = " and ".join(os.path.abspath(os.path.join(r, empty[0])) for r in used
                               if os.path.isdir(os.path.join(r, empty[0])))
        raise Abort(f"imagefolder: no image in {folders} (read: {extensions}); remove the folder or "
                    "add its images")
    samples = [sample for r in roots for sample in found[r]]
    if not samples:
        raise Abort(f"imagefolder: no image in the class folders of {os.path.abspath(roots[0])} "
                    f"(read: {extensions}) for the {split} split; add them")
    return samples, classes


def make_synthetic(n, num_classes=10, size=32, seed=0):
    """Clusterable 32x32 RGB images with a known class. Class c draws upright shape c % 10 (triangle,
    T, L, half-disk, arrow, house, F, mushroom, cup, pin), striped when (c // 10) is odd, in hue
    c / num_classes (evenly spaced, so neighbouring classes never share a hue), near the centre
    at a slightly random position and scale, on a random plain background, with pixel noise.
    Every shape has an up direction, so rotation prediction must look at the shape (RotNet learns
    useful features), and the shape fills a steady part of the image, so those features tell the
    classes apart; the random background dominates pixel distances, so k-means on raw pixels is
    poor while a small CNN clusters it well. Deterministic for a given seed."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    cx, cy = (rand(n, 1, 1) - 0.5) * 0.3, (rand(n, 1, 1) - 0.5) * 0.3
    radius = 0.55 + 0.1 * rand(n, 1, 1)
    u, v = (x - cx) / radius, (y - cy) / radius  # v grows downwards
    au, d = u.abs(), (u ** 2 + v ** 2).sqrt()
    stem = (au < 0.2) & (v > -0.1) & (v < 1)
    shapes = torch.stack([
        (au < 0.5 * (v + 1)) & (v < 0.8),                                     # triangle
        ((v > -1) & (v < -0.55) & (au < 1)) | ((au < 0.25) & (v.abs() < 1)),  # T
        ((u > -0.9) & (u < -0.45) & (v.abs() < 1)) | ((v > 0.55) & (v < 1) & (au < 0.9)),  # L
        (d < 1) & (v < 0.2),                                                  # upper half-disk
        ((au < 0.6 * (v + 1)) & (v < 0.2)) | ((au < 0.22) & (v >= 0.2) & (v < 1)),  # arrow
        ((au < 0.7) & (v > -0.1) & (v < 0.9)) | ((au < (v + 1) * 0.9) & (v <= -0.1)),  # house
        ((u > -0.8) & (u < -0.4) & (v.abs() < 1)) | ((v > -1) & (v < -0.6) & (u > -0.8) & (u < 0.8))
        | ((v.abs() < 0.2) & (u > -0.8) & (u < 0.4)),                         # F
        ((((u / 1.0) ** 2 + ((v + 0.1) / 0.7) ** 2) < 1) & (v < -0.1)) | stem,  # mushroom
        ((d > 0.55) & (d < 1) & (v > 0)) | ((au > 0.55) & (au < 1) & (v > -1) & (v <= 0)),  # cup
        ((u ** 2 + (v + 0.45) ** 2) < 0.3) | stem])                           # pin
    mask = shapes[labels % 10, torch.arange(n)]
    striped = ((labels // 10) % 2 == 1)[:, None, None]
    mask &= ~striped | (torch.sin(v * 9.0) > 0)
    hue = (labels / num_classes + 0.06 * (rand(n) - 0.5)) % 1.0
    fg = hsv_to_rgb(torch.stack([hue, 0.6 + 0.4 * rand(n), 0.55 + 0.45 * rand(n)], 1))
    bg = hsv_to_rgb(torch.stack([rand(n), 0.5 * rand(n), 0.25 + 0.6 * rand(n)], 1))
    image = torch.where(mask[:, None], fg[:, :, None, None], bg[:, :, None, None])
    image = image + 0.06 * torch.randn(image.shape, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), labels


def _read_mnist_family(cls, split, root):
    """One split of MNIST or Fashion-MNIST from the raw IDX files under root/<class name>/raw, each
    unpacked or as its original .gz (md5 checked against torchvision's), read with torchvision's
    read_image_file / read_label_file without writing beside them (torchvision unpacks the .gz
    there, which fails in a read-only folder). Returns {"images": uint8 (N, 1, 28, 28), "labels":
    int64 (N,)}, or None when a file is missing; Abort naming a file that cannot be read."""
    from torchvision.datasets.mnist import read_image_file, read_label_file
    from torchvision.datasets.utils import check_integrity
    raw, prefix = os.path.join(root, cls.__name__, "raw"), "train" if split == "train" else "t10k"
    md5 = dict(cls.resources)
    out = {}
    for key, stem, read in (("images", f"{prefix}-images-idx3-ubyte", read_image_file),
                            ("labels", f"{prefix}-labels-idx1-ubyte", read_label_file)):
        path = os.path.join(raw, stem)
        source = path if os.path.isfile(path) else f"{path}.gz"
        if not os.path.isfile(source):
            return None
        try:
            if source == path:
                out[key] = read(path)
                continue
            if not check_integrity(source, md5.get(f"{stem}.gz")):
                raise Abort(f"{source} is not torchvision's original file (its md5 differs); delete "
                            f"it, or replace it with the original")
            with tempfile.TemporaryDirectory() as tmp, gzip.open(source) as packed:
                with open(os.path.join(tmp, stem), "wb") as unpacked:
                    shutil.copyfileobj(packed, unpacked)
                out[key] = read(os.path.join(tmp, stem))
        except (OSError, EOFError, ValueError, TypeError, AssertionError, RuntimeError) as error:
            raise Abort(f"cannot read {source} ({type(error).__name__}: {' '.join(str(error).split())}); "
                        "delete it, or replace it with the original")
    return {"images": out["images"].unsqueeze(1), "labels": out["labels"]}


def _decode_torchvision(cls_name, split, root, download):
    """Decode one split with torchvision into {"images": uint8 (N,C,H,W), "labels": int64 (N,)}."""
    cls = getattr(torchvision().datasets, cls_name)
    if cls_name in ("MNIST", "FashionMNIST"):
        data = _read_mnist_family(cls, split, root)
        if data is None and download:
            cls(root, train=split == "train", download=True)  # downloads and unpacks into raw/
            data = _read_mnist_family(cls, split, root)
        if data is None:
            raise FileNotFoundError(f"no {cls_name}/raw/{'train' if split == 'train' else 't10k'}"
                                    "-*-ubyte(.gz)")
        return data
    if cls_name in ("SVHN", "STL10"):
        ds = cls(root, split=split, download=download)
        return {"images": torch.from_numpy(ds.data), "labels": torch.from_numpy(ds.labels).long()}
    ds = cls(root, train=split == "train", download=download)
    out = {"images": torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
           "labels": torch.tensor(ds.targets, dtype=torch.long)}
    if cls_name == "CIFAR100":  # torchvision drops the 20 super-class labels; the pickle has them
        with open(os.path.join(root, ds.base_folder, split), "rb") as f:
            out["coarse_labels"] = torch.tensor(pickle.load(f, encoding="latin1")["coarse_labels"])
    return out


def _folders(path, depth):
    """The set of folders at `path` and up to `depth` levels below it (no symlinks followed)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return set()
    found = {path}
    if depth:
        for entry in os.scandir(path):
            if entry.is_dir(follow_symlinks=False):
                found |= _folders(entry.path, depth - 1)
    return found


@contextlib.contextmanager
def _no_new_empty_folders_on_failure(path):
    """When the block raises, remove the empty folders it created: the missing parents of `path`,
    `path` and up to two levels below it (where torchvision makes <root>/MNIST/raw, for example).
    Folders that hold a file, or existed before, are kept."""
    path = top = os.path.abspath(path)
    while not os.path.isdir(os.path.dirname(top)) and os.path.dirname(top) != top:
        top = os.path.dirname(top)
    depth = 2 + (len(os.path.relpath(path, top).split(os.sep)) if top != path else 0)
    before = _folders(top, depth)
    try:
        yield
    except BaseException:
        for folder in sorted(_folders(top, depth) - before, key=len, reverse=True):  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # fails on a folder that is not empty
        raise


def _split_problem(data, num_classes, unlabeled):
    """Why `data` is not a decoded split {"images": uint8 (N, C, H, W), "labels": int64 (N,) in
    0..num_classes-1, or all -1 when `unlabeled`, optional "coarse_labels": int64 (N,) in 0..19},
    or None when it is one."""
    if (not isinstance(data, dict) or not torch.is_tensor(data.get("images"))
            or not torch.is_tensor(data.get("labels"))):
        return "no images and labels tensors"
    images = data["images"]
    if images.dtype != torch.uint8 or images.dim() != 4:
        return f"images are {images.dtype} {tuple(images.shape)}, not uint8 (N, C, H, W)"
    for key, classes in (("labels", num_classes), ("coarse_labels", 20)):
        if key not in data:
            continue
        labels = data[key]
        if not torch.is_tensor(labels) or labels.dtype != torch.long or labels.shape != (len(images),):
            return f"{key} are not an int64 tensor ({len(images)},)"
        if unlabeled and key == "labels":
            if (labels != -1).any():
                return "labels of an unlabeled split are not all -1"
        elif len(labels) and (labels.min() < 0 or labels.max() >= classes):
            return (f"{key} range over {labels.min().item()}..{labels.max().item()}, "
                    f"outside the class ids 0..{classes - 1}")
    return None


def _load_split(name, split, data_dir, download):
    """One stored split, from the cache `<name>-<split>.pt` or decoded by torchvision (then cached),
    checked (`_split_problem`): Abort naming the file when it is not a valid split."""
    cls_name, cache_name = DATASETS[name][:2]
    num_classes = 100 if cache_name == "cifar100" else DATASETS[name][2]  # cifar100-20: fine labels too
    unlabeled = (name, split) in UNLABELED_SPLITS
    path = os.path.join(data_dir, f"{cache_name}-{split}.pt")
    if os.path.exists(path):
        try:
            data = torch.load(path, weights_only=True)
        except Exception as error:
            data, problem = None, f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
        else:
            problem = _split_problem(data, num_classes, unlabeled)
        if problem:
            raise Abort(f"corrupt dataset cache {path} ({problem}); delete it "
                        "to rebuild it from torchvision's files")
        return data
    try:
        with _no_new_empty_folders_on_failure(data_dir):
            data = _decode_torchvision(cls_name, split, data_dir, download)
    except Abort:
        raise
    except Exception as error:
        raise Abort(f"{name} ({split} split) not found: looked for {path} and torchvision's "
                    f"{cls_name} files under {os.path.abspath(data_dir)}, and "
                    f"{'the download failed' if download else 'downloading is off'} "
                    f"({type(error).__name__}: {' '.join(str(error).split())[:200]}). "
                    "On a machine with internet run "
                    f"torchvision.datasets.{cls_name}('{data_dir}', download=True), or point "
                    "--data-dir (or DATA_DIR) at a folder that holds the files")
    problem = _split_problem(data, num_classes, unlabeled)
    if problem:
        raise Abort(f"torchvision's {cls_name} files under {os.path.abspath(data_dir)} give a bad "
                    f"{split} split ({problem}); replace them with the original files")
    try:
        atomic_save(data, path)
    except OSError:
        pass  # a read-only data folder: keep working from torchvision's files
    return data


def long_tail_indices(labels, num_classes, imbalance, seed=0):
    """Exponential profile n_c = n_max * imbalance^(-c / (C - 1)) (Cao et al., LDAM), keeping a
    seeded random subset of each class; the rarest class has n_max / imbalance samples."""
    g = torch.Generator().manual_seed(seed)
    n_max = int((labels == 0).sum())
    keep = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        keep.append(members[:int(n_max * imbalance ** (-c / (num_classes - 1)))])
    return torch.cat(keep).sort().values


def labelled_subset(data, per_class=None, fraction=None, names_file=None, seed=0):
    """The labelled images of a semi-supervised run, as sorted int64 indices into `data` (on its
    device): `per_class` images of every class, or `fraction` of each class (rounded, at least one;
    ImageNet's 1 % / 10 %), drawn by a generator seeded with `seed` alone, so every rank and every
    resume draws the same subset; or the images named, one a line, in `names_file` (the standard
    ImageNet 1 % / 10 % lists; an image folder only), by file name or as class folder/file name.
    Used by suave.py and daino.py. Abort when a class has fewer images than asked, or a listed name
    is not in `data` or names several images (the same file name in two class folders)."""
    labels = data.labels.cpu()
    if names_file is not None:
        if not isinstance(data, FolderImages):
            raise Abort(f"--label-file {names_file}: lists image file names, which only "
                        "--dataset imagefolder has")
        try:
            with open(names_file) as f:
                names = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise Abort(f"--label-file {names_file}: cannot read it ({error})") from None
        index = {}  # file name, and class folder/file name: the images they name
        for i, (path, _) in enumerate(data.samples):
            name = os.path.basename(path)
            index.setdefault(name, []).append(i)
            index.setdefault(f"{os.path.basename(os.path.dirname(path))}/{name}", []).append(i)
        missing = [name for name in names if name not in index]
        if missing or not names:
            raise Abort(f"--label-file {names_file}: " + (f"{len(missing)} of its {len(names)} images are "
                        f"not in the training images, e.g. {missing[0]}" if missing else "names no image"))
        shared = next((name for name in names if len(index[name]) > 1), None)
        if shared:
            folders = sorted(os.path.basename(os.path.dirname(data.samples[i][0])) for i in index[shared])
            raise Abort(f"--label-file {names_file}: {shared} names {len(folders)} images (in "
                        f"{', '.join(folders[:3])}); write its lines as class folder/file name")
        return torch.tensor(sorted({index[name][0] for name in names}), device=data.labels.device)
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(data.num_classes):
        members = (labels == c).nonzero().flatten()
        n = per_class if per_class is not None else max(1, round(fraction * len(members)))
        if n > len(members):
            raise Abort(f"--labels-per-class {n} is larger than class {c} of {data.name}'s training "
                        f"images ({len(members)}); lower it")
        chosen.append(members[torch.randperm(len(members), generator=g)[:n]])
    return torch.cat(chosen).sort().values.to(data.labels.device)


def load_dataset(name, split="train", data_dir=None, device="cpu", download=True, imbalance=100.0,
                 seed=0, image_size=224):
    """Load a dataset by name. Splits (`dataset_splits`): train, test, all (= train + test, used
    transductively by LSD-C); STL-10 also has unlabeled and train+unlabeled (label -1 = unknown);
    the -lt datasets only train (long-tailed, `long_tail_indices`) and test. Small datasets return
    a TensorImages on `device` (images uint8 (N, C, H, W), labels int64 (N,)); `imagefolder`
    returns a FolderImages over `data_dir` (its splits: `image_folder_samples`). Raises Abort, in
    one line naming the file or folder, for an unknown name or split, missing or unreadable files,
    labels outside the classes, or an image folder layout that cannot be read."""
    splits = dataset_splits(name)
    if split not in splits:
        if name.endswith("-lt") and split == "all":
            raise Abort(f"{name} has no split 'all' (its balanced test set would dilute the long "
                        "tail); use --split train")
        raise Abort(f"{name} has no split {split!r}; choose one of {', '.join(splits)}")
    data_dir = data_dir or default_data_dir()
    mean, std = DATASETS[name][3:]
    if name == "imagefolder":
        return FolderImages(*image_folder_samples(data_dir, split), image_size, device)
    if split == "all" or "+" in split:
        parts = ("train", "test") if split == "all" else split.split("+")
        parts = [load_dataset(name, p, data_dir, "cpu", download, imbalance, seed) for p in parts]
        return TensorImages(name, torch.cat([p.images for p in parts]),
                            torch.cat([p.labels for p in parts]), parts[0].num_classes,
                            mean, std).to(device)
    num_classes = DATASETS[name][2]
    if name == "synthetic":
        images, labels = make_synthetic(SYNTHETIC_SIZES[split], seed=seed * 2 + (split == "test"))
        return TensorImages(name, images, labels, num_classes, mean, std).to(device)
    data = _load_split(name, split, data_dir, download)
    images, labels = data["images"], data["labels"]
    if name == "cifar100-20":
        if "coarse_labels" not in data:
            raise Abort(f"{data_dir}/cifar100-{split}.pt has no coarse_labels; delete it to rebuild")
        labels = data["coarse_labels"].long()
    if name.endswith("-lt") and split == "train":
        keep = long_tail_indices(labels, num_classes, imbalance, seed)
        images, labels = images[keep], labels[keep]
    return TensorImages(name, images, labels, num_classes, mean, std).to(device)


# ================================================================================================
# Augmentation: batched, on the device, per-sample randomness, no Python loop over samples.
# Inputs are float (B, C, H, W) in [0, 1] unless said otherwise. Used by: lsdc.py (crop, flip,
# rotations, RICAP, MixUp), deepcluster.py (resized crop, crop, flip), cld.py, suave.py and daino.py
# (multi-crop resized crops, flip, colour jitter, grayscale, blur; daino.py: solarize), benchmarks/.
# ================================================================================================
def to_float(images):
    """uint8 (B, C, H, W) -> float in [0, 1]."""
    return images.float().div_(255)


@functools.lru_cache(maxsize=None)
def _channel_constant(values, device, dtype):
    return torch.tensor(values, device=device, dtype=dtype).view(1, -1, 1, 1)


def normalize(x, mean, std):
    """(x - mean) / std per channel; the constants are copied to the device once, not per batch."""
    return ((x - _channel_constant(tuple(mean), x.device, x.dtype))
            / _channel_constant(tuple(std), x.device, x.dtype))


def _bernoulli(p, batch_size, device):
    return torch.rand(batch_size, device=device) < p


def random_crop(x, size, padding=0):
    """Zero-pad by `padding` then crop a random size x size window per sample (any dtype)."""
    B, C, H, W = x.shape
    x = F.pad(x, (padding,) * 4)
    top = torch.randint(0, H + 2 * padding - size + 1, (B, 1, 1), device=x.device)
    left = torch.randint(0, W + 2 * padding - size + 1, (B, 1, 1), device=x.device)
    steps = torch.arange(size, device=x.device)
    rows, cols = top + steps.view(1, -1, 1), left + steps.view(1, 1, -1)
    batch = torch.arange(B, device=x.device).view(-1, 1, 1)
    return x.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # channels_last memory


def resized_crop(x, top, left, height, width, size):
    """Crop box (top, left, height, width) of each sample then resize it bilinearly to `size` (an int
    or (height, width)): torchvision's resized_crop(x, top, left, height, width, size,
    antialias=False), i.e. F.interpolate(align_corners=False) of the crop, whose source coordinate
    (j + 0.5) * width / out_w - 0.5 is clamped to [0, width - 1] so no pixel outside the box is read.
    x: float (B, C, H, W); the box: numbers or tensors (B,) in pixels. Returns float (B, C, *size)."""
    B, _, H, W = x.shape
    out_h, out_w = (size, size) if isinstance(size, int) else size

    def coordinates(start, length, out, full):  # grid_sample's normalised coordinates, (B, out)
        start, length = (torch.as_tensor(v, dtype=x.dtype, device=x.device).expand(B)[:, None]
                         for v in (start, length))
        steps = torch.arange(out, dtype=x.dtype, device=x.device)
        source = torch.minimum(((steps + 0.5) * length / out - 0.5).clamp(min=0), length - 1)
        return (2 * (start + source) + 1) / full - 1

    cols = coordinates(left, width, out_w, W)[:, None, :].expand(B, out_h, out_w)
    rows = coordinates(top, height, out_h, H)[:, :, None].expand(B, out_h, out_w)
    grid = torch.stack([cols, rows], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(x, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop, batched: per sample, area fraction ~ U(scale) and log
    aspect ratio ~ U(log ratio) at a uniform position (10 tries; else, as torchvision, the
    largest centred box whose aspect ratio is within `ratio`), then `resized_crop` to `size`
    (bilinear, without torchvision's antialiasing when it shrinks). `size` is an int or
    (height, width); used for multi-crop global and local views."""
    B, _, H, W = x.shape
    tries = 10
    area = H * W * torch.empty(B, tries, device=x.device).uniform_(*scale)
    log_r = torch.empty(B, tries, device=x.device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w, h = (area * log_r.exp()).sqrt().round(), (area / log_r.exp()).sqrt().round()
    ok = (w <= W) & (h <= H) & (w > 0) & (h > 0)
    found = ok.any(1)
    first = ok.float().argmax(1)
    fallback_w, fallback_h = ((W, round(W / ratio[0])) if W / H < ratio[0] else
                              (round(H * ratio[1]), H) if W / H > ratio[1] else (W, H))
    w = torch.where(found, w.gather(1, first[:, None])[:, 0], float(fallback_w))
    h = torch.where(found, h.gather(1, first[:, None])[:, 0], float(fallback_h))
    left = torch.where(found, (torch.rand(B, device=x.device) * (W - w + 1)).floor(),
                       float((W - fallback_w) // 2))
    top = torch.where(found, (torch.rand(B, device=x.device) * (H - h + 1)).floor(),
                      float((H - fallback_h) // 2))
    return resized_crop(x, top, left, h, w, size)


def horizontal_flip(x, p=0.5):
    flip = _bernoulli(p, len(x), x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def grayscale(x):
    """torchvision's rgb_to_grayscale (ITU-R 601 luma with its weights 0.2989, 0.587, 0.114) of a
    float (B, 3, H, W) batch, kept at 3 channels."""
    gray = (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    return gray.expand_as(x)


def rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(delta > 0, (h / 6) % 1.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)),
                    torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x):
    h, s, v = x.unbind(1)
    k = (torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, *([1] * (x.dim() - 2)))
         + h.unsqueeze(1) * 6) % 6
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * (torch.minimum(k, 4 - k).clamp(0, 1))


def blend(x, base, factor):
    """base + factor * (x - base), clipped to [0, 1]: contrast (base = mean gray) and saturation
    (base = gray image) as torchvision defines them."""
    return (base + factor * (x - base)).clamp(0, 1)


def adjust_hue(x, shift):
    h, s, v = rgb_to_hsv(x).unbind(1)
    return hsv_to_rgb(torch.stack([(h + shift) % 1.0, s, v], 1))


def color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=1.0):
    """torchvision's ColorJitter applied with probability p: per-sample factors
    b, c, s ~ U(1 - a, 1 + a) and hue shift ~ U(-hue, hue), in a random order per batch."""
    B, device = len(x), x.device
    factor = lambda a: torch.empty(B, 1, 1, 1, device=device).uniform_(max(0, 1 - a), 1 + a)  # noqa: E731
    ops = []
    if brightness:
        f_b = factor(brightness)
        ops.append(lambda y: (y * f_b).clamp(0, 1))
    if contrast:
        f_c = factor(contrast)
        ops.append(lambda y: blend(y, grayscale(y).mean((1, 2, 3), keepdim=True), f_c))
    if saturation:
        f_s = factor(saturation)
        ops.append(lambda y: blend(y, grayscale(y), f_s))
    if hue:
        shift = torch.empty(B, 1, 1, device=device).uniform_(-hue, hue)
        ops.append(lambda y: adjust_hue(y, shift))
    out = x
    for i in torch.randperm(len(ops)).tolist():
        out = ops[i](out)
    apply = _bernoulli(p, B, device).view(-1, 1, 1, 1)
    return torch.where(apply, out, x)


def random_grayscale(x, p=0.2):
    apply = _bernoulli(p, len(x), x.device).view(-1, 1, 1, 1)
    return torch.where(apply, grayscale(x), x)


def gaussian_blur(x, p=0.5, sigma=(0.1, 2.0), kernel_size=None):
    """Per-sample sigma ~ U(sigma); separable kernels applied as one grouped convolution."""
    B, C, H, W = x.shape
    k = kernel_size or max(3, 2 * int(0.05 * H) + 1)  # about 10% of the side: 23 px at 224, 3 px at 32
    s = torch.empty(B, device=x.device).uniform_(*sigma)
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kernel = torch.exp(-t.view(1, -1) ** 2 / (2 * s.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, k)
    y = F.pad(x.reshape(1, B * C, H, W), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(B * C, 1, k, 1), groups=B * C)
    y = F.conv2d(y, kernel.view(B * C, 1, 1, k), groups=B * C).view(B, C, H, W)
    return torch.where(_bernoulli(p, B, x.device).view(-1, 1, 1, 1), y, x)


def solarize(x, p=0.2, threshold=0.5):
    solarized = torch.where(x >= threshold, 1 - x, x)
    return torch.where(_bernoulli(p, len(x), x.device).view(-1, 1, 1, 1), solarized, x)


def rotations(x):
    """RotNet (Gidaris et al., ICLR 2018): the four rotations 0/90/180/270 degrees of every image,
    stacked rotation-major, and their labels 0..3."""
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(len(x))
    return rotated, labels


# Image mixing. Each returns (mixed images, mix) with mix = {"weights": (K,), "perms": (K, B)}:
# mixed image i is made of images perms[k, i] in proportions weights[k] (summing to 1), so a
# method mixes any per-sample target t as sum_k weights[k] * t[perms[k]] (`mix_targets`).
def mix_targets(targets, mix):
    return sum(w * targets[perm] for w, perm in zip(mix["weights"], mix["perms"]))


def mixup(x, alpha=1.0, mix=None):
    """MixUp (Zhang et al., 2018): x' = lam x + (1 - lam) x[perm], lam ~ Beta(alpha, alpha) per batch.
    Pass `mix` to mix another view with the same lam and permutation."""
    if mix is None:
        lam = float(np.random.beta(alpha, alpha))
        perm = torch.randperm(len(x), device=x.device)
        mix = {"weights": torch.tensor([lam, 1 - lam]),
               "perms": torch.stack([torch.arange(len(x), device=x.device), perm])}
    w = mix["weights"]
    return w[0] * x[mix["perms"][0]] + w[1] * x[mix["perms"][1]], mix


def ricap(x, beta=0.3, mix=None, identity_above=None):
    """RICAP (Takahashi et al., ACML 2018): a boundary point (w, h), w = round(W * Beta(beta, beta)),
    splits the image into four patches; patch k is a crop, at a random position, of image
    perms[k, i]; weights[k] = patch area / image area. Patches whose area share exceeds
    `identity_above` keep the batch order (LSD-C uses 1/4 so a mixed image stays tied to its own
    clean view). Pass `mix` to mix another view with the same boundary and permutations but new
    crop positions (as LSD-C does for its two mixed views)."""
    B, _, H, W = x.shape
    if mix is None:
        w, h = int(round(W * np.random.beta(beta, beta))), int(round(H * np.random.beta(beta, beta)))
        # top-left, top-right, bottom-left, bottom-right
        sizes = [(h, w), (h, W - w), (H - h, w), (H - h, W - w)]
        weights = torch.tensor([ph * pw / (H * W) for ph, pw in sizes])
        identity = torch.arange(B, device=x.device)
        perms = torch.stack([identity if identity_above is not None and share > identity_above
                             else torch.randperm(B, device=x.device) for share in weights.tolist()])
        mix = {"weights": weights, "perms": perms, "sizes": sizes}
    patches = []
    for (ph, pw), perm in zip(mix["sizes"], mix["perms"]):
        top, left = np.random.randint(0, H - ph + 1), np.random.randint(0, W - pw + 1)
        patches.append(x[perm, :, top:top + ph, left:left + pw])
    top_row = torch.cat(patches[:2], 3)
    bottom_row = torch.cat(patches[2:], 3)
    return torch.cat([top_row, bottom_row], 2), mix


# ================================================================================================
# Backbones: each returns features (B, feature_dim) and exposes `feature_dim`. Used by: lsdc.py
# (CIFAR ResNets with parameter-free shortcuts, MLP), deepcluster.py (AlexNets, LeNet-5, ResNet-18);
# cld.py, suave.py (CIFAR ResNets with 1x1-conv shortcuts, the ImageNet ResNet-50); daino.py (those
# and the ViTs).
# ================================================================================================
class PadShortcut(nn.Module):
    """Parameter-free shortcut (LSD-C, AutoNovel): 2x2 average pooling when the block downsamples,
    zero channels appended when it widens. ceil_mode matches the strided 3x3 conv beside it on odd
    sizes (MNIST's 28 px reach layer4 at 7 -> 4); on even sizes it is AutoNovel's AvgPool2d(2)."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.extra, self.stride = out_channels - in_channels, stride

    def forward(self, x):
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, ceil_mode=True)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


def _shortcut(in_channels, out_channels, stride, kind):
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if kind == "pad":
        return PadShortcut(in_channels, out_channels, stride)
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels, planes, stride, shortcut):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_channels, planes, stride, shortcut)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels, planes, stride, shortcut):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = _shortcut(in_channels, planes * 4, stride, shortcut)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stride-1 stem, no max-pool, global average pooling.
    `shortcut`: "conv" (1x1 conv + BN, as CLD/SCAN) or "pad" (parameter-free, as LSD-C).
    `width` is the stem width (64 in every paper; smaller only for quick CPU runs)."""

    def __init__(self, block, layers, in_channels=3, shortcut="conv", width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        channels = width
        for i, (n, stride) in enumerate(zip(layers, (1, 2, 2, 2))):
            planes, blocks = width * 2 ** i, []
            for s in [stride] + [1] * (n - 1):
                blocks.append(block(channels, planes, s, shortcut))
                channels = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.feature_dim = channels

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class ConvNet(nn.Module):
    """`features` (convolutions) -> flatten -> `classifier` (fully connected, last layer without
    ReLU, as DeepCluster clusters the pre-activation fc features)."""

    def __init__(self, features, classifier, feature_dim):
        super().__init__()
        self.features, self.classifier, self.feature_dim = features, classifier, feature_dim
        for m in self.modules():  # DeepCluster's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0,
                                math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def _conv_stack(in_channels, spec):
    """spec: ints (out channels of a conv k3 p1, or (out, kernel, stride, padding)) and "M<k>,<s>" pools."""
    layers = []
    for item in spec:
        if isinstance(item, str):
            k, s = map(int, item[1:].split(","))
            layers.append(nn.MaxPool2d(k, s))
            continue
        out, kernel, stride, padding = item if isinstance(item, tuple) else (item, 3, 1, 1)
        layers += [nn.Conv2d(in_channels, out, kernel, stride, padding), nn.BatchNorm2d(out),
                   nn.ReLU(inplace=True)]
        in_channels = out
    return nn.Sequential(*layers)


def alexnet(in_channels=3):
    """AlexNet with BatchNorm as in DeepCluster (224 px): 5 convs (96, 256, 384, 384, 256),
    fc6/fc7 of 4096; returns fc7 before its ReLU."""
    features = _conv_stack(in_channels, [(96, 11, 4, 2), "M3,2", (256, 5, 1, 2), "M3,2",
                                         384, 384, 256, "M3,2"])
    classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
                               nn.Dropout(0.5), nn.Linear(4096, 4096))
    return ConvNet(features, classifier, 4096)


def alexnet_small(in_channels=3):
    """The Deep Dive's small AlexNet for 32x32 images: five BN convs of 48, 126, 192, 192, 128
    filters (paper), laid out as the author's AlexNet_Micro (3x3 kernels, pools after conv 1, 2
    and 5); fc of 2048 twice. Returns the last fc before its ReLU."""
    features = _conv_stack(in_channels, [(48, 3, 1, 2), "M2,2", (126, 3, 1, 2), "M2,2",
                                         192, 192, 128, "M3,2"])
    classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(128 * 4 * 4, 2048), nn.ReLU(inplace=True),
                               nn.Dropout(0.5), nn.Linear(2048, 2048))
    return ConvNet(features, classifier, 2048)


def alexnet_deepdive(in_channels=3, image_size=224):
    """The AlexNet of the Deep Dive's Appendix A, the author's AlexNet_Small (DeepClusterImplementation,
    deep_clustering_models.py), run on CIFAR-10 upscaled to 224 px: the original AlexNet's
    convolutions, 64 (11x11, stride 4, pad 2), 192 (5x5, pad 2), 384, 256, 256 (3x3), each with BN,
    max-pools 3/2 after conv 1, 2 and 5; dropout 0.5, fc 2048, ReLU, dropout 0.5, fc 2048. Returns the
    last fc before its ReLU. `image_size` sets the fc input (256 x 6 x 6 at 224); at least 63 px."""
    side = ((image_size + 4 - 11) // 4 + 1 - 3) // 2 + 1  # conv 1, pool 1; conv 2 keeps the side
    side = ((side - 3) // 2 + 1 - 3) // 2 + 1  # pool 2; conv 3-5 keep it; pool 3
    if side < 1:
        raise Abort(f"alexnet-deepdive needs images of at least 63 px, not {image_size}")
    features = _conv_stack(in_channels, [(64, 11, 4, 2), "M3,2", (192, 5, 1, 2), "M3,2",
                                         384, 256, 256, "M3,2"])
    classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(256 * side * side, 2048), nn.ReLU(inplace=True),
                               nn.Dropout(0.5), nn.Linear(2048, 2048))
    return ConvNet(features, classifier, 2048)


def lenet5(in_channels=1, image_size=28):
    """LeNet-5 with BatchNorm: 28x28 images have their first convolution padded by 2, which makes
    them the 32x32 input of the original LeNet-5; fc 120 -> 84, returns fc 84 before its ReLU."""
    if image_size not in (28, 32):
        raise Abort(f"lenet5 takes 28x28 or 32x32 images, not {image_size}x{image_size}")
    features = _conv_stack(in_channels, [(6, 5, 1, (32 - image_size) // 2), "M2,2", (16, 5, 1, 0), "M2,2"])
    classifier = nn.Sequential(nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True), nn.Linear(120, 84))
    return ConvNet(features, classifier, 84)


class MLP(nn.Module):
    """Fully connected backbone for vector data (DEC's encoder widths d-500-500-2000, with BN)."""

    def __init__(self, in_dim, hidden=(500, 500, 2000)):
        super().__init__()
        layers = []
        for h in hidden:
            layers += [nn.Linear(in_dim, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            in_dim = h
        self.net, self.feature_dim = nn.Sequential(*layers), in_dim

    def forward(self, x):
        return self.net(x.flatten(1))


def _vit(image_size, patch_size):
    model = torchvision().models.VisionTransformer(image_size=image_size, patch_size=patch_size,
                                                   num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536)
    model.heads, model.feature_dim = nn.Identity(), 384  # returns the class token
    return model


def _torchvision_resnet50():
    model = torchvision().models.resnet50()
    model.fc, model.feature_dim = nn.Identity(), 2048
    return model


BACKBONES = {  # name: builder(in_channels, shortcut, width, image_size)
    "resnet18": lambda c, s, w, i: CifarResNet(BasicBlock, [2, 2, 2, 2], c, s, w),
    "resnet34": lambda c, s, w, i: CifarResNet(BasicBlock, [3, 4, 6, 3], c, s, w),
    "resnet50": lambda c, s, w, i: CifarResNet(Bottleneck, [3, 4, 6, 3], c, s, w),
    "resnet50-imagenet": lambda c, s, w, i: _torchvision_resnet50(),
    "alexnet": lambda c, s, w, i: alexnet(c),
    "alexnet-small": lambda c, s, w, i: alexnet_small(c),
    "alexnet-deepdive": lambda c, s, w, i: alexnet_deepdive(c, i or 224),
    "lenet5": lambda c, s, w, i: lenet5(c, i or 28),
    "vit-s16": lambda c, s, w, i: _vit(224, 16),
    "vit-s4-32": lambda c, s, w, i: _vit(32, 4),
}


def build_backbone(name, in_channels=3, shortcut="conv", width=64, image_size=None):
    """A backbone by name (see BACKBONES; `mlp` is built directly with MLP(in_dim)). `shortcut` and
    `width` concern the CIFAR ResNets, `image_size` LeNet-5 (28 or 32)."""
    if name not in BACKBONES:
        raise Abort(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name](in_channels, shortcut, width, image_size)


# ================================================================================================
# Evaluation. Used by: lsdc.py (clustering metrics, confident samples), deepcluster.py (NMI,
# features), plots.py (cluster-to-class matching), suave.py (ACC/NMI/ARI of the prototypes, kNN and
# the feature probe of SwAV runs), cld.py and daino.py (kNN, probe, clustering metrics).
# ================================================================================================
def _as_numpy(a):
    return a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)


def confusion_matrix(pred, labels, num_clusters=None, num_classes=None):
    """counts[k, c] = #samples in cluster k with class c: int64 (num_clusters, num_classes), the sizes
    defaulting to max id + 1, built with one bincount."""
    pred, labels = _as_numpy(pred).astype(np.int64), _as_numpy(labels).astype(np.int64)
    K = int(pred.max()) + 1 if num_clusters is None else num_clusters
    C = int(labels.max()) + 1 if num_classes is None else num_classes
    return np.bincount(pred * C + labels, minlength=K * C).reshape(K, C)


def cluster_to_class(counts, mapping="auto"):
    """Map clusters to classes from a (K, C) confusion matrix, looking only at the clusters and
    classes present (rows and columns with a count), as scikit-learn's contingency_matrix does:
    "hungarian" is the one-to-one assignment (scipy's linear_sum_assignment) that maximises matched
    samples, "majority" gives each cluster its most frequent class, and "auto" picks Hungarian when
    no more clusters than classes are present, else majority. Returns an int64 array (K,) in the
    original ids: the class of each cluster, -1 for a cluster absent or left unmatched."""
    if mapping not in ("auto", "hungarian", "majority"):
        raise ValueError(f"mapping must be auto, hungarian or majority, not {mapping!r}")
    rows, cols = counts.sum(1).nonzero()[0], counts.sum(0).nonzero()[0]
    present = counts[np.ix_(rows, cols)]
    result = np.full(counts.shape[0], -1, dtype=np.int64)
    if mapping == "majority" or (mapping == "auto" and len(rows) > len(cols)):
        result[rows] = cols[present.argmax(1)]
    else:
        from scipy.optimize import linear_sum_assignment  # imported here: 0.4 s of every start
        matched_rows, matched_cols = linear_sum_assignment(present, maximize=True)
        result[rows[matched_rows]] = cols[matched_cols]
    return result


def nmi(a, b):
    """Normalised mutual information with the arithmetic mean of the entropies (sklearn's default)."""
    counts = confusion_matrix(np.unique(_as_numpy(a), return_inverse=True)[1],
                              np.unique(_as_numpy(b), return_inverse=True)[1]).astype(np.float64)
    p = counts / counts.sum()
    pa, pb = p.sum(1), p.sum(0)
    if len(pa) == len(pb) == 1:
        return 1.0
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum()
    entropy = lambda q: -(q[q > 0] * np.log(q[q > 0])).sum()  # noqa: E731
    return float(max(mi, 0.0) / max((entropy(pa) + entropy(pb)) / 2, np.finfo(float).eps))


def ari(a, b):
    """Adjusted Rand index (Hubert and Arabie, 1985) from the contingency table."""
    counts = confusion_matrix(np.unique(_as_numpy(a), return_inverse=True)[1],
                              np.unique(_as_numpy(b), return_inverse=True)[1]).astype(np.float64)
    pairs = lambda n: (n * (n - 1) / 2).sum()  # noqa: E731
    index, pairs_a, pairs_b = pairs(counts), pairs(counts.sum(1)), pairs(counts.sum(0))
    total = pairs(np.array([counts.sum()]))
    expected = pairs_a * pairs_b / total if total else 0.0  # one sample: no pair, a perfect 1.0 below
    maximum = (pairs_a + pairs_b) / 2
    return 1.0 if maximum == expected else float((index - expected) / (maximum - expected))


def clustering_metrics(pred, labels, num_clusters=None, num_classes=None, mapping="auto"):
    """Clustering ACC, NMI and ARI of `pred` (K cluster ids, ints (N,)) against `labels` (ints (N,)),
    scored on the samples with a known label (label >= 0; -1 = unknown, as STL-10's unlabeled split).
    ACC maps clusters to classes with `cluster_to_class(confusion, mapping)`, which looks at the ids
    present only. Returns {"acc", "nmi", "ari": floats, "confusion": int64 (num_clusters, num_classes)
    counts indexed by the original ids (sizes default to max id + 1), "scored": number of labelled
    samples}; with no labelled sample, acc/nmi/ari are None and the confusion is all zeros (shape
    (0, 0) when the sizes are not given). Never raises on unknown labels."""
    pred, labels = _as_numpy(pred).astype(np.int64), _as_numpy(labels).astype(np.int64)
    known = labels >= 0
    pred, labels = pred[known], labels[known]
    K = num_clusters or (int(pred.max()) + 1 if len(pred) else 0)
    C = num_classes or (int(labels.max()) + 1 if len(labels) else 0)
    counts = confusion_matrix(pred, labels, K, C)
    if not len(labels):
        return {"acc": None, "nmi": None, "ari": None, "confusion": counts, "scored": 0}
    matched = cluster_to_class(counts, mapping)
    acc = counts[np.arange(K), matched][matched >= 0].sum() / len(labels)
    return {"acc": float(acc), "nmi": nmi(pred, labels), "ari": ari(pred, labels), "confusion": counts,
            "scored": len(labels)}


def format_scores(metrics, prefix=""):
    """ "acc A nmi N ari R" (and LSD-C's confident share when present) for a printed line, or a note
    that no sample has a label to score against."""
    if metrics.get(prefix + "acc") is None:
        return "no labelled sample to score"
    line = " ".join(f"{k} {metrics[prefix + k]:.4f}" for k in ("acc", "nmi", "ari"))
    if metrics.get(prefix + "confident_share") is not None:
        line += (f" | confident {metrics[prefix + 'confident_acc']:.4f} of "
                 f"{metrics[prefix + 'confident_share']:.2%}")
    return line


def confident_accuracy(probs, labels, threshold=0.9):
    """LSD-C's confident samples (supplementary Fig. 1b): for probs float (N, K) and labels ints (N,),
    the accuracy, under the mapping `cluster_to_class` finds on all labelled samples, of the labelled
    samples whose top probability exceeds `threshold`, and their share of the labelled samples.
    Unknown labels (-1) are skipped; (None, None) when no sample has a label, (0.0, 0.0) when none
    is confident."""
    probs, labels = _as_numpy(probs), _as_numpy(labels).astype(np.int64)
    known = labels >= 0
    probs, labels = probs[known], labels[known]
    if not len(labels):
        return None, None
    pred = probs.argmax(1)
    mapping = cluster_to_class(confusion_matrix(pred, labels, probs.shape[1]))
    confident = probs.max(1) > threshold
    if not confident.any():
        return 0.0, 0.0
    return float((mapping[pred[confident]] == labels[confident]).mean()), float(confident.mean())


@torch.no_grad()
def knn_predict(train_features, train_labels, query_features, num_classes, k=200, temperature=0.1,
                chunk_elements=2 ** 26):
    """Weighted kNN (Wu et al. NPID; DINO): cosine similarity to the train set, top-k neighbours,
    each voting for its class with weight exp(sim / T). Queries are processed in chunks so the
    similarity block stays under `chunk_elements` (1.28M x 2048 banks fit). Training features
    whose label is unknown (-1) have no vote and are left out of the bank. Features float (N, D),
    labels int64 (N,); returns int64 (Q,) predicted classes; Abort when no training label is known."""
    known = train_labels >= 0
    if not known.any():
        raise Abort("kNN evaluation needs labelled training features, and every label is unknown (-1)")
    train_features, train_labels = train_features[known], train_labels[known]
    bank = F.normalize(train_features, dim=1)
    queries = F.normalize(query_features.to(bank.dtype), dim=1)
    k = min(k, len(bank))
    chunk = max(1, chunk_elements // len(bank))
    predictions = []
    for q in queries.split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], (sim.float() / temperature).exp())
        predictions.append(votes.argmax(1))
    return torch.cat(predictions)


def linear_probe(train_features, train_labels, test_features, test_labels, num_classes, epochs=100,
                 lr=0.1, weight_decay=0.0, batch_size=1024):
    """Logistic regression on frozen features, trained on their device: features standardised with
    train statistics, SGD (momentum 0.9) with a cosine learning rate. Returns the test accuracy
    (float) on the test samples with a known label; samples labelled -1 (unknown) are left out of
    training and scoring, and None is returned when either set has no known label.
    Features float (N, D), labels int64 (N,). A feature constant in training (std at most 1e-6 of
    its largest magnitude) carries nothing to learn: it is set to 0 in both sets, so a test value
    that differs from the training constant cannot swing the prediction."""
    train_known, test_known = train_labels >= 0, test_labels >= 0
    if not train_known.any() or not test_known.any():
        return None
    train_features, train_labels = train_features[train_known], train_labels[train_known]
    test_features, test_labels = test_features[test_known], test_labels[test_known]
    mean, std = train_features.mean(0), train_features.std(0)
    constant = std <= 1e-6 * train_features.abs().amax(0)
    scale = torch.where(constant, 0.0, 1 / std)
    x_train, x_test = (train_features - mean) * scale, (test_features - mean) * scale
    head = nn.Linear(x_train.shape[1], num_classes).to(x_train.device)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(x_train) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(x_train), device=x_train.device).split(batch_size):
                loss = F.cross_entropy(head(x_train[idx]), train_labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    with torch.no_grad():
        return (head(x_test).argmax(1) == test_labels).float().mean().item()


# ================================================================================================
# Command line (used by every method file): one-line errors, the defaults of the chosen dataset in
# --help, range-checked flag types, the run flags and the resume policy
# ================================================================================================
class HelpFormatter(argparse.HelpFormatter):
    """Appends each flag's default, the value it takes for the chosen dataset, unless the help text
    already says what the default is; lists are shown as they are typed."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default in (None, argparse.SUPPRESS)
                or "default:" in text or isinstance(action, argparse._HelpAction)):
            return text
        value = action.default
        if isinstance(value, (list, tuple)):
            value = " ".join(map(str, value)) or "none"
        elif isinstance(value, bool):
            value = "on" if value else "off"
        return f"{text} (default: {str(value).replace('%', '%%')})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's conventions: defaults in --help, and a usage error is one line
    (what is wrong, then a pointer to --help) with exit code 2, without the usage block."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checked(cast, test, what):
    """An argparse type: `cast` the text, then refuse values for which `test` is false (and
    integers beyond 2^31, which no count or size here can reach)."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(value, int) and abs(value) >= 2 ** 31:
            raise argparse.ArgumentTypeError(f"{text!r} is too large")
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what
    return parse


positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: 0 < v < math.inf, "a positive number")
non_negative_float = _checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
fraction = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
open_fraction = _checked(float, lambda v: 0 < v < 1, "a number in (0, 1)")
area_fraction = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")  # crop scales
probability = _checked(float, lambda v: 0 <= v <= 1, "a probability in [0, 1]")
hue_shift = _checked(float, lambda v: 0 <= v <= 0.5, "a hue shift in [0, 0.5]")  # ColorJitter's range
decay_factor = _checked(float, lambda v: 0 < v <= 1, "a factor in (0, 1]")
cosine = _checked(float, lambda v: -1 <= v <= 1, "a cosine in [-1, 1]")
seed_int = _checked(int, lambda v: v >= 0, "a seed >= 0")
device_name = _checked(str, lambda v: re.fullmatch(r"cpu|cuda(:\d+)?", v) is not None,
                       "a device: cpu, cuda or cuda:N")

# Flags that may take a new value on --resume: these change how the run is executed, not what it
# computes (on the CPU, in fp32). Each method adds the schedule flags it allows (e.g. --epochs to
# extend a run, --lr to lower the learning rate after a divergence).
RESUME_RUN_FLAGS = ("device", "amp", "compile", "deterministic", "eval_batch_size", "time_limit",
                    "log_every", "tensorboard", "data_dir")
# The flags that set how long a run trains (its last stage's), and those that change only what a
# finished run's final evaluation does: a finished run takes others only when it is extended.
LENGTH_FLAGS = ("epochs", "cycles")
EVALUATION_FLAGS = ("probe_epochs", "device", "amp", "compile", "deterministic", "eval_batch_size",
                    "data_dir", "tensorboard")


def add_run_arguments(parser, method):
    """The run flags, the same in every method file."""
    g = parser.add_argument_group("run (the same flags in every method file)")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the initial network, the data order and the augmentation")
    g.add_argument("--device", type=device_name,
                   help="cuda, cuda:N or cpu (default: cuda when a GPU is visible, else cpu)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (the CPU always computes in fp32)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the training network (faster on a GPU after a warm-up)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False,
                   help="deterministic kernels (slower on a GPU)")
    g.add_argument("--eval-batch-size", type=positive_int, default=1024,
                   help="images per batch when computing features for evaluation")
    g.add_argument("--out-dir", metavar="DIR",
                   help=f"run directory (default: runs/{method}__<dataset>__<seed>__<time>); "
                   "it must not hold a run already")
    g.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR with its saved settings; only the flags named "
                   "in the epilog may take new values")
    g.add_argument("--time-limit", type=positive_float, metavar="MIN",
                   help="stop at the last epoch boundary that fits in MIN minutes (judged from the "
                   f"epochs so far), with a checkpoint, and exit with code {EXIT_STOPPED} "
                   "(default: no limit)")
    g.add_argument("--log-every", type=positive_float, default=60.0, metavar="S",
                   help="seconds between progress lines inside an epoch")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
                   help="also log every metric to TensorBoard in the run directory "
                   "(pip install tensorboard)")


def resume_epilog(resumable):
    """The epilog sentence that states the resume policy of a method file."""
    flags = ", ".join("--" + k.replace("_", "-") for k in (*resumable, *RESUME_RUN_FLAGS))
    return (f"--resume DIR keeps the run's settings; only {flags} may take new values. Exit codes: "
            f"0 done, 1 diverged, 2 usage error, {EXIT_STOPPED} stopped and resumable, 130 Ctrl-C.")


def parse_arguments(parser, argv, script, check, resumable=()):
    """Parse `argv`. A new run's arguments pass through `check(parser, args)`, which calls
    parser.error for invalid combinations. With --resume DIR the settings saved in DIR/args.json
    are used; flags given beside --resume must be in RESUME_RUN_FLAGS or `resumable` (else exit 2
    naming them), and the changes are kept in `args.resume_changes` {name: (old, new)}."""
    args = parser.parse_args(argv)
    args.script = script
    if not args.resume:
        check(parser, args)
        return args
    unset = object()
    dests = vars(parser.parse_args([]))
    given = vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(dests, unset))))
    saved = Run.saved_args(args.resume, script, dests)
    _check_saved(parser, saved, args.resume)
    changes = {k: (saved[k], v) for k, v in given.items()
               if v is not unset and k not in ("resume", "script") and v != saved.get(k)}
    refused = [k for k in changes if k not in (*RESUME_RUN_FLAGS, *resumable)]
    if refused:
        parser.error("--resume keeps the run's settings, so "
                     f"{', '.join('--' + k.replace('_', '-') for k in refused)} "
                     "cannot change; start a new run instead")
    args = argparse.Namespace(**{**saved, **{k: new for k, (_, new) in changes.items()},
                                 "resume": args.resume})
    args.resume_changes = changes
    check(parser, args)
    return args


def _check_saved(parser, saved, path):
    """Refuse (Abort, exit 2) a value of args.json that its flag could not have given: a string for a
    number, one value for a pair, a choice not offered (an edit by hand)."""
    for action in parser._actions:
        name, value = action.dest, saved.get(action.dest)
        if value is None or name == "resume":  # None: a setting some rows leave unset
            continue
        many = isinstance(action.nargs, int) and action.nargs > 0 or action.nargs in ("+", "*")
        values = value if many else [value]
        if action.nargs == 0:  # a switch
            fits = isinstance(value, bool)
        elif not isinstance(values, list) or (isinstance(action.nargs, int) and len(values) != action.nargs):
            fits = False
        else:
            fits = all(_gives(action, v) for v in values)
        if not fits:
            raise Abort(f"--resume {path}: args.json holds {name} = {json.dumps(value)}, which "
                        f"--{name.replace('_', '-')} cannot give; was args.json edited?")


def _gives(action, value):
    """Whether the flag of `action` turns some text into `value` (one value of it)."""
    if isinstance(value, (bool, list, dict)) or (action.choices is not None and value not in action.choices):
        return False
    try:
        return action.type(str(value)) == value if action.type else isinstance(value, str)
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return False


def peek_dataset(argv, default):
    """The --dataset of `argv` before the full parse, so that --help shows that dataset's defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dataset", default=default)
    return pre.parse_known_args(argv)[0].dataset


# ================================================================================================
# Run plumbing (used by every method file): seeding, devices, run directory, logging, checkpoints,
# resume, time limit and signals, divergence guard
# ================================================================================================
def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def setup_device(name=None):
    """`cuda` when available (the process's LOCAL_RANK GPU under torchrun), else `cpu`. On CUDA:
    cudnn.benchmark and TF32 matmuls."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise Abort(f"--device {name} was asked for but no GPU is visible; use --device cpu")
        if name == "cuda":
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        if torch.device(name).index >= torch.cuda.device_count():
            raise Abort(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(name)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def memory_format(device):
    """channels_last on CUDA (faster convolutions with bf16), the default layout on the CPU."""
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format


def autocast(device, enabled=True):
    """bf16 autocast on CUDA when enabled; a no-op on the CPU (fp32 there, for exact resumes)."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def wrap_model(raw_model, device, compile=False):
    """What the training loop calls: DistributedDataParallel under torchrun, then torch.compile
    when asked. Checkpoints save `raw_model`."""
    model = raw_model
    if dist.is_initialized():
        ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return torch.compile(model) if compile else model


def check_batch_size(flag, batch_size, n, what):
    """Refuse a batch that leaves an epoch without a single step (the last incomplete global
    batch is dropped), before any training."""
    if batch_size * world_size() > n:
        processes = f" x {world_size()} processes" if world_size() > 1 else ""
        raise Abort(f"{flag} {batch_size}{processes} is larger than {what} ({n} samples): no training "
                    f"step would run; lower {flag}")


def check_writable(folder, flag):
    """Create `folder` when needed and check that a file can be written there, before training
    starts (so that a long stage does not end on a path it cannot write)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise Abort(f"{flag} {folder}: cannot write there ({error.strerror}); "
                    "choose another folder") from None


def _remove_stale_temporaries(path):
    """Delete `path`.tmp<pid> files left by processes that died while writing (kill -9)."""
    folder, name = os.path.split(os.path.abspath(path))
    for other in glob.glob(os.path.join(glob.escape(folder), glob.escape(name) + ".tmp*")):
        pid = other.rsplit(".tmp", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    os.remove(other)
            except PermissionError:
                pass


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file, and
    temporaries of writers that were killed are removed."""
    _remove_stale_temporaries(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def atomic_write_json(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore a state from rng_state(), or this rank's from a checkpoint's per-rank list."""
    if isinstance(state, list):
        state = state[rank()] if rank() < len(state) else state[0]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fingerprint(data):
    """A short digest that identifies a dataset's content, for caches of derived files (a
    pre-trained network must not be reused for other data under the same dataset name): the sizes,
    the labels and a strided sample of the images; a folder dataset by its path and file list."""
    h = hashlib.sha1(f"{data.name}:{len(data)}:{data.num_classes}".encode())
    if isinstance(data, FolderImages):
        h.update("\n".join(f"{os.path.abspath(path)}:{label}" for path, label in data.samples).encode())
    else:
        h.update(data.labels.cpu().numpy().tobytes())
        h.update(data.images[::max(1, len(data) // 256)].cpu().numpy().tobytes())
    return h.hexdigest()[:8]


def format_seconds(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


def _load_object(obj, saved):
    """Restore one named checkpoint object in place: modules, optimizers and schedulers through
    load_state_dict, tensors by copy, dicts by update."""
    if hasattr(obj, "load_state_dict"):
        obj.load_state_dict(saved)
    elif torch.is_tensor(obj):
        obj.copy_(saved)
    elif isinstance(obj, dict):
        obj.clear()
        obj.update(saved)
    else:
        raise TypeError(f"cannot restore a {type(obj).__name__} in place")


def _scale_learning_rate(objects, factor):
    """A learning rate lowered on --resume: scale every optimizer's groups and every scheduler's
    base rates, so the schedule continues from where it was at the new scale."""
    for obj in objects.values():
        if isinstance(obj, torch.optim.Optimizer):
            for group in obj.param_groups:
                group["lr"] *= factor
                if "initial_lr" in group:
                    group["initial_lr"] *= factor
        elif isinstance(obj, torch.optim.lr_scheduler.LRScheduler):
            obj.base_lrs = [lr * factor for lr in obj.base_lrs]
            obj._last_lr = [lr * factor for lr in obj.get_last_lr()]


class Run:
    """A run directory: args.json, metrics.jsonl (one line per epoch), checkpoint.pt, final.json.

    A new run claims runs/<method>__<dataset>__<seed>__<time>/ (or --out-dir) atomically: a folder
    that holds any run file is refused, and of two runs started together exactly one gets it.
    A lock held for the life of the process keeps a second process (a resume) out of a live run.
    --resume reopens a directory, repairs a half-written metrics line, drops the lines past its
    checkpoint and keeps the checkpoint for `resume()`. Only rank 0 writes.

    In the training loop: `start = run.resume(stage, epochs, **objects)` names what a checkpoint
    holds and restores it; `run.batches(...)` yields an epoch's batches, prints progress and stops
    at a step boundary on SIGTERM/SIGUSR1; `run.end_epoch(...)` logs, checkpoints, and stops when
    the next epoch would not fit in --time-limit."""

    FILES = ("args.json", "metrics.jsonl", "checkpoint.pt", "final.json")
    active = None  # the run of this process, for the Ctrl-C message
    stop_signal = None  # SIGTERM or SIGUSR1 received (catch_stop_signals), for the training loop
    _named_out_dir = False

    def __init__(self, method, args):
        self.main, self.args, self.script = rank() == 0, args, f"{method}.py"
        self.state, self.stage, self.objects, self.writer = None, None, {}, None
        self.resume_step = self.resume_meter = None
        self.lr_flag, self.path, self._changes_saved, error = "lr", None, False, None
        if self.main:
            try:
                self.path = self._reopen(args) if args.resume else self._claim(method, args)
            except Abort as abort:
                error, self.path = str(abort), None
        if dist.is_initialized():  # every rank learns the directory rank 0 claimed, or its error
            shared = [self.path if self.main else None, error]
            dist.broadcast_object_list(shared, 0)
            self.path, error = shared
        if error:
            raise Abort(error)
        if args.resume:
            if os.path.exists(self.file("final.json")):
                self._settle_finished(args)
            try:
                self.state = torch.load(self.file("checkpoint.pt"), map_location="cpu", weights_only=False)
                assert isinstance(self.state, dict)
                assert {"stage", "epoch", "objects", "rng"} <= self.state.keys()
            except Exception as error:
                raise Abort(f"--resume {self.path}: checkpoint.pt is damaged or not a checkpoint of this "
                            f"project ({type(error).__name__}); the run cannot continue from it") from None
            if args.resume_changes and self.main:
                changed = ", ".join(f"--{k.replace('_', '-')} {new}"
                                    for k, (_, new) in args.resume_changes.items())
                print(f"resuming with {changed} (kept in args.json from the next checkpoint on)", flush=True)
            if self.main:
                self._repair_metrics()
        self.has_checkpoint = self.state is not None
        self.start = time.time()
        if self.main and args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise Abort("--tensorboard needs TensorBoard: pip install tensorboard") from None
            self.writer = SummaryWriter(self.path)
        catch_stop_signals()
        Run.active = self

    def _settle_finished(self, args):
        """A finished run (final.json) trains again only when a LENGTH_FLAGS flag grows; else only
        EVALUATION_FLAGS take effect, in a new final evaluation. The other changes would train
        nothing: they are dropped, so args.json keeps the settings that made the result, and with
        nothing left the run says it has finished (exit 0, as a scheduler's requeue loop expects)."""
        changes = args.resume_changes
        for k, (old, new) in changes.items():
            if k in LENGTH_FLAGS and type(new) is type(old) and new > old:
                return  # extended: it trains again, with every change
        idle = [k for k in changes if k not in EVALUATION_FLAGS]
        for k in idle:
            setattr(args, k, changes.pop(k)[0])
        if not changes:
            flags = ", ".join("--" + k.replace("_", "-") for k in idle)
            unused = f"; {flags} would train nothing" if idle else ""
            self.close()
            raise Stopped(f"the run in {self.path} has finished (final.json){unused}; to extend it, resume "
                          "it with a longer schedule (the flags named at the end of --help)", exit_code=0)

    # -- the directory ---------------------------------------------------------------------------
    def _claim(self, method, args):
        Run._named_out_dir = bool(args.out_dir)
        if args.out_dir:
            return self._claim_one(args.out_dir, args)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = os.path.join("runs", f"{method}__{args.dataset}__{args.seed}__{stamp}")
        for i in range(1, 100):  # runs started in the same second get -2, -3, ...
            path = base if i == 1 else f"{base}-{i}"
            try:
                return self._claim_one(path, args)
            except FileExistsError:
                continue
        raise Abort(f"could not claim a run directory next to {base}; pass --out-dir")

    def _claim_one(self, path, args):
        """Claim `path` for a new run: the lock first (a live run holds it), then the check that no
        run file is there. A start that failed before its first checkpoint left only args.json: that
        folder is free again."""
        if os.path.exists(path) and not os.path.isdir(path):
            raise Abort(f"--out-dir {path} is a file, not a folder; choose another --out-dir")
        try:
            os.makedirs(path, exist_ok=True)
            self._lock(path, claim=True)
        except FileExistsError:  # a default-named folder taken by a live run: the next name is tried
            raise
        except OSError as error:
            raise Abort(f"cannot create the run directory {path} ({error.strerror}); choose another "
                        "--out-dir") from None
        if any(os.path.exists(os.path.join(path, f)) for f in self.FILES if f != "args.json"):
            self.close()
            if args.out_dir:
                raise Abort(f"{path} already holds a run; continue it with --resume {path} or choose "
                            "another --out-dir")
            raise FileExistsError
        atomic_write_json(vars(args), os.path.join(path, "args.json"))
        return path

    def _reopen(self, args):
        path = args.resume
        checkpoint = os.path.isfile(os.path.join(path, "checkpoint.pt"))
        if checkpoint or os.path.isfile(os.path.join(path, ".lock")):  # a live run says so, even before
            self._lock(path)  # its first checkpoint
        if not checkpoint:
            self.close()
            raise Abort(f"--resume {path}: no checkpoint.pt there (the run stopped before its first "
                        f"checkpoint: start it again, with --out-dir {path} if you like)")
        _remove_stale_temporaries(os.path.join(path, "checkpoint.pt"))
        return path

    def _lock(self, path, claim=False):
        """Hold path/.lock for the life of the process (released when it ends, even by kill -9)."""
        self._lock_file = open(os.path.join(path, ".lock"), "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            if claim and not Run._named_out_dir:
                raise FileExistsError from None
            raise Abort(f"another process is running the run in {path}; wait for it to end") from None

    @staticmethod
    def saved_args(path, script, defaults):
        """The settings a run was started with, checked to be a complete run of `script` (every
        flag in `defaults`); run flags missing from older runs take their default."""
        try:
            with open(os.path.join(path, "args.json")) as f:
                saved = json.load(f)
        except (OSError, ValueError) as error:
            raise Abort(f"--resume {path}: cannot read args.json ({error})") from None
        made_by = saved.get("script") if isinstance(saved, dict) else None
        if made_by and made_by != script:
            raise Abort(f"{path} is a run of {made_by}; continue it with python {made_by} --resume {path}")
        if not isinstance(saved, dict) or "dataset" not in saved:
            raise Abort(f"--resume {path}: args.json does not hold the settings of a {script} run")
        missing = [k for k in defaults if k not in saved and k not in RESUME_RUN_FLAGS]
        if missing:
            raise Abort(f"--resume {path}: args.json lacks --{missing[0].replace('_', '-')} and "
                        f"{len(missing) - 1} more settings: it is not a run of this {script}")
        return {**{k: v for k, v in defaults.items() if k in RESUME_RUN_FLAGS}, **saved}

    def file(self, name):
        return os.path.join(self.path, name)

    def _repair_metrics(self):
        """Keep the metric lines up to the checkpoint's last finished epoch; a line cut by a crash is
        dropped."""
        path = self.file("metrics.jsonl")
        if not os.path.exists(path):
            return
        stage, last = self.state["stage"], self.state["epoch"] - (self.state.get("step") is not None)
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    m = json.loads(line)
                except ValueError:
                    continue
                if m.get("stage") == stage and m.get("epoch", -1) > last:
                    break
                kept.append(json.dumps(m) + "\n")
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)

    @classmethod
    def resume_hint(cls):
        run = cls.active  # the file decides: Ctrl-C may land after its rename, before has_checkpoint is set
        if run is None or not (run.has_checkpoint or os.path.exists(run.file("checkpoint.pt"))):
            return "no checkpoint was written: start the run again"
        return f"continue with: python {run.script} --resume {run.path}"

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def resumed_stage(self):
        """The stage of the checkpoint being resumed (None for a new run or once it is restored)."""
        return self.state["stage"] if self.state else None

    @property
    def inside_epoch(self):
        """Whether the run resumes inside an epoch (until `batches` has skipped what it trained)."""
        return self.resume_step is not None

    def resume(self, stage, epochs, lr_flag="lr", **objects):
        """Begin `stage` (of `epochs` epochs) with the named objects that its checkpoints hold:
        anything with a state_dict (models, optimizers, schedulers), tensors and dicts. When the run
        being resumed stopped inside this stage, restore them and every rank's RNG, apply a new
        `lr_flag` given on --resume, and return the epoch to continue from; else return 0."""
        self.start_stage(stage, epochs)
        self.objects, self.lr_flag = objects, lr_flag
        if self.resumed_stage != stage:
            return 0
        state, self.state = self.state, None
        for name, obj in objects.items():
            try:
                _load_object(obj, state["objects"][name])
            except (KeyError, RuntimeError, ValueError) as error:
                text = str(error).strip()
                first = text.splitlines()[-1][:160] if text else type(error).__name__
                raise Abort(f"--resume {self.path}: the checkpoint's {name} does not fit this run's settings "
                            f"({first}); was args.json edited?") from None
        old, new = self.args.resume_changes.get(lr_flag, (None, None))
        if old:
            _scale_learning_rate(objects, new / old)
        set_rng_state(state["rng"])
        if state.get("step") is not None:  # stopped inside an epoch: `batches` skips what it trained
            self.resume_step, self.resume_meter = state["step"], state["meter"]
            start, begun = state["epoch"], state["epoch"] + 1
        else:
            start = begun = state["epoch"] + 1
        if begun > epochs:
            inside = f" and {state['step']} steps of epoch {begun}" if begun > start else ""
            flag = next(f for f in (*LENGTH_FLAGS, "epochs") if f in vars(self.args)).replace("_", "-")
            raise Abort(f"the run has trained {start} epochs of {stage}{inside}; --{flag} cannot be lower "
                        f"than {begun}")
        return start

    def start_stage(self, stage, epochs):
        """Name the stage that log lines are tagged with; its ETA counts from now."""
        self.stage, self.epochs, self.objects = stage, epochs, {}
        self.epoch_seconds, self.epoch_end = [], time.time()

    def save_checkpoint(self, epoch, step=None, meter=None):
        """Write the stage's named objects (state_dict() of those that have one, tensors and dicts as
        they are), the position (epoch; step inside it when stopped mid-epoch, with the meter) and
        every rank's RNG states. A collective under torchrun."""
        rngs = [rng_state()]
        if dist.is_initialized():
            rngs = [None] * world_size()
            dist.all_gather_object(rngs, rng_state())
        self._keep_changes()
        if self.main:
            objects = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in self.objects.items()}
            atomic_save({"stage": self.stage, "epoch": epoch, "step": step, "objects": objects, "rng": rngs,
                         "meter": meter.state_dict() if meter else None}, self.file("checkpoint.pt"))
        self.has_checkpoint = True

    # -- the training loop -----------------------------------------------------------------------
    def _stop_requested(self, step):
        """A signal arrived (checked every step; under torchrun all ranks agree every 16 steps)."""
        if not dist.is_initialized():
            return self.stop_signal is not None
        if step % 16:
            return False
        return bool(_any_rank(self.stop_signal is not None))

    def batches(self, data, batch_size, epoch, meter, order=None, random_crop=False):
        """This rank's (indices, uint8 images, labels) for each step of an epoch (`order`: the
        epoch's global index order, default `epoch_order` of the seed and epoch). Between steps it
        prints progress at most every --log-every seconds (no device sync), and after SIGTERM or
        SIGUSR1 it checkpoints the position inside the epoch (with `meter`) and stops with exit
        code 3; the resumed run skips the steps already trained and ends where an uninterrupted one
        ends."""
        first = 0
        if self.resume_step is not None:
            first, self.resume_step = self.resume_step, None
            meter.load_state_dict(self.resume_meter)
        steps = EpochBatches(data, batch_size, self.args.seed, epoch, order, random_crop, first)
        total, images = len(steps), 0
        start = last_print = time.time()
        for step, (idx, x, y) in enumerate(steps, first):
            yield idx, x, y
            images += len(idx) * world_size()
            if self._stop_requested(step):
                self.save_checkpoint(epoch, step + 1, meter)
                name = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal"
                raise Stopped(f"stopped by {name} after step {step + 1}/{total} of {self.stage} epoch "
                              f"{epoch + 1}, with a checkpoint; {self.resume_hint()}")
            now = time.time()
            if now - last_print >= self.args.log_every and self.main:
                rate = images / (now - start)
                eta = (total - step - 1) * (now - start) / (step + 1 - first)
                print(f"{self.stage} epoch {epoch + 1}/{self.epochs} step {step + 1}/{total} | "
                      f"{rate:,.0f} img/s | epoch eta {format_seconds(eta)}", flush=True)
                last_print = now

    def end_epoch(self, epoch, metrics, images, seconds):
        """Log the epoch, checkpoint it, and stop (exit code 3) when --time-limit would be passed
        before the next epoch ends, judged from the longest epoch of this session."""
        self.log(epoch, metrics, images, seconds)
        self.save_checkpoint(epoch)
        now = time.time()
        self.epoch_seconds.append(now - self.epoch_end)
        self.epoch_end = now
        limit = self.args.time_limit
        if limit and epoch + 1 < self.epochs:
            late = now + max(self.epoch_seconds) > self.start + 60 * limit
            if _any_rank(late):
                raise Stopped(f"stopped at the time limit ({limit:g} min) after {self.stage} epoch "
                              f"{epoch + 1}/{self.epochs}, with a checkpoint; {self.resume_hint()}")

    def diverged(self, what, epoch):
        """The message of a NaN/inf stop: where, what is kept, what to do."""
        where = f" at epoch {epoch + 1}" if epoch is not None else ""
        flag = "--" + self.lr_flag.replace("_", "-")
        if self.has_checkpoint:
            return (f"{what}{where}: training diverged; the last good checkpoint is kept in {self.path}: "
                    f"continue with a lower learning rate: python {self.script} --resume {self.path} "
                    f"{flag} LR")
        on_gpu = self.args.device != "cpu" and torch.cuda.is_available()
        amp = " (or --no-amp)" if self.args.amp and on_gpu else ""
        return (f"{what}{where}: training diverged before any checkpoint was written; start again "
                f"with a lower {flag}{amp}")

    # -- logging ---------------------------------------------------------------------------------
    def print(self, message):
        """Print on the main process only."""
        if self.main:
            print(message, flush=True)

    def log(self, epoch, metrics, images, seconds):
        """Print one line and append it to metrics.jsonl; `images` were trained on in `seconds`."""
        if not self.main:
            return
        metrics = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics["images_per_s"] = images / max(seconds, 1e-9)
        metrics["train_seconds"] = seconds
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                         if k not in ("images_per_s", "train_seconds"))
        eta = (time.time() - self.epoch_end + sum(self.epoch_seconds)) / (len(self.epoch_seconds) + 1) \
            * (self.epochs - epoch - 1)
        print(f"{self.stage} epoch {epoch + 1}/{self.epochs} | {shown} | "
              f"{metrics['images_per_s']:,.0f} img/s | "
              f"elapsed {format_seconds(time.time() - self.start)} | eta {format_seconds(eta)}", flush=True)
        with open(self.file("metrics.jsonl"), "a") as f:
            f.write(json.dumps({"stage": self.stage, "epoch": epoch, **metrics}) + "\n")
        if self.writer:
            for k, v in metrics.items():
                self.writer.add_scalar(f"{self.stage}/{k}", v, epoch)

    def _keep_changes(self):
        """The settings a resumed run changed go into args.json once it has made progress with them: a
        checkpoint, or a result (a run resumed only for its final evaluation, e.g. another probe)."""
        if self.main and self.args.resume and self.args.resume_changes and not self._changes_saved:
            atomic_write_json({k: v for k, v in vars(self.args).items() if k != "resume_changes"},
                              self.file("args.json"))
            self._changes_saved = True

    def finish(self, metrics):
        """Write final.json (atomically) with the run's result, and the settings that made it, and
        release the run."""
        self._keep_changes()
        if self.main:
            atomic_write_json(metrics, self.file("final.json"))
        self.close()

    def close(self):
        """Release the run's lock (the end of the process does it too) and the TensorBoard writer."""
        if self.writer:
            self.writer.close()
        if getattr(self, "_lock_file", None):
            self._lock_file.close()
            self._lock_file = None


class Meter:
    """Sums per-step values on the device (no host sync in the loop); each name is averaged over
    the steps that added it. `averages()` syncs once per epoch and stops the run if any is NaN or
    inf, before a checkpoint could save bad weights."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, **values):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()
            self.counts[k] = self.counts.get(k, 0) + 1

    def state_dict(self):
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state):
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])

    def averages(self, epoch=None, run=None):
        if not self.sums:
            return {}
        totals = all_reduce_mean(torch.stack([self.sums[k] / self.counts[k] for k in self.sums]))
        values = dict(zip(self.sums, totals.tolist()))
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            what = f"{bad[0]} became {values[bad[0]]}"
            message = run.diverged(what, epoch) if run else f"{what}: training diverged"
            raise Abort(message, exit_code=1)
        return values


# ================================================================================================
# Distributed (torchrun; used by every method file): every helper is a no-op in a single process
# ================================================================================================
def init_distributed(device):
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPU, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        # DistributedDataParallel imports torch.distributed.nn.functional, whose functions take
        # `group=group.WORLD` as a default argument: imported after the group exists, they hold it
        # for the life of the interpreter, destroy_process_group cannot join gloo's threads, and
        # one still releasing the last collective's tensors at exit aborts the process
        # ("terminate called without an active exception"). Imported first, they hold None.
        import torch.distributed.nn.functional  # noqa: F401
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def all_reduce_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_mean(tensor):
    return all_reduce_sum(tensor) / world_size()


def _any_rank(flag):
    """True when `flag` is true on any rank (one small collective)."""
    if not dist.is_initialized():
        return flag
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    return all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0


def all_gather_cat(tensor):
    """Concatenate along dim 0 the (equally shaped) tensors of all ranks, in rank order."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def epoch_order(n, seed, epoch, device):
    """The epoch's shuffled index order: a function of (seed, epoch) only, so it is the same on
    every rank and after a resume, whatever else consumed random numbers."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g).to(device)


def shard_batches(order, batch_size):
    """Split an epoch's index order (the same on every rank) into global batches of
    batch_size * world_size and return this rank's batch_size slice of each, dropping the last
    incomplete global batch. `batch_size` is per device."""
    world = world_size()
    n_batches = len(order) // (batch_size * world)
    return order[:n_batches * batch_size * world].view(n_batches, world, batch_size)[:, rank()]


class EpochBatches:
    """This rank's batches of one epoch, (indices, uint8 images, labels) each: the global `order`
    (default: `epoch_order(len(data), seed, epoch)`) cut into global batches, this rank's slice of
    each, starting at step `first`. `len()` is the number of steps of the whole epoch."""

    def __init__(self, data, batch_size, seed, epoch, order=None, random_crop=False, first=0):
        if order is None:
            order = epoch_order(len(data), seed, epoch, data.labels.device)
        self.steps = shard_batches(order.to(data.labels.device), batch_size)
        self.data, self.batch_size, self.random_crop, self.first = data, batch_size, random_crop, first

    def __len__(self):
        return len(self.steps)

    def __iter__(self):
        return self.data.batches(self.steps[self.first:].flatten(), self.batch_size, self.random_crop)


@torch.no_grad()
def extract_features(model, data, transform, batch_size=1024, amp=True):
    """`model(transform(images))` over the whole dataset in order, as float32 (N, D), and the labels
    (N,), on the data's device. A module runs in eval mode (its mode is restored after). Under
    torchrun each rank computes one slice (the last padded with repeats) and the slices are
    gathered, so every rank returns all N rows."""
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    n, per_rank = len(data), -(-len(data) // world_size())
    order = torch.arange(rank() * per_rank, (rank() + 1) * per_rank).clamp(max=n - 1)
    features, device = [], data.labels.device
    for _, images, _ in data.batches(order, batch_size):
        with autocast(device, amp):
            features.append(model(transform(images)).float())
    if was_training:
        model.train()
    return all_gather_cat(torch.cat(features))[:n], data.labels
