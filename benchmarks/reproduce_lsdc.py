"""Run an LSD-C pipeline (RotNet + LSD-C) and record its result, wall-clock and hardware.

    python benchmarks/reproduce_lsdc.py --run-dir runs/repro-cifar10 -- --dataset cifar10 --labeling knn
    python benchmarks/reproduce_lsdc.py --run-dir runs/repro-mnist -- --dataset mnist --device cpu

Everything after `--` goes to lsdc.py. When the run directory already holds a checkpoint the run is
resumed instead, so a pipeline longer than one session (or one time slot) is finished by calling the
same command again; `--time-limit S` stops this session's part after S seconds (exit code 3: call
again). Each session's wall-clock is appended to <run-dir>/sessions.json. When the run ends, the
summary (final metrics, per-stage training time from metrics.jsonl, total wall-clock, device, torch
version, command) is written to <run-dir>/reproduction.json and printed as a results-table row.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--time-limit", type=float, help="seconds after which this session stops (resumable)")
    p.add_argument("lsdc_args", nargs=argparse.REMAINDER, help="arguments for lsdc.py, after --")
    args = p.parse_args()
    lsdc_args = [a for a in args.lsdc_args if a != "--"]
    resuming = os.path.isfile(os.path.join(args.run_dir, "checkpoint.pt"))
    command = ["--resume", args.run_dir] if resuming else [*lsdc_args, "--out-dir", args.run_dir]
    start = time.time()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "lsdc.py"), *command])
    try:
        code = proc.wait(timeout=args.time_limit)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait()
        code = None
    elapsed = time.time() - start
    os.makedirs(args.run_dir, exist_ok=True)  # a session cut before lsdc.py made the run directory
    sessions_path = os.path.join(args.run_dir, "sessions.json")
    sessions = json.load(open(sessions_path)) if os.path.exists(sessions_path) else []
    sessions.append({"command": command, "seconds": elapsed, "exit_code": code})
    with open(sessions_path, "w") as f:
        json.dump(sessions, f, indent=2)
    if code is None:
        print(f"stopped after {elapsed:.0f} s; run the same command again to continue", flush=True)
        sys.exit(3)
    if code != 0:
        sys.exit(code)

    final = json.load(open(os.path.join(args.run_dir, "final.json")))
    saved = json.load(open(os.path.join(args.run_dir, "args.json")))
    stage_seconds, rotation_acc = {}, None
    with open(os.path.join(args.run_dir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            images = m.get("images_per_s")
            stage_seconds.setdefault(m["stage"], {"epochs": 0, "train_images_per_s": []})
            stage_seconds[m["stage"]]["epochs"] += 1
            stage_seconds[m["stage"]]["train_images_per_s"].append(images)
            rotation_acc = m.get("test_rotation_acc", rotation_acc)
    summary = {
        "dataset": saved["dataset"], "labeling": saved["labeling"], "command": "python lsdc.py " + " ".join(lsdc_args),
        "acc": final.get("acc"), "nmi": final.get("nmi"), "ari": final.get("ari"), "test_acc": final.get("test_acc"),
        "confident_acc": final.get("confident_acc"), "confident_share": final.get("confident_share"),
        "median_confidence": final.get("median_confidence"),
        "rotnet_test_rotation_acc": rotation_acc, "rotnet_checkpoint": final.get("rotnet_checkpoint"),
        "wall_clock_seconds": sum(s["seconds"] for s in sessions), "sessions": len(sessions),
        "stages": {k: {"epochs": v["epochs"], "median_train_images_per_s": sorted(v["train_images_per_s"])[len(v["train_images_per_s"]) // 2]}
                   for k, v in stage_seconds.items()},
        "device": (torch.cuda.get_device_name() if torch.cuda.is_available() and saved["device"] != "cpu" else
                   f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})"),
        "torch": torch.__version__,
    }
    with open(os.path.join(args.run_dir, "reproduction.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    minutes = summary["wall_clock_seconds"] / 60
    if summary["acc"] is None:  # --rotnet-only: the pre-trained weights are the result
        print(f"| RotNet | {summary['dataset']} | test rotation accuracy {rotation_acc:.3f} | {minutes:.1f} min | "
              f"{summary['device']} | weights: {summary['rotnet_checkpoint']} |")
    else:
        print(f"| LSD-C ({summary['labeling']}) | {summary['dataset']} | ACC {summary['acc']:.3f} NMI {summary['nmi']:.3f} "
              f"ARI {summary['ari']:.3f} | {minutes:.1f} min | {summary['device']} |")


if __name__ == "__main__":
    main()
