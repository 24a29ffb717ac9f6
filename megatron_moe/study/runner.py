"""Run a study plan: train every (run, seed), evaluate it, keep its small records, then report.

Per run id ``<name>-s<seed>``:

1. train (``python -m megatron_moe train``, under torchrun for ``nproc`` > 1) at the plan's
   budget into ``<work>/<id>/ckpt``; a checkpoint left by a killed runner is resumed, and the
   budget-fitted schedule comes back with it (``training/budget.py``);
2. evaluate the final checkpoint (``evaluate``: validation loss, test BLEU/chrF; and
   ``tools/smoe_k_sweep.py`` at the run's ``eval_k``);
3. write the records to ``<records>/runs/<id>/``: ``run.json`` (commands, summary, and
   the machine of each start of its training: ``study/machine.py``),
   ``curve.jsonl`` (log-interval rows and validation rows), ``eval.json``, ``k_sweep.csv``.

A run whose ``eval.json`` exists is finished and skipped; so rerunning the runner on a finished
study only regenerates the report. Checkpoints and full logs stay in ``<work>`` (never committed).
Every process of a run carries the run's tag in its environment: a runner that stops ends them,
and processes left behind by a runner that was SIGKILLed are ended before the run resumes.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from megatron_moe.checkpointing.store import tracked_step
from megatron_moe.staging import staged_file
from megatron_moe.study import machine
from megatron_moe.study.plan import Plan, PlannedRun
from megatron_moe.study.records import compact_curve, summarize

REPO = Path(__file__).resolve().parents[2]
STUDY_RUN_TAG = "MEGATRON_MOE_STUDY_RUN"  # in the environment of every process of a run


def _log(message: str) -> None:
    print(f"[study] {message}", flush=True)


def _launcher(plan: Plan) -> list[str]:
    if plan.nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={plan.nproc}"]


def _sets(overrides) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def run_overrides(plan: Plan, run: PlannedRun, seed: int) -> list[str]:
    data = [f"data.dir={plan.data_dir}"] if plan.data_dir else []
    return [*data, *plan.common, *run.overrides, f"train.seed={seed}",
            f"train.time_budget_minutes={plan.budget_minutes}"]


class StudyRunner:
    def __init__(self, plan: Plan, work: Path, records: Path):
        self.plan, self.work, self.records = plan, work, records
        self.env = dict(os.environ, OMP_NUM_THREADS=str(plan.threads), PYTHONWARNINGS="ignore")
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
            self.env.pop(name, None)

    # -- processes ------------------------------------------------------------------------------
    def _execute(self, cmd: list[str], run_dir: Path, log_name: str) -> str:
        """Run ``cmd`` with its output appended to ``run_dir/log_name`` and echoed; returns the
        output. A non-zero exit raises naming the log.

        Every process of the run (torchrun starts its ranks in sessions of their own) carries
        ``STUDY_RUN_TAG`` in its environment: the runner ends them all when it stops, and a
        runner started again ends those a SIGKILLed runner left behind before resuming."""
        tag = str(run_dir.resolve())
        _end_tagged(tag)
        with open(run_dir / log_name, "a", encoding="utf-8", buffering=1) as log:  # lines
            log.write(f"$ {shlex.join(cmd)}\n")
            proc = subprocess.Popen(cmd, cwd=REPO, env={**self.env, STUDY_RUN_TAG: tag},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            lines = []
            try:
                for line in proc.stdout:
                    log.write(line)
                    lines.append(line)
                    if line.startswith(("step ", "[megatron_moe] budget", "validation", "[sweep]")):
                        print(f"  {run_dir.name}: {line.rstrip()}", flush=True)
                code = proc.wait()
            finally:  # the runner stopped by a signal or an error: its run stops too
                if proc.poll() is None:
                    _end_tagged(tag)
        if code != 0:
            tail = "".join(lines[-15:])
            raise RuntimeError(f"{shlex.join(cmd[:6])} ... exited with {code}; log: "
                               f"{run_dir / log_name}\n{tail}")
        return "".join(lines)

    # -- one run ----------------------------------------------------------------------------------
    def train(self, run: PlannedRun, seed: int, run_dir: Path) -> list[str]:
        ckpt = run_dir / "ckpt"
        sets = [*run_overrides(self.plan, run, seed), f"checkpoint.save={ckpt}",
                f"logging.metrics_file={run_dir / 'metrics.jsonl'}"]
        cmd = [*_launcher(self.plan), "-m", "megatron_moe", "train", "--config", self.plan.config,
               *_sets(sets)]
        if (run_dir / "trained").exists():
            return cmd
        resume = []
        if tracked_step(ckpt) is not None:
            _log(f"{run.run_id(seed)}: resuming from {ckpt} (step {tracked_step(ckpt)})")
            resume = ["--set", f"checkpoint.load={ckpt}"]
        self._execute(cmd + resume, run_dir, "train.log")
        (run_dir / "trained").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        return cmd

    def evaluate(self, run: PlannedRun, seed: int, run_dir: Path) -> tuple[dict, list, list]:
        sets = [*run_overrides(self.plan, run, seed), *self.plan.evaluate,
                f"checkpoint.load={run_dir / 'ckpt'}"]
        cmd = [*_launcher(self.plan), "-m", "megatron_moe", "evaluate", "--config",
               self.plan.config, *_sets(sets)]
        out = self._execute(cmd, run_dir, "evaluate.log")
        result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
        commands, sweep = [cmd], []
        if run.eval_k:
            csv_path = run_dir / "k_sweep.csv"
            sweep_cmd = [*_launcher(self.plan), "tools/smoe_k_sweep.py", "--config",
                         self.plan.config, *_sets(sets), "--k", *map(str, run.eval_k),
                         "--csv", str(csv_path)]
            self._execute(sweep_cmd, run_dir, "k_sweep.log")
            commands.append(sweep_cmd)
            sweep = csv_path.read_text().splitlines()
        return result, commands, sweep

    def one(self, run: PlannedRun, seed: int) -> None:
        rid = run.run_id(seed)
        out = self.records / "runs" / rid
        if (out / "eval.json").exists():
            _log(f"{rid}: finished earlier, skipped")
            return
        run_dir = self.work / rid
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "trained").exists():  # each start of its training: the machine
            seen = machine.describe(self.plan.threads)
            _log(f"{rid}: machine {seen['cpu']}, {seen['cores']} cores, "
                 f"probe {seen['probe_its_per_s']} it/s")
            with open(run_dir / "machine.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(seen) + "\n")
        _log(f"{rid}: training ({self.plan.budget_minutes} minutes budget)")
        started = time.time()
        train_cmd = self.train(run, seed, run_dir)
        _log(f"{rid}: evaluating")
        result, eval_cmds, sweep = self.evaluate(run, seed, run_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = compact_curve(run_dir / "metrics.jsonl")
        record = {"run": run.name, "label": run.label, "seed": seed, "commit": _commit(),
                  "commands": [_display(train_cmd, self.plan)]
                  + [_display(c, self.plan) for c in eval_cmds],
                  "summary": summarize(run_dir / "metrics.jsonl"),
                  "machine": _machines(run_dir),
                  "runner_seconds": time.time() - started}
        _write(out / "curve.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        if sweep:
            _write(out / "k_sweep.csv", "\n".join(sweep) + "\n")
        _write(out / "run.json", json.dumps(record, indent=1) + "\n")
        _write(out / "eval.json", json.dumps(result, indent=1) + "\n")  # last: marks it done
        _log(f"{rid}: done (BLEU {result.get('bleu', float('nan')):.2f}, "
             f"loss {result['loss']:.4f})")


def prepare_data(plan: Plan) -> None:
    """Preprocess the plan's data when ``data.dir`` has no ``meta.json`` yet."""
    if not plan.data_dir or (Path(plan.data_dir) / "meta.json").exists() or not plan.preprocess:
        return
    cmd = [sys.executable, "-m", "megatron_moe", "preprocess", *plan.preprocess,
           "--output", plan.data_dir]
    _log(f"preprocessing: {shlex.join(cmd)}")
    subprocess.run(cmd, cwd=REPO, check=True)


def _machines(run_dir: Path) -> list[dict]:
    path = run_dir / "machine.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _display(cmd: list[str], plan: Plan) -> str:
    """The command as a user would type it (``python``/``torchrun``, not this interpreter)."""
    prefix = (["torchrun", f"--nproc_per_node={plan.nproc}"] if plan.nproc > 1 else ["python"])
    rest = cmd[len(_launcher(plan)):]
    return f"OMP_NUM_THREADS={plan.threads} " + shlex.join(prefix + rest)


def _commit() -> str:
    """The code's git commit (and whether the work tree had changes), or "unknown"."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (modified)" if dirty else "")


def _write(path: Path, text: str) -> None:
    with staged_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _tagged_pids(tag: str) -> list[int]:
    marker = f"{STUDY_RUN_TAG}={tag}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:  # gone, or not ours
                pass
    return pids


def _end_tagged(tag: str) -> None:
    """SIGKILL every process of the run tagged ``tag`` and wait until they are gone."""
    pids = _tagged_pids(tag)
    if pids:
        _log(f"ending {len(pids)} process(es) of {Path(tag).name} left running")
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for _ in range(200):
        if not _tagged_pids(tag):
            return
        time.sleep(0.05)
