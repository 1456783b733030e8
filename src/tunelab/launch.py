"""`tunelab train --nproc N`: re-run the same command under torchrun on this machine."""

from __future__ import annotations

import subprocess
import sys


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(nproc: int, argv: list[str]) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tunelab", *_without_nproc(argv)]
    return subprocess.call(cmd)
