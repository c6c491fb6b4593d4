"""A fork server for the tests' script runs: it imports torch once (about 2.5 s with torch._dynamo,
which every optimizer's constructor imports), then forks a fresh process for each run, which runs
the script as `python SCRIPT ARGS` would: its own pid, signals, working directory, standard streams
(files), sys.argv, `__main__`, exit handlers and exit code. The tests start some 150 runs, so this
saves about six minutes of CPU time. conftest.py starts one server per test process.

Protocol: one JSON request per line on stdin, {"argv": [script, *args], "cwd", "stdout", "stderr"}
(output file paths, opened for appending); replies on stdout, "started PID" for each request in
order and "exit PID CODE" when that process ends (CODE as subprocess.Popen.returncode: -N for
signal N). The server stops when its stdin closes.
"""
import atexit
import json
import os
import runpy
import select
import signal
import sys
import threading
import traceback

import torch  # noqa: F401  (what every run would import)
import torch._dynamo  # noqa: F401


def run(request, replies):
    """In the forked child: become `python SCRIPT ARGS` and exit as it would. Never returns."""
    code = 1
    try:
        replies.close()
        os.chdir(request["cwd"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
        # standard streams as the interpreter makes them for files: stdout block-buffered, stderr
        # line-buffered with backslashreplace
        sys.stdin = sys.__stdin__ = open(0, closefd=False)
        sys.stdout = sys.__stdout__ = open(1, "w", closefd=False)
        sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
        script = os.path.abspath(request["argv"][0])
        sys.argv = [request["argv"][0], *request["argv"][1:]]
        sys.path[0] = os.path.dirname(script)
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
        except KeyboardInterrupt:  # the interpreter prints it and dies of SIGINT
            traceback.print_exc()
            code = -signal.SIGINT
        except BaseException:
            traceback.print_exc()
        threading._shutdown()  # as at interpreter exit: wait for non-daemon threads, then atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # the server's own failure, in the run's stderr once it is set
        traceback.print_exc()
    finally:
        if code == -signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


def main():
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    pending = b""
    while True:
        if select.select([0], [], [], 0.02)[0]:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                return  # the tests have ended
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    run(request, replies)
                replies.write(f"started {pid}\n")
        while True:  # reap the runs that ended
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            replies.write(f"exit {pid} {os.waitstatus_to_exitcode(status)}\n")


if __name__ == "__main__":
    main()
