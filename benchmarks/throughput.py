"""Throughput on CIFAR-size data: what the batched augmentation costs, and how fast a method's real
training loop runs against the bare train step of its network.

    python benchmarks/throughput.py [--json out.json]                      # augmentation cost
    python benchmarks/throughput.py --method lsdc [--json out.json] [-- METHOD FLAGS]
    python benchmarks/throughput.py --method lsdc --device cpu --images 512 -- --width 4 --batch-size 64

Without --method (images/s, median of --repeats timings of --calls calls after --warmup calls, CUDA
synchronised): the augmentation pipelines alone (crop + flip of LSD-C and RotNet, SimCLR-style
colour, multi-crop); a CIFAR ResNet-18 train step (bf16 autocast on CUDA, channels_last, SGD) on
pre-made tensors and the same step fed by the crop + flip pipeline, whole network and layer4 + head
(LSD-C's clustering stage); inference; the RotNet step (four rotations per image).

With --method M (lsdc, deepcluster, cld, suave, daino): M's model, optimizer and transforms are
built as M's main() builds them, from M's command line for CIFAR-10 (METHOD FLAGS, after --, change
it), and M's own train_one_epoch runs over --images images resident on the device, through a
common.Run in a temporary directory; the median over --epochs timed epochs after one warm-up epoch
is set against the bare step of the same network (forward, backward, optimizer step on one pre-made
batch of the same size, cross-entropy on its outputs). M's loop trains each image as `views`
forward passes (LSD-C: a clean and two mixed views; CLD: two views, and a third through MoCo's key
encoder; Suave, Daino: their global and local crops, of which the local ones are smaller, beside the
labelled batch; Daino's teacher sees the global crops too), so `ratio_per_view` is the comparison
of equal work; the bare step of Suave and Daino is one global-size crop. Their labelled images are
a class-balanced subset of the stand-in data.
DeepCluster's clustering between epochs is not part of its train_one_epoch and is not timed.

Random uint8 images stand in for CIFAR-10: speed does not depend on the content.
"""
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import cld  # noqa: E402
import daino  # noqa: E402
import deepcluster  # noqa: E402
import lsdc  # noqa: E402
import suave  # noqa: E402

MEAN, STD = common.DATASETS["cifar10"][3:]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, images_per_call, warmup, repeats, calls):
    """Median images/s over `repeats` timings of `calls` calls each."""
    for _ in range(warmup):
        fn()
    sync()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        rates.append(images_per_call * calls / (time.perf_counter() - t))
    return statistics.median(rates)


# ================================================================================================
# Augmentation cost
# ================================================================================================
def crop_flip(x):
    x = common.random_crop(x, 32, 4)
    x = common.normalize(common.horizontal_flip(common.to_float(x)), MEAN, STD)
    return x.contiguous(memory_format=common.memory_format(x.device))


def simclr(x):
    x = common.random_resized_crop(common.to_float(x), 32, scale=(0.2, 1.0))
    x = common.color_jitter(x, 0.4, 0.4, 0.4, 0.4, p=0.8)
    x = common.random_grayscale(common.horizontal_flip(x), 0.2)
    return common.normalize(x, MEAN, STD).contiguous(memory_format=common.memory_format(x.device))


def multi_crop(x):
    x = common.to_float(x)
    views = [common.random_resized_crop(x, 32, (0.6, 1.0)) for _ in range(2)]
    views += [common.random_resized_crop(x, 16, (0.1, 0.6)) for _ in range(4)]
    return [common.normalize(common.horizontal_flip(v), MEAN, STD) for v in views]


def train_step_fn(model, optimizer, inputs_fn, labels, amp=True):
    """forward + backward + optimizer step of `model` on inputs_fn() against `labels`."""
    def step():
        with common.autocast(labels.device, amp):
            loss = F.cross_entropy(model(inputs_fn()).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def resnet18(frozen_blocks, width, device):
    backbone = common.build_backbone("resnet18", shortcut="pad", width=width)
    lsdc.freeze_blocks(backbone, frozen_blocks)
    model = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, 10))
    model = model.to(device, memory_format=common.memory_format(device))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


