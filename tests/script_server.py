"""A fork server for the tests' script runs: it imports torch once (about 2.5 s with torch._dynamo,
which every optimizer's constructor imports), then forks a fresh process for each run, which runs
the script as `python SCRIPT ARGS` would: its own pid, signals, working directory, standard streams
(files), sys.argv, `__main__`, exit handlers and exit code. The tests start some 150 runs, so this
saves about six minutes of CPU time. conftest.py starts one server per test process.

Protocol: one JSON request per line on stdin, {"argv": [script, *args], "cwd", "stdout", "stderr"}
(output file paths, opened for appending); replies on stdout, "started PID" for each request in
order and "exit PID CODE" when that process ends (CODE as subprocess.Popen.returncode: -N for
signal N). The server stops when its stdin closes.

What still differs from a fresh interpreter: torch and the modules it imports are already loaded
(a script that forgets an import of a torch submodule may pass here), with torch's warning filters;
the hash seed is the server's; a traceback starts with the server's and runpy's frames. Python's,
numpy's and torch's random generators are reseeded from the OS in each run, as a fresh
interpreter's are (the scripts seed their own).
"""
import atexit
import io
import json
import os
import random
import runpy
import select
import signal
import sys
import threading
import traceback

import numpy as np
import torch  # (what every run would import)
import torch._dynamo  # noqa: F401


def stream(fd, like):
    """A text stream on `fd` made as the interpreter made `like` (encoding, errors, buffering,
    PYTHONUNBUFFERED's write-through) for the server's own pipes, which the runs' files match."""
    raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
    buffered = raw if isinstance(like.buffer, io.FileIO) else (io.BufferedReader if fd == 0
                                                               else io.BufferedWriter)(raw)
    return io.TextIOWrapper(buffered, encoding=like.encoding, errors=like.errors,
                            line_buffering=like.line_buffering, write_through=like.write_through)


def run(request, replies):
    """In the forked child: become `python SCRIPT ARGS` and exit as it would. Never returns."""
    code = 1
    try:
        replies.close()
        os.chdir(request["cwd"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND),
                                (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin, sys.stdout, sys.stderr = (stream(0, sys.__stdin__), stream(1, sys.__stdout__),
                                             stream(2, sys.__stderr__))
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
        random.seed()
        np.random.seed()
        torch.seed()
        script = os.path.abspath(request["argv"][0])
        sys.argv = [request["argv"][0], *request["argv"][1:]]
        sys.path[0] = os.path.dirname(script)
        if not os.path.isfile(script):
            print(f"{sys.executable}: can't open file {script!r}: [Errno 2] No such file or directory",
                  file=sys.stderr)
            code = 2
            return
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
    except BaseException:  # the server's own failure, in the run's stderr once it is set
        traceback.print_exc()
    finally:
        for out in (sys.stdout, sys.stderr):
            try:
                out.flush()
            except (OSError, ValueError):  # closed by the script: the interpreter says nothing either
                pass
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
