"""`tunelab train --nproc N [--nnodes M ...]`: run the same command as N processes on this machine, under torch's own
launcher, and with --nnodes as one of M machines that meet at a rendezvous.

Equivalent to `torchrun --standalone --nproc_per_node N -m tunelab train ...` (one machine), or torchrun's
`--nnodes/--node_rank/--master_addr/--master_port` (static: each machine says its rank) or `--rdzv_endpoint`
(c10d: the machines are numbered as they arrive). The elastic agent runs in this process, so a rank that fails with
a clear message gives a clean exit code here instead of torchrun's traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab import run_files
from tunelab.config import UserError

# The launcher's own flags: the ranks it starts get the command line without them.
LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--rdzv-endpoint")
DEFAULT_PORT = 29500  # torchrun's


@dataclass
class Nodes:
    """Where this machine stands among several (`tunelab train --nnodes ...`)."""
    count: int = 1
    rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None

    def check(self) -> None:
        if self.count < 1:
            raise UserError(f"--nnodes {self.count}: at least 1")
        given = [f for f, v in (("--node-rank", self.rank), ("--master-addr", self.master_addr),
                                ("--master-port", self.master_port), ("--rdzv-endpoint", self.rdzv_endpoint))
                 if v is not None]
        if self.count == 1:
            if given:
                raise UserError(f"{given[0]} is for several machines: add --nnodes N")
            return
        if self.rdzv_endpoint is not None:
            if self.master_addr is not None or self.master_port is not None:
                raise UserError("--rdzv-endpoint or --master-addr/--master-port, not both")
            if ":" not in self.rdzv_endpoint:
                raise UserError(f"--rdzv-endpoint {self.rdzv_endpoint}: write it as HOST:PORT")
            return
        if self.master_addr is None or self.rank is None:
            raise UserError(f"--nnodes {self.count}: give --node-rank and --master-addr (this machine's number, "
                            "and the address of node 0), or --rdzv-endpoint HOST:PORT")
        if not 0 <= self.rank < self.count:
            raise UserError(f"--node-rank {self.rank}: between 0 and {self.count - 1} for --nnodes {self.count}")

    def torchrun_args(self) -> list[str]:
        if self.count == 1:
            return ["--standalone"]
        if self.rdzv_endpoint is not None:
            return [f"--nnodes={self.count}", "--rdzv_backend=c10d", f"--rdzv_endpoint={self.rdzv_endpoint}"]
        return [f"--nnodes={self.count}", f"--node_rank={self.rank}", f"--master_addr={self.master_addr}",
                f"--master_port={self.master_port or DEFAULT_PORT}"]


def without_launch_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            out.append(arg)
    return out


def torchrun_args(nproc: int, argv: list[str], nodes: Nodes | None = None) -> list[str]:
    return [*(nodes or Nodes()).torchrun_args(), f"--nproc_per_node={nproc}", "-m", "tunelab",
            *without_launch_flags(argv)]


def launch(nproc: int, argv: list[str], nodes: Nodes | None = None) -> int:
    """Run `argv` (a tunelab command line) on `nproc` local ranks (of `nodes`); the exit code of the first rank
    that failed."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The agent logs each failed rank with a long banner; the ranks have already printed their own one-line message.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(torchrun_args(nproc, argv, nodes)))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        code = failure.exitcode
        return 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + signal number
    except SignalException:  # SIGTERM/SIGINT here: the agent passed it on to the ranks, which saved and stopped
        return run_files.EXIT_INTERRUPTED  # as a single process reports a stop on request
    return 0
