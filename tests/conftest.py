"""Fixtures and helpers shared by the tests: run a method script as a user would, read its run
directory, stop it on purpose."""
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
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


class ScriptServer:
    """The client of script_server.py: one server per test process, started when a test first runs a
    script, stopped with the test process."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "script_server.py")],
                                     cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.pending, self.started, self.exits = b"", [], {}

    def read(self, timeout):
        """Take the server's replies that arrive within `timeout` seconds."""
        if select.select([self.proc.stdout], [], [], timeout)[0]:
            chunk = self.proc.stdout.read()
            if chunk == b"":
                raise RuntimeError(f"the script server ended (exit code {self.proc.poll()})")
            self.pending += chunk or b""
        while b"\n" in self.pending:
            line, self.pending = self.pending.split(b"\n", 1)
            kind, *numbers = line.decode().split()
            if kind == "started":
                self.started.append(int(numbers[0]))
            else:
                self.exits[int(numbers[0])] = int(numbers[1])

    def start(self, argv, cwd, stdout, stderr):
        request = dict(argv=[str(a) for a in argv], cwd=str(cwd), stdout=str(stdout), stderr=str(stderr))
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        while not self.started:
            self.read(1.0)
        return ScriptProcess(self, self.started.pop(0))


class ScriptProcess:
    """The part of subprocess.Popen the tests use, for a run forked by the script server."""

    def __init__(self, server, pid):
        self.server, self.pid, self.returncode = server, pid, None

    def poll(self):
        if self.returncode is None:
            self.server.read(0)
            self.returncode = self.server.exits.pop(self.pid, None)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired(self.pid, timeout)
            self.server.read(0.02)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)


_server = None


def start_python(argv, cwd, stdout, stderr):
    """`python *argv` in `cwd`, its output appended to the files `stdout` and `stderr`: a fresh
    process forked by the script server (see script_server.py)."""
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = ScriptServer()
    return _server.start(argv, cwd, stdout, stderr)


def run_python(argv, cwd, timeout=600):
    """`python *argv` in `cwd` to its end; returns a CompletedProcess with its exit code and its
    output as text (universal newlines, as subprocess.run(text=True) gives it)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = start_python(argv, cwd, out, err)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        text = [open(path, encoding="utf-8", errors="backslashreplace").read() if os.path.exists(path) else ""
                for path in (out, err)]
    return subprocess.CompletedProcess([sys.executable, *argv], proc.returncode, *text)


def run_script(script, args, cwd, timeout=600):
    """`python <script> <args>` in `cwd`; returns the CompletedProcess (exit code, stdout, stderr)."""
    return run_python([script_path(script), *args], cwd, timeout)


def start_script(script, args, cwd, log="log.txt"):
    """Start `python <script> <args>` in the background, its output appended to `cwd/log`."""
    log = os.path.join(cwd, log)
    open(log, "a").close()
    return start_python([script_path(script), *args], cwd, log, log)


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
