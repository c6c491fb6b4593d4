"""The Deep Dive's Fashion-MNIST experiments with deepcluster.py: the Initial Alignment distribution for
k = 5 (paper, Sec. 4.1.2 and Fig. 3a: IA between 0.37 and 0.41 over 100 random networks) and the
DeepCluster run with the paper's settings (LeNet-5, 50 cycles, k 5, no PCA, linear probe on Conv-2).

    python benchmarks/deepcluster_fmnist.py --data-dir DIR --out-dir runs/fmnist [--ia-seeds 100] [--device cpu]

Both fit on a CPU (a 2-core VM: about 1 s per IA seed, about 8 s per training cycle). It runs, in turn:
    python deepcluster.py --dataset fashion-mnist --ia-seeds N --out-dir OUT/ia
    python deepcluster.py --dataset fashion-mnist --out-dir OUT/train
and prints the IA summary and the final metrics (--skip-ia / --skip-train leave one out; an existing
run directory is reported, not redone).
"""
import argparse
import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deepcluster.py")


def run(out, extra, args):
    if not os.path.exists(os.path.join(out, "final.json")):
        command = [sys.executable, SCRIPT, "--dataset", "fashion-mnist", "--data-dir", args.data_dir,
                   "--out-dir", out, *(["--device", args.device] if args.device else []), *extra]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
    with open(os.path.join(out, "final.json")) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "./data"))
    p.add_argument("--out-dir", default="runs/deepcluster-fmnist")
    p.add_argument("--device")
    p.add_argument("--ia-seeds", type=int, default=100, help="the paper samples 100 random networks")
    p.add_argument("--skip-ia", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args()
    summary = {}
    if not args.skip_ia:
        ia = run(os.path.join(args.out_dir, "ia"), ["--ia-seeds", str(args.ia_seeds)], args)
        summary["initial_alignment_k5"] = {k: v for k, v in ia["initial_alignment"]["k5_pca0"].items() if k != "values"}
        summary["initial_alignment_k5"]["seeds"] = len(ia["seeds"])
    if not args.skip_train:
        summary["train"] = run(os.path.join(args.out_dir, "train"), [], args)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
