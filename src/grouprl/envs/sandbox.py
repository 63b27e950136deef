"""A sandboxed Python-execution tool for code tasks: a subprocess with limits, no network.

Layers, each of which alone stops the common case:
- its own process (group), killed at the deadline (`timeout`), with resource limits: CPU
  seconds, address space (`memory_mb`), size of any file written, number of open files;
- a working folder of its own (a new temporary one per call unless `workdir` is given);
- inside the child, before the code runs, an audit hook (PEP 578; hooks cannot be removed)
  that refuses sockets, new processes (subprocess, os.system, exec, fork, spawn), ctypes,
  and opening a file for writing (or removing, renaming, creating folders) outside the
  working folder;
- on Linux, where the caller may (root, or unprivileged user namespaces), a network
  namespace of its own with no interface but loopback (unshare(2)).

It is a guard against a model's accidents (a runaway loop, a stray write, a download), not
a security boundary against a hostile program: run untrusted code at scale in a container.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from grouprl.envs.tools import Tool

_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000

# Runs in the child before the user's code (read from stdin after this prelude).
_PRELUDE = r"""
import os, sys
_root = os.path.realpath(os.getcwd())
_BLOCK = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
          "os.fork", "os.forkpty", "ctypes.", "_posixsubprocess.", "pty.", "os.kill",
          "signal.pthread_kill", "sys.addaudithook", "webbrowser.")
_PATHS = ("os.remove", "os.unlink", "os.rmdir", "os.mkdir", "os.rename", "os.replace",
          "os.truncate", "os.chmod", "os.chown", "os.link", "os.symlink", "shutil.")
def _inside(p):
    try:
        p = os.fsdecode(p) if not isinstance(p, int) else None
    except Exception:
        return False
    if p is None:
        return True
    p = os.path.realpath(p)
    return p == _root or p.startswith(_root + os.sep)
def _hook(event, args):
    if event.startswith(_BLOCK) and event != "socket.gethostname":
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        writes = (mode and any(c in str(mode) for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        if writes and not _inside(path):
            raise PermissionError(f"sandbox: writing {path} (outside the sandbox folder) is not allowed")
    elif event.startswith(_PATHS):
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                raise PermissionError(f"sandbox: {event} on {a} is not allowed")
_code = sys.stdin.read()
sys.addaudithook(_hook)
del _hook
exec(compile(_code, "<sandbox>", "exec"), {"__name__": "__main__"})
"""


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def text(self, limit: int = 2000) -> str:
        """What the model reads: the output, or the error and why it stopped."""
        if self.timed_out:
            out = f"{self.stdout}\nError: killed at the time limit".strip()
        elif self.returncode != 0:
            lines = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
            tail = lines[-1] if lines else f"exit code {self.returncode}"
            if self.returncode is not None and self.returncode < 0:
                tail = f"killed by {signal.Signals(-self.returncode).name} ({tail})"
            out = f"{self.stdout}\nError: {tail}".strip()
        else:
            out = self.stdout.strip()
        return out if len(out) <= limit else out[:limit] + " ...(truncated)"


def _limits(cpu_s: int, memory_mb: int, file_mb: int) -> None:
    """In the child, before exec: its own session, resource limits, no network if we may."""
    os.setsid()
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    mem = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb * 2**20, file_mb * 2**20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(_CLONE_NEWNET) != 0:
                libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
        except Exception:  # the audit hook still refuses sockets
            pass


def run_python(
    code: str,
    *,
    timeout: float = 5.0,
    memory_mb: int = 512,
    file_mb: int = 16,
    workdir: str | Path | None = None,
) -> SandboxResult:
    """Run `code` in a sandboxed Python subprocess (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="grouprl-sandbox-") as tmp:
        cwd = Path(workdir) if workdir is not None else Path(tmp)
        cpu = max(1, int(timeout) + 1)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _PRELUDE],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            preexec_fn=lambda: _limits(cpu, memory_mb, file_mb),  # noqa: PLW1509
        )
        try:
            out, err = proc.communicate(code, timeout=timeout)
            return SandboxResult(out, err, proc.returncode)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return SandboxResult(out, err, proc.returncode, timed_out=True)


def python_tool(*, timeout: float = 5.0, memory_mb: int = 512) -> Tool:
    """The `python` tool: runs the model's code in `run_python` and returns what it printed."""

    def python(code: str) -> str:
        """Run Python code in a sandbox and return what it printed.

        Args:
            code: A Python program; print the values you need.
        """
        return run_python(code, timeout=timeout, memory_mb=memory_mb).text()

    from grouprl.envs.tools import as_tool

    # the subprocess has its own deadline; the thread's is a backstop
    return as_tool(python, timeout=timeout + 5.0)
