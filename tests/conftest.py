"""Fixtures and helpers shared by the tests: run a method script as a user would, read its run
directory, stop it on purpose."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ.get("DATA_DIR")
needs_data = pytest.mark.skipif(not DATA_DIR, reason="DATA_DIR is not set: real datasets are not available")
# One thread per run: the CPU tests are faster and comparable whatever else runs (results depend on
# the thread count, so every run a test compares uses the same one).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
torch.set_num_threads(1)  # and the tests that compute here: two workers on two cores only contend with more
TIMING = ("images_per_s", "train_seconds", "cluster_seconds")  # metric keys that measure time, not results


def script_path(script):
    return os.path.join(ROOT, script)


def run_script(script, args, cwd, timeout=600):
    """`python <script> <args>` in `cwd`; returns the CompletedProcess (exit code, stdout, stderr)."""
    return subprocess.run([sys.executable, script_path(script), *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def start_script(script, args, cwd, log="log.txt"):
    """Start `python <script> <args>` in the background, its output appended to `cwd/log`."""
    out = open(os.path.join(cwd, log), "a")
    return subprocess.Popen([sys.executable, script_path(script), *map(str, args)], cwd=cwd, env=ENV,
                            stdout=out, stderr=out)


def wait_for_line(proc, run_dir, stage, epoch, timeout=600):
    """Wait until metrics.jsonl holds the line of (stage, epoch) or the process ends."""
    deadline, path = time.time() + timeout, os.path.join(run_dir, "metrics.jsonl")
    while time.time() < deadline and proc.poll() is None:
        if (os.path.exists(path)
                and (stage, epoch) in {(m["stage"], m["epoch"]) for m in read_metrics(run_dir)}):
            return
        time.sleep(0.05)


def run_until(script, args, cwd, run_dir, stage, epoch, sig=signal.SIGKILL, timeout=600):
    """Start the script, send `sig` (default: kill -9) once metrics.jsonl holds the line of
    (stage, epoch), and return the exit code."""
    proc = start_script(script, args, cwd)
    wait_for_line(proc, run_dir, stage, epoch, timeout)
    while proc.poll() is None and not os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        time.sleep(0.01)  # the epoch's checkpoint follows its line
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_metrics(run_dir):
    """The lines of metrics.jsonl (a line being written is skipped)."""
    lines = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
    return lines


def results(run_dir):
    """A run's metric lines without timings, and its final.json: what two runs must share to be the
    same run."""
    lines = [{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(run_dir)]
    return lines, read_json(os.path.join(run_dir, "final.json"))


def one_line_error(stderr):
    """A user error as the scripts print it: exactly one line, no traceback, no usage block."""
    return stderr.count("\n") == 1 and "Traceback" not in stderr and "usage:" not in stderr


def spawn_gloo(target, args, world=2):
    """Run `target(rank, world, port, *args, queue)` in `world` spawned processes (each joins a gloo
    group on a free local port) and return what they put on the queue, one item each, sorted."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=120) for _ in procs), key=lambda item: item[0])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results
