"""Run a method script to the end, over as many sessions as it takes, and summarise its result with
wall-clock and hardware.

    python benchmarks/reproduce.py SCRIPT --run-dir DIR -- FLAGS...
    python benchmarks/reproduce.py lsdc.py --run-dir runs/repro-cifar10 -- --dataset cifar10 --compile
    python benchmarks/reproduce.py deepcluster.py --run-dir runs/repro-fmnist -- --dataset fashion-mnist

SCRIPT is a method file of the repository (lsdc.py, deepcluster.py, ...); FLAGS go to it. The first
call runs `SCRIPT FLAGS --out-dir DIR`. When DIR already holds a checkpoint, the same command
resumes it instead (`SCRIPT --resume DIR FLAGS`: the script's resume policy applies, so repeated
flags change nothing, a longer schedule extends the run, and a flag that cannot change on resume is
refused naming it), so a run longer than one session is finished by calling the same command
again. The time limit is the script's own `--time-limit MIN`: when the script stops
there (exit code 3, resumable) this prints how to continue and exits with 3. Each session's command,
seconds and exit code are appended to DIR/sessions.json.

When the run has ended, DIR/reproduction.json gets the summary: the final metrics found in
final.json (ACC, NMI, ARI, kNN and linear-probe accuracy, top-1, their test_ variants, the Initial
Alignment), epochs and median training throughput per stage from metrics.jsonl (the log holds no
per-epoch seconds), the wall-clock summed over sessions, the device, core count and torch version,
and the command that started the run; it is printed as a row of a markdown results table. A
finished run whose settings FLAGS do not change is summarised again without running anything.
"""
import glob
import importlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

# final.json keys that are results, in table order; each may also come as test_<key> (the test split)
METRICS = ("acc", "nmi", "ari", "nmi_gt", "knn_acc", "knn_top1", "probe_test_acc", "top1")


def method_scripts():
    """The method files of the repository: the top-level scripts with a `train_one_epoch`."""
    scripts = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        with open(path) as f:
            if "\ndef train_one_epoch(" in f.read():
                scripts.append(os.path.basename(path))
    return scripts


def parse_args(argv):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                              usage="%(prog)s SCRIPT --run-dir DIR [-- FLAGS ...]")
    p.add_argument("script", metavar="SCRIPT", help="the method file to run: " + ", ".join(method_scripts()))
    p.add_argument("--run-dir", required=True, metavar="DIR",
                   help="the run directory (the script's --out-dir)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.flags = argv[split + 1:]
    scripts = method_scripts()
    if args.script not in scripts:
        p.error(f"{args.script} is not a method script of {ROOT}; choose one of {', '.join(scripts)}")
    for flag in ("--out-dir", "--resume"):
        if any(f == flag or f.startswith(flag + "=") for f in args.flags):
            p.error(f"{flag} is set by reproduce.py from --run-dir; leave it out of the flags")
    return p, args


def resume_changes(script, run_dir, flags):
    """The saved settings that FLAGS would change on --resume, as the script itself decides (a flag
    its resume policy refuses stops here with the script's one-line message, exit code 2)."""
    module = importlib.import_module(script[:-3])
    return module.parse_args(["--resume", run_dir, *flags]).resume_changes


def run_session(command, run_dir):
    """Run `command` to its end and append (command, seconds, exit code) to sessions.json, when the
    script made the run directory. SIGTERM and SIGUSR1 are passed on (the script checkpoints and
    exits with 3); Ctrl-C reaches the script from the terminal, and this waits for its exit."""
    start = time.time()
    proc = subprocess.Popen(command)
    forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    code = proc.wait()
    seconds = time.time() - start
    if os.path.isdir(run_dir):
        sessions = read_json(os.path.join(run_dir, "sessions.json"), [])
        sessions.append({"command": command_text(command[1:]), "seconds": seconds, "exit_code": code})
        write_json(sessions, os.path.join(run_dir, "sessions.json"))
    return code


def stages(run_dir):
    """Per stage of metrics.jsonl: epochs logged, the median training throughput (images/s) and the
    training time summed over its epochs (seconds; evaluation not included)."""
    rates, seconds = {}, {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            rates.setdefault(m["stage"], []).append(m["images_per_s"])
            seconds[m["stage"]] = seconds.get(m["stage"], 0.0) + m.get("train_seconds", 0.0)
    return {stage: {"epochs": len(r), "median_images_per_s": statistics.median(r),
                    "train_seconds": seconds[stage]} for stage, r in rates.items()}


def final_metrics(final):
    """The results of final.json: the METRICS and their test_ variants, and the Initial Alignment's
    median and quartiles per (k, PCA) entry."""
    found = {key: final[key] for key in (p + name for p in ("", "test_") for name in METRICS) if key in final}
    for name, ia in final.get("initial_alignment", {}).items():
        found.update({f"ia_{name}_{q}": ia[q] for q in ("median", "q1", "q3")})
    return found


def hardware(device):
    """The device the run used (GPU name, or the CPU model), the core count and torch's version."""
    if device != "cpu" and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
            name = models[0] if models else name
    return {"device": name, "cores": os.cpu_count(), "torch": torch.__version__}


def summarise(script, run_dir):
    saved = read_json(os.path.join(run_dir, "args.json"), {})
    sessions = read_json(os.path.join(run_dir, "sessions.json"), [])
    summary = {
        "script": script, "dataset": saved.get("dataset"),
        "command": sessions[0]["command"] if sessions else None,  # the one that started the run
        "metrics": final_metrics(read_json(os.path.join(run_dir, "final.json"))),
        "stages": stages(run_dir) if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else {},
        "wall_clock_seconds": sum(s["seconds"] for s in sessions), "sessions": len(sessions),
        **hardware(saved.get("device") or "cuda"),
    }
    write_json(summary, os.path.join(run_dir, "reproduction.json"))
    return summary


def table_row(summary):
    """| script | dataset | metrics | wall-clock | hardware | command |"""
    metrics = " ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items()) or "no metric in final.json"
    minutes = summary["wall_clock_seconds"] / 60
    return (f"| {summary['script']} | {summary['dataset']} | {metrics} | {minutes:.1f} min "
            f"({summary['sessions']} sessions) | {summary['device']}, {summary['cores']} cores, torch "
            f"{summary['torch']} | `{summary['command']}` |")


def command_text(argv):
    return "python " + " ".join([os.path.relpath(argv[0], ROOT), *argv[1:]])


def read_json(path, default=None):
    if default is not None and not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def main(argv=None):
    p, args = parse_args(argv)
    run_dir, script = args.run_dir, os.path.join(ROOT, args.script)
    finished = os.path.exists(os.path.join(run_dir, "final.json"))
    if not finished or resume_changes(args.script, run_dir, args.flags):
        if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
            argv = [script, "--resume", run_dir, *args.flags]
        else:  # a new run, or one that stopped before its first checkpoint: started (again)
            argv = [script, *args.flags, "--out-dir", run_dir]
        code = run_session([sys.executable, *argv], run_dir)
        if code == common.EXIT_STOPPED:
            print("reproduce.py: the run stopped with a checkpoint; run the same command again to continue",
                  flush=True)
        if code != 0:
            sys.exit(code if code > 0 else 128 - code)  # killed by signal -code: the shell's status
    summary = summarise(args.script, run_dir)
    print(json.dumps(summary, indent=2))
    print(table_row(summary))


if __name__ == "__main__":
    main()
