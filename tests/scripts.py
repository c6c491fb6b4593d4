"""Helpers for the end-to-end tests: run a method script as a user would, read its run directory."""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, args, cwd, timeout=600):
    """`python <script> <args>` in `cwd`; returns the CompletedProcess (exit code, stdout, stderr)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def run_until(script, args, cwd, run_dir, stage, epoch, timeout=600):
    """Start the script and kill it (SIGKILL) once metrics.jsonl holds the line of (stage, epoch)."""
    with open(os.path.join(cwd, "log.txt"), "a") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, stdout=log, stderr=log)
        deadline, path = time.time() + timeout, os.path.join(run_dir, "metrics.jsonl")
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(path) and (stage, epoch) in {(m["stage"], m["epoch"]) for m in read_metrics(run_dir)}:
                break
            time.sleep(0.05)
        proc.kill()
        proc.wait()


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