def augmentation_cost(data, args, device):
    B = args.batch_size
    idx = lambda n=B: torch.randint(0, len(data), (n,), device=device)  # noqa: E731
    labels = torch.randint(0, 10, (B,), device=device)
    rotnet_images = min(128, B)
    premade = crop_flip(data[:B])
    bench = lambda fn, n=B: timed(fn, n, args.warmup, args.repeats, args.calls)  # noqa: E731
    results = {"batch_size": B, "width": args.width}
    results["aug_crop_flip"] = bench(lambda: crop_flip(data[idx()]))
    results["aug_simclr"] = bench(lambda: simclr(data[idx()]))
    results["aug_multicrop_2x32_4x16"] = bench(lambda: multi_crop(data[idx()]))
    for name, frozen in (("full", 0), ("layer4", 3)):
        model, opt = resnet18(frozen, args.width, device)
        premade_rate = bench(train_step_fn(model, opt, lambda: premade, labels))
        augmented_rate = bench(train_step_fn(model, opt, lambda: crop_flip(data[idx()]), labels))
        results[f"step_{name}_premade"], results[f"step_{name}_augmented"] = premade_rate, augmented_rate
        results[f"aug_overhead_{name}"] = 1 - augmented_rate / premade_rate
    model, _ = resnet18(0, args.width, device)
    model.eval()
    big = crop_flip(data[:2048])
    with torch.no_grad(), common.autocast(device):
        results["inference"] = bench(lambda: model(big), len(big))
    # RotNet: 128 images -> 512 rotated views per step, the whole network trained
    model, opt = resnet18(0, args.width, device)
    model[1] = nn.Linear(model[0].feature_dim, 4).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    rot_labels = torch.arange(4, device=device).repeat_interleave(rotnet_images)
    views = 4 * rotnet_images
    premade_views = lambda: common.rotations(premade[:rotnet_images])[0]  # noqa: E731
    augmented_views = lambda: common.rotations(crop_flip(data[idx(rotnet_images)]))[0]  # noqa: E731
    results["rotnet_premade_views"] = bench(train_step_fn(model, opt, premade_views, rot_labels), views)
    results["rotnet_augmented_views"] = bench(train_step_fn(model, opt, augmented_views, rot_labels), views)
    return results


# ================================================================================================
# A method's train_one_epoch against the bare step; each setup mirrors the method's main()
# ================================================================================================
def setup_lsdc(args, data, device):
    """lsdc.main's LSD-C stage on a (RotNet-shaped) backbone: stem + 3 blocks frozen, SGD, MultiStepLR."""
    backbone = common.build_backbone(args.backbone, 3, shortcut="pad", width=args.width)
    backbone = backbone.to(device, memory_format=common.memory_format(device))
    args.num_clusters = args.num_clusters or data.num_classes
    raw_model = lsdc.LSDCNet(backbone, args.num_clusters, args.head).to(device)
    lsdc.freeze_blocks(backbone, args.frozen_blocks)
    optimizer, scheduler = lsdc.make_optimizer(raw_model, args)
    augment, _ = lsdc.make_transforms(args, data, device)
    objects = dict(model=raw_model, optimizer=optimizer, scheduler=scheduler)
    return raw_model, optimizer, augment, "lsdc", objects, {}, 3, None


