"""A one-node Slurm cluster for the Slurm test tier, started in a temporary directory.

munged, slurmctld and slurmd run with a generated key and ``slurm.conf`` on non-default ports, as the
current user, with every state, spool, log and PID file under the directory; ``stop()`` ends exactly
the daemons this object started (by PID). Needs Debian's ``slurm-wlm`` and ``munge`` packages.

Two settings keep the tests short: a requeued job may start only ``cred_expire`` + 1 seconds after
the requeue (default 120 s), and pending jobs are looked at every ``sched_interval`` (default 60 s).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sacct", "scontrol")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if not (shutil.which(b) or Path("/usr/sbin", b).exists())]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = Path(root), cpus
        self.pids: dict[str, int] = {}
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- configuration ---------------------------------------------------------------------------
    def _write_config(self) -> None:
        r, user = self.root, getpass.getuser()
        for sub in ("state", "spool", "log", "run", "munge"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        ctld_port, d_port = _free_ports(2)
        memory = 4096
        self.conf.write_text(f"""\
ClusterName=mmtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire=15
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=3600
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    # -- daemons ---------------------------------------------------------------------------------
    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        proc = subprocess.Popen([_binary(name), *args], stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, start_new_session=True)
        self.pids[name] = proc.pid
        self._procs = getattr(self, "_procs", {})
        self._procs[name] = proc

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._write_config()
        m = self.root / "munge"
        self._start("munged", ["--foreground", "--force", f"--key-file={m}/munge.key",
                               f"--socket={m}/munge.socket", f"--pid-file={m}/munged.pid",
                               f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"])
        self._wait(lambda: (m / "munge.socket").exists(), timeout, "munged socket")
        self._start("slurmctld", ["-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout,
                   "slurmctld to answer scontrol ping")
        self._start("slurmd", ["-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self._node_ready, timeout, f"node {self.node} to become idle")
        return self

    def _node_ready(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.strip()
        return out in ("idle", "mix", "alloc")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in getattr(self, "_procs", {}).items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for "
                                       f"{what}; see {self.root / 'log'}")
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}; see {self.root}/log")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            proc = getattr(self, "_procs", {}).get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- client commands -------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, env: dict | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60,
                              env={**self.env, **(env or {})}, cwd=cwd)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def sbatch(self, script: str, *options: str, env: dict | None = None, cwd=None) -> int:
        out = self.run("sbatch", "--parsable", *options, script, env=env, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job: int) -> dict[str, str]:
        """``scontrol show job``'s fields of ``job`` (JobState, Reason, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", str(job), "-o", check=False).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def state(self, job: int) -> str:
        return self.job(job).get("JobState", "UNKNOWN")

    def restarts(self, job: int) -> int:
        return int(self.job(job).get("Restarts", "0"))

    def wait(self, job: int, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED",
                                                    "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> str:
        """The job's state once it is one of ``until``. A requeued job is made eligible at once:
        Slurm holds it pending for ~16 s (Reason=BeginTime) first, a wait of Slurm's own that
        would only add to the tier's time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.job(job)
            state = fields.get("JobState", "UNKNOWN")
            if state in until:  # a job requeueing itself can pass through FAILED: seen twice
                time.sleep(1)
                if self.state(job) == state:
                    return state
                continue
            if state == "PENDING" and fields.get("Reason") == "BeginTime" \
                    and int(fields.get("Restarts", "0")) > 0:
                self.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {self.state(job)} after {timeout}s")
