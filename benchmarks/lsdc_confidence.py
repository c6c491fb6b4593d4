"""How confident is a trained LSD-C head, and how steady is the share of samples above 0.9?

    python benchmarks/lsdc_confidence.py --run runs/lsdc__cifar10__0__... [-- --data-dir DIR]

Evaluates the run's checkpoint as lsdc.py does (eval mode, the clustered data in order) and prints
one JSON line: quantiles of the max probability, the share of samples above several thresholds, and
the share above 0.9 (LSD-C's confident samples, supplementary Fig. 1b) when the logits are scaled by
0.9, 1.1 and 1.2. When that share moves a lot under a 10 % change of the logits' scale, most samples
sit just below the threshold and the share is a noisy reading from one epoch to the next.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import lsdc  # noqa: E402

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
LOGIT_SCALES = (0.9, 1.1, 1.2)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True,
                   help="an lsdc.py run directory whose checkpoint is in the LSD-C stage")
    p.add_argument("lsdc_args", nargs=argparse.REMAINDER,
                   help="lsdc.py flags that override the run's, after --")
    a = p.parse_args()
    args = lsdc.parse_args(["--resume", a.run, *[f for f in a.lsdc_args if f != "--"]])
    device = common.setup_device(args.device)
    data, _, _, backbone = lsdc.load_data_and_backbone(args, device)
    model = lsdc.LSDCNet(backbone, args.num_clusters, args.head).to(device)
    state = torch.load(os.path.join(a.run, "checkpoint.pt"), map_location=device, weights_only=False)
    if state["stage"] != "lsdc":
        raise common.Abort(f"{a.run} has not reached the LSD-C stage (checkpoint stage {state['stage']!r})")
    model.load_state_dict(state["objects"]["model"])
    _, prepare = lsdc.make_transforms(args, data, device)
    logits, _ = common.extract_features(model, data, prepare, args.eval_batch_size, args.amp)
    top = logits.softmax(1).max(1).values
    top_scaled = {s: (logits * s).softmax(1).max(1).values for s in LOGIT_SCALES}
    quantiles = top.quantile(torch.tensor(QUANTILES, device=top.device))
    print(json.dumps({
        "weights": a.run, "dataset": args.dataset, "epoch": state["epoch"], "samples": len(top),
        "max_probability_quantiles": dict(zip(map(str, QUANTILES), quantiles.tolist())),
        "share_above": {str(t): (top > t).float().mean().item() for t in THRESHOLDS},
        "share_above_0.9_logits_scaled": {str(s): (v > 0.9).float().mean().item()
                                          for s, v in top_scaled.items()},
    }))


if __name__ == "__main__":
    common.run_main(main)
