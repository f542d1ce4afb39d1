"""Helpers of the multi-process tests (torchrun subprocesses, gloo process groups) and of the
tests that run train.py."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's master)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """The environment of a child process: this checkout's sources first, no Hub, one thread."""
    return dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def check_completed(proc: subprocess.CompletedProcess) -> None:
    """Fail with the tail of the child's output when it exited non-zero."""
    if proc.returncode != 0:
        raise AssertionError(f"failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")


def train_script() -> ModuleType:
    """``train.py`` as a module: ``train_script().main(argv)`` trains in this process, as ``python
    train.py ARGV`` would, without a new interpreter's imports (~5 s of CPU for torch, timm, torchvision)."""
    spec = importlib.util.spec_from_file_location("fz_train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
