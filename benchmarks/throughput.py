"""Throughput of the batched GPU augmentation and of CIFAR ResNet-18 train steps, on CIFAR-size data.

    python benchmarks/throughput.py [--batch-size 256] [--json out.json]

Measures (images/s, median of --repeats timed runs after warm-up, CUDA synchronised):
  - augmentation pipelines alone: crop+flip (LSD-C, RotNet), SimCLR-style colour (CLD), multi-crop;
  - a ResNet-18 train step (bf16 autocast, channels_last, SGD) on pre-made tensors, and the same
    step fed by the crop+flip pipeline: the difference is what augmentation costs;
  - the same with only layer4 + head trainable (LSD-C's clustering stage), and inference;
  - LSD-C's real training loop (lsdc.train_epoch: three views, RICAP, kNN pairs, BCE + MSE) and
    the RotNet step (four rotations per image), per view and per image.
Data content does not change speed, so random uint8 images stand in for CIFAR-10 (50,000 x 3 x 32 x 32).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import lsdc  # noqa: E402

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


def crop_flip(x):
    x = common.random_crop(x, 32, 4)
    return common.normalize(common.horizontal_flip(common.to_float(x)), MEAN, STD).contiguous(memory_format=torch.channels_last)


def simclr(x):
    x = common.random_resized_crop(common.to_float(x), 32, scale=(0.2, 1.0))
    x = common.color_jitter(x, 0.4, 0.4, 0.4, 0.4, p=0.8)
    x = common.random_grayscale(common.horizontal_flip(x), 0.2)
    return common.normalize(x, MEAN, STD).contiguous(memory_format=torch.channels_last)


def multi_crop(x):
    x = common.to_float(x)
    views = [common.random_resized_crop(x, 32, (0.6, 1.0)) for _ in range(2)]
    views += [common.random_resized_crop(x, 16, (0.1, 0.6)) for _ in range(4)]
    return [common.normalize(common.horizontal_flip(v), MEAN, STD) for v in views]


def train_step_fn(model, head, optimizer, inputs_fn, labels):
    def step():
        with common.autocast(labels.device):
            loss = F.cross_entropy(head(model(inputs_fn())).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def build(frozen_blocks, device):
    model = common.build_backbone("resnet18", shortcut="pad").to(device, memory_format=torch.channels_last)
    head = nn.Linear(512, 10).to(device)
    lsdc.freeze_blocks(model, frozen_blocks)
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    return model, head, torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--images", type=int, default=50000, help="size of the stand-in dataset")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    device = common.setup_device(args.device)
    torch.manual_seed(0)
    B = args.batch_size
    data = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, device=device)
    idx = lambda: torch.randint(0, len(data), (B,), device=device)  # noqa: E731
    labels = torch.randint(0, 10, (B,), device=device)
    premade = crop_flip(data[:max(B, 128)])[:max(B, 128)]
    bench = lambda fn, n=B: timed(fn, n, args.warmup, args.repeats, args.calls)  # noqa: E731
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "batch_size": B}

    results["aug_crop_flip"] = bench(lambda: crop_flip(data[idx()]))
    results["aug_simclr"] = bench(lambda: simclr(data[idx()]))
    results["aug_multicrop_2x32_4x16"] = bench(lambda: multi_crop(data[idx()]))

    for name, frozen in (("full", 0), ("layer4", 3)):
        model, head, opt = build(frozen, device)
        results[f"step_{name}_premade"] = bench(train_step_fn(model, head, opt, lambda: premade[:B], labels))
        results[f"step_{name}_augmented"] = bench(train_step_fn(model, head, opt, lambda: crop_flip(data[idx()]), labels))
        results[f"aug_overhead_{name}"] = 1 - results[f"step_{name}_augmented"] / results[f"step_{name}_premade"]

    model, head, _ = build(0, device)
    model.eval()
    big = crop_flip(data[:2048])
    with torch.no_grad(), common.autocast(device):
        results["inference"] = bench(lambda: model(big), 2048)

    # RotNet: 128 images -> 512 rotated views per step, full network trained
    model, head, opt = build(0, device)
    rot_labels = torch.arange(4, device=device).repeat_interleave(128)
    results["rotnet_premade_views"] = bench(train_step_fn(model, head, opt, lambda: common.rotations(premade[:128])[0], rot_labels), 512)
    results["rotnet_augmented_views"] = bench(train_step_fn(model, head, opt, lambda: common.rotations(crop_flip(data[idx()[:128]]))[0], rot_labels), 512)

    # LSD-C's own epoch loop on train+test-sized data (60,000 images), CIFAR-10 defaults
    args_lsdc = lsdc.parse_args(["--dataset", "cifar10", "--device", args.device])
    stacked = torch.cat([data, data[:len(data) // 5]])
    images = common.TensorImages("cifar10", stacked, torch.zeros(len(stacked), dtype=torch.long, device=device), 10, MEAN, STD)
    backbone = common.build_backbone("resnet18", shortcut="pad").to(device, memory_format=torch.channels_last)
    net = lsdc.LSDCNet(backbone, 10).to(device)
    lsdc.freeze_blocks(backbone, 3)
    opt = torch.optim.SGD([q for q in net.parameters() if q.requires_grad], lr=0.1, momentum=0.9, weight_decay=5e-4)
    augment, _ = lsdc.make_augment(args_lsdc, images, device)
    lsdc.train_epoch(net, net, opt, images, augment, args_lsdc, 0, device)  # warm-up (cudnn autotune)
    sync()
    rates = []
    for epoch in range(1, 4):
        t = time.perf_counter()
        _, seen, _ = lsdc.train_epoch(net, net, opt, images, augment, args_lsdc, epoch, device)
        sync()
        rates.append(seen / (time.perf_counter() - t))
    results["lsdc_images"] = statistics.median(rates)
    results["lsdc_views"] = 3 * results["lsdc_images"]
    results["lsdc_views_vs_layer4_premade"] = results["lsdc_views"] / results["step_layer4_premade"]
    if device.type == "cuda":
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30

    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:<{width}}  {v:,.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