def setup_deepcluster(args, data, device):
    """deepcluster.main's training cycles: body with momentum, head without; random pseudo-labels
    stand in for a clustering (k-means is not part of train_one_epoch)."""
    raw_model = deepcluster.build_model(args, 3, 32).to(device, memory_format=common.memory_format(device))
    head = list(raw_model.head.parameters())
    body = [p for p in raw_model.parameters() if all(p is not h for h in head)]
    groups = [{"params": body, "momentum": args.momentum}, {"params": head, "momentum": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=args.lr, weight_decay=args.weight_decay)
    labels = torch.randint(0, args.num_clusters, (len(data),), device=device)
    augment, _ = deepcluster.make_transforms(args, data, device)
    objects = dict(model=raw_model, optimizer=optimizer, labels=labels, clustering={})
    return raw_model, optimizer, augment, "train", objects, {"labels": labels}, 1, None


def setup_cld(args, data, device):
    """cld.main's training: the network with both heads, its memory bank (NPID) or key encoder and
    queue (MoCo), SGD with the per-step schedule. Its bare step is the backbone + a linear layer."""
    backbone = common.build_backbone(args.backbone, 3, shortcut="conv", width=args.width)
    raw_model = cld.CLDNet(backbone, args).to(device, memory_format=common.memory_format(device))
    state = cld.make_state(args, raw_model, len(data), device)
    optimizer, scheduler = cld.make_optimizer(raw_model, args, len(data) // args.batch_size)
    augment, _ = cld.make_transforms(args, data, device)
    objects = dict(model=raw_model, optimizer=optimizer, scheduler=scheduler, **state)
    bare = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, 10)).to(device)
    extra = dict(scheduler=scheduler, raw_model=raw_model, state=state)
    return raw_model, optimizer, augment, "train", objects, extra, 2 if args.base == "npid" else 3, bare


def setup_suave(args, data, device):
    """suave.main's training: SuaveNet, LARS, the multi-crop transforms, the queue, the EMA encoder
    and the labelled loader, as main builds them."""
    args.num_clusters = args.num_clusters or data.num_classes
    backbone = common.build_backbone(args.backbone, 3, shortcut="conv", width=args.width)
    raw_model = suave.SuaveNet(backbone, args.hidden_dim, args.feature_dim, args.num_clusters)
    raw_model = raw_model.to(device, memory_format=common.memory_format(device))
    ema = copy.deepcopy(raw_model).requires_grad_(False) if args.ema else None
    optimizer = suave.LARS(raw_model.parameters(), args.lr, args.weight_decay, args.momentum, args.lars_eta,
                           args.lars_exclude, args.lars_clip)
    augment, _ = suave.make_transforms(args, data, device)
    length = args.queue_length - args.queue_length % args.batch_size
    queue = torch.zeros(args.global_crops, length, args.feature_dim, device=device) if length else None
    progress = {"step": 0, "queued": 0}
    labelled = None
    if args.labels_per_class != 0:
        indices = common.labelled_subset(data, args.labels_per_class, args.label_fraction, None, args.seed)
        labelled = suave.LabelledBatches(data, indices, args.labelled_batch_size, args.seed)
    objects = dict(model=raw_model, optimizer=optimizer, progress=progress)
    extra = dict(raw_model=raw_model, ema=ema, queue=queue, progress=progress, labelled=labelled)
    return raw_model, optimizer, augment, "train", objects, extra, args.global_crops + args.local_crops, None


def setup_daino(args, data, device):
    """daino.main's training: DainoNet, its teacher and centre, LARS or AdamW, the multi-crop
    transforms and the labelled loader, as main builds them."""
    args.num_clusters = args.num_clusters or data.num_classes
    backbone = common.build_backbone(args.backbone, 3, shortcut="conv", width=args.width)
    if args.backbone.startswith("vit"):
        backbone = daino.MultiResolutionViT(backbone)
    raw_model = daino.DainoNet(backbone, args.hidden_dim, args.bottleneck_dim, args.num_clusters,
                               args.norm_last_layer, args.head_bn)
    raw_model = raw_model.to(device, memory_format=common.memory_format(device))
    teacher = None if args.supervised_only else copy.deepcopy(raw_model).requires_grad_(False)
    optimizer = daino.make_optimizer(raw_model, args)
    augment, _ = daino.make_transforms(args, data, device)
    centre, progress = torch.zeros(1, args.num_clusters, device=device), {"step": 0}
    labelled = None
    if args.labels_per_class != 0:
        indices = common.labelled_subset(data, args.labels_per_class, args.label_fraction, None, args.seed)
        labelled = daino.LabelledBatches(data, indices, args.labelled_batch_size, args.seed)
    objects = dict(model=raw_model, optimizer=optimizer, centre=centre, progress=progress)
    extra = dict(raw_model=raw_model, teacher=teacher, centre=centre, progress=progress, labelled=labelled)
    return raw_model, optimizer, augment, "train", objects, extra, args.global_crops + args.local_crops, None


