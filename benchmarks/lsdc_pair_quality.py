"""How right are LSD-C's pairwise pseudo-labels for given weights? Reads them without training.

    python benchmarks/lsdc_pair_quality.py --rotnet runs/rotnet/rotnet__cifar10__...pt -- --dataset cifar10
    python benchmarks/lsdc_pair_quality.py --run runs/lsdc__cifar10__0__...

One pass over the data as an LSD-C epoch sees it (the clean view augmented, BatchNorm in training
mode, batches of --batch-size in the epoch-0 order) computes the kNN / cosine / SNE links of lsdc.py
from each batch's features and scores them against the ground truth: `positive_pairs` (share of
pairs linked), `pair_precision` (share of off-diagonal links that join same-class samples) and
`pair_recall` (share of same-class pairs that are linked), the values lsdc.py logs every epoch.
`--rotnet` reads the links LSD-C starts from (the weights of a RotNet, with flags for lsdc.py after
`--`); `--run` those of an lsdc.py run's checkpoint, with the run's own settings.
`--bf16-agreement` also computes each batch's links from features in float32 and under bf16
autocast (lsdc.py's default on CUDA; the released code runs float32) and reports how many agree
(`bf16_link_agreement`: shared links over links of either, off the diagonal).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import lsdc  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--rotnet", help="RotNet backbone weights (as kept in runs/rotnet/)")
    weights.add_argument("--run", help="an lsdc.py run directory whose checkpoint is in the LSD-C stage")
    p.add_argument("--bf16-agreement", action="store_true",
                   help="compare the links of float32 and bf16 features")
    p.add_argument("lsdc_args", nargs=argparse.REMAINDER, help="lsdc.py flags, after -- (with --rotnet)")
    a = p.parse_args()
    flags = [f for f in a.lsdc_args if f != "--"]
    args = lsdc.parse_args(["--resume", a.run, *flags] if a.run else flags)
    device = common.setup_device(args.device)
    common.seed_everything(args.seed)
    if a.rotnet and args.dataset == "reuters10k":
        raise common.Abort("reuters10k has no RotNet stage: read an lsdc.py run with --run")
    data, _, _, backbone = lsdc.load_data_and_backbone(args, device)
    model = lsdc.LSDCNet(backbone, args.num_clusters, args.head).to(device)
    if a.run:
        state = torch.load(os.path.join(a.run, "checkpoint.pt"), map_location=device, weights_only=False)
        if state["stage"] != "lsdc":
            raise common.Abort(f"{a.run} has not reached the LSD-C stage "
                               f"(checkpoint stage {state['stage']!r})")
        model.load_state_dict(state["objects"]["model"])
    else:
        backbone.load_state_dict(torch.load(a.rotnet, map_location=device, weights_only=True))
    augment, _ = lsdc.make_transforms(args, data, device)

    trained_in_bf16 = args.amp and device.type == "cuda"  # which of the two link sets lsdc.py uses
    model.train()  # BatchNorm as in training; its running statistics change but are not saved
    meter = common.Meter()
    with torch.no_grad():
        for _, images, labels in common.EpochBatches(data, args.batch_size, args.seed, 0):
            x = augment(images)
            with common.autocast(device, args.amp):  # as lsdc.py trains
                s = lsdc.pairwise_labels(backbone(x), args)
            precision, recall = lsdc.pair_label_quality(s, labels)
            meter.add(positive_pairs=s.mean(), pair_precision=precision, pair_recall=recall)
            if a.bf16_agreement:  # the links above are one of the two; compute only the other
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not trained_in_bf16):
                    other = lsdc.pairwise_labels(backbone(x), args)
                s_bf16, s_fp32 = (s, other) if trained_in_bf16 else (other, s)
                off_diagonal = 1.0 - torch.eye(len(x), device=x.device)
                shared, either = s_bf16 * s_fp32 * off_diagonal, torch.maximum(s_bf16, s_fp32) * off_diagonal
                meter.add(bf16_link_agreement=shared.sum() / either.sum().clamp(min=1))
    print(json.dumps({"weights": a.run or a.rotnet, "dataset": args.dataset, "labeling": args.labeling,
                      "batch_size": args.batch_size, "amp": trained_in_bf16, **meter.averages()}))


if __name__ == "__main__":
    common.run_main(main)
