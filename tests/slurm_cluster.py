"""A real one-node Slurm cluster for the tests: Debian's munged, slurmctld and slurmd, run as our own foreground
children from a temp dir (as ../shared/CLUSTERS.md §2 does), on free ports, with two fake GPUs (gres on /dev/null
and /dev/zero) so GPU requests are scheduled and CUDA_VISIBLE_DEVICES is set. Needs root and the packages
(`make slurm`); without them the tests skip, except in CI (CI=true), where they fail."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "mungekey")
CONF = """ClusterName=tl{pid}
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge/munge.sock,cred_expire=10
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={dir}/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=bf_interval=1,sched_interval=1
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MinJobAge=300
KillWait=5
MailProg=/bin/true
GresTypes=gpu
{node} Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _missing() -> str | None:
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if absent:
        return f"Slurm/munge not installed ({', '.join(absent)} missing): run `make slurm` (as root)"
    if os.geteuid() != 0:
        return "the test Slurm cluster runs its daemons as root"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class SlurmCluster:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="tunelab-slurm-"))
        self.dir.chmod(0o755)  # munged wants o+x on its socket's directory
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.dir / "slurm.conf")}

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
        return out.stdout

    def start(self) -> SlurmCluster:
        d = self.dir
        for sub in ("munge", "state", "log"):
            (d / sub).mkdir()
        self.run("mungekey", "-c", "-k", str(d / "munge/munge.key"))
        self._daemon("munged", "-F", f"--key-file={d}/munge/munge.key", f"--socket={d}/munge/munge.sock",
                     f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/munge/munged.log",
                     f"--seed-file={d}/munge/munged.seed")
        self._until(lambda: (d / "munge/munge.sock").exists(), "munged's socket")
        node = self.run("slurmd", "-C").splitlines()[0]
        memory = int(re.search(r"RealMemory=(\d+)", node).group(1))
        node = node.replace(f"RealMemory={memory}", f"RealMemory={memory * 9 // 10}")  # headroom, or it drains
        self.node = node.split()[0].removeprefix("NodeName=")
        (d / "spool" / self.node).mkdir(parents=True)
        ctld_port, slurmd_port = _free_ports(2)
        (d / "slurm.conf").write_text(CONF.format(pid=os.getpid(), ctld_port=ctld_port, slurmd_port=slurmd_port,
                                                  dir=d, node=node))
        (d / "gres.conf").write_text("AutoDetect=off\nName=gpu File=/dev/null\nName=gpu File=/dev/zero\n")
        self._daemon("slurmctld", "-D", "-f", str(d / "slurm.conf"))
        self._daemon("slurmd", "-D", "-f", str(d / "slurm.conf"))
        self._until(lambda: self.run("sinfo", "-h", "-o", "%t", check=False).strip() == "idle", "node idle")
        return self

    def _daemon(self, *cmd: str) -> None:
        log = open(self.dir / "log" / f"{cmd[0]}.out", "ab")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _until(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.1)
        logs = "".join(p.read_text()[-1500:] for p in (self.dir / "log").glob("*"))
        raise RuntimeError(f"Slurm test cluster: no {what}: {logs}")

    def stop(self) -> list[str]:
        """Cancel every job, wait until no step is left, stop the daemons; what is still running afterwards."""
        self.run("scancel", "-u", "root", check=False)
        spool = self.dir / "spool" / self.node

        def idle():
            steps = [p for p in spool.iterdir() if p.name.startswith(f"{self.node}_")] if spool.exists() else []
            return not self.run("squeue", "-h", "-o", "%i", check=False).strip() and not steps
        try:
            self._until(idle, "end of the jobs")
        finally:
            self.run("scontrol", "shutdown", check=False)
            for proc in reversed(self.procs):
                if proc.args[0] == "munged":
                    proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        leftovers = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
        # A finished slurmstepd is reparented to PID 1, which may reap it a moment late: dead, so not a leftover.
        left = [line for line in leftovers if (str(self.dir) in line or "slurmstepd" in line) and "<defunct>" not in line]
        shutil.rmtree(self.dir, ignore_errors=True)
        return left


@pytest.fixture(scope="session")
def slurm():
    reason = _missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm tests: {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster().start()
    yield cluster
    left = cluster.stop()
    assert not left, f"processes left after the Slurm cluster stopped: {left}"
