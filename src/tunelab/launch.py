"""`tunelab train --nproc N`: run the same command as N processes on this machine, under torch's own launcher.

Equivalent to `torchrun --standalone --nproc_per_node N -m tunelab train ...`, but the elastic agent runs in this
process, so a rank that fails with a clear message gives a clean exit code here instead of torchrun's traceback.
"""

from __future__ import annotations

from tunelab import run_files


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


def torchrun_args(nproc: int, argv: list[str]) -> list[str]:
    return ["--standalone", f"--nproc_per_node={nproc}", "-m", "tunelab", *_without_nproc(argv)]


def launch(nproc: int, argv: list[str]) -> int:
    """Run `argv` (a tunelab command line) on `nproc` local ranks; the exit code of the first rank that failed."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The agent logs each failed rank with a long banner; the ranks have already printed their own one-line message.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(torchrun_args(nproc, argv)))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        code = failure.exitcode
        return 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + signal number
    except SignalException:  # SIGTERM/SIGINT here: the agent passed it on to the ranks, which saved and stopped
        return run_files.EXIT_INTERRUPTED  # as a single process reports a stop on request
    return 0