METHODS = {"lsdc": (lsdc, setup_lsdc), "deepcluster": (deepcluster, setup_deepcluster),
           "cld": (cld, setup_cld), "suave": (suave, setup_suave), "daino": (daino, setup_daino)}


def method_loop(data, args, device, out_dir):
    module, setup = METHODS[args.method]
    margs = module.parse_args(["--dataset", "cifar10", "--device", args.device, *args.method_flags,
                               "--out-dir", out_dir])
    common.check_batch_size("--batch-size", margs.batch_size, len(data), "--images")
    common.seed_everything(margs.seed)
    raw_model, optimizer, augment, stage, objects, extra, views, bare = setup(margs, data, device)
    run = common.Run(args.method, margs)
    run.resume(stage, args.epochs + 1, **objects)
    model = common.wrap_model(raw_model, device, margs.compile)
    raw_model.train()
    rates = []
    for epoch in range(args.epochs + 1):  # epoch 0 warms up (cudnn autotuning, compilation)
        t = time.perf_counter()
        meter, seen = module.train_one_epoch(model, optimizer, data, augment, margs, epoch, run, device,
                                             **extra)
        meter.averages(epoch, run)  # waits for the device
        rates.append(seen / (time.perf_counter() - t))
    run.close()
    one_view = augment["global"] if isinstance(augment, dict) else augment  # Suave, Daino: crops by kind
    one_view = one_view[0] if isinstance(one_view, list) else one_view  # Daino: one pipeline per global crop
    premade = one_view(data.images[:margs.batch_size])
    if bare is None:  # the method's own network, with its optimizer
        labels = torch.randint(0, margs.num_clusters, (margs.batch_size,), device=device)
        step = train_step_fn(model, optimizer, lambda: premade, labels, margs.amp)
    else:  # the method's network without its heads, a linear layer on top, plain SGD
        labels = torch.randint(0, 10, (margs.batch_size,), device=device)
        bare_optimizer = torch.optim.SGD(bare.parameters(), lr=0.01, momentum=0.9)
        step = train_step_fn(common.wrap_model(bare, device, margs.compile), bare_optimizer, lambda: premade,
                             labels, margs.amp)
    bare = timed(step, margs.batch_size, args.warmup, args.repeats, args.calls)
    method = statistics.median(rates[1:])
    return {"method": args.method, "method_flags": args.method_flags, "batch_size": margs.batch_size,
            "method_images_per_s": method, "bare_step_images_per_s": bare, "ratio": method / bare,
            "views": views, "ratio_per_view": views * method / bare}


def main():
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--method", choices=list(METHODS), help="time this method's train_one_epoch")
    p.add_argument("--batch-size", type=common.positive_int, default=256,
                   help="without --method (a method takes its own --batch-size after --)")
    p.add_argument("--width", type=common.positive_int, default=64, help="ResNet-18 width without --method")
    p.add_argument("--warmup", type=common.non_negative_int, default=20, help="untimed calls first")
    p.add_argument("--repeats", type=common.positive_int, default=5, help="timings; the median is kept")
    p.add_argument("--calls", type=common.positive_int, default=50, help="calls per timing")
    p.add_argument("--epochs", type=common.positive_int, default=3, help="timed epochs of the method's loop")
    p.add_argument("--images", type=common.positive_int, default=50000, help="size of the stand-in dataset")
    p.add_argument("--device", type=common.device_name, default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--json", help="also write the results here")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.method_flags = argv[split + 1:]
    device = common.setup_device(args.device)
    if not args.method:
        common.check_batch_size("--batch-size", args.batch_size, args.images, "--images")
    torch.manual_seed(0)
    data = common.TensorImages("cifar10", torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8),
                               torch.randint(0, 10, (args.images,)), 10, MEAN, STD).to(device)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__, "images": args.images}
    if args.method:
        with tempfile.TemporaryDirectory() as tmp:
            results.update(method_loop(data, args, device, os.path.join(tmp, "run")))
    else:
        results.update(augmentation_cost(data.images, args, device))
    if device.type == "cuda":
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:<{width}}  {v:,.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    common.run_main(main)
