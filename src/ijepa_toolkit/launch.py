"""``ijepa-submit``: run an entrypoint on SLURM (or locally) through submitit, preemption included.

``ijepa-submit finetune --nodes 2 --gpus-per-node 8 --timeout-min 4320 --partition P -- --fname
finetune/vit_h14_in1k`` submits ``nodes x tasks-per-node`` tasks (one per GPU by default); each task
maps submitit's job environment to the torch.distributed variables that ``init_distributed``
reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and calls the entrypoint's
``main(argv)``. On preemption or timeout submitit calls ``Job.checkpoint()``, which requeues the
same job with ``--resume`` added, so a training run continues from its ``checkpoint-last.pth``
(the frozen protocols without ``--resume`` rerun, their feature cache making that cheap).
``--local`` runs the tasks on this machine with submitit's local executor (one node).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import submitit

from .errors import UserError
from .runs import run_main

# name -> (module with main(argv) -> int, whether it takes --resume)
ENTRYPOINTS = {
    "finetune": ("ijepa_toolkit.finetune.run", True),
    "pretrain": ("ijepa_toolkit.pretrain.train", True),
    "linprobe": ("ijepa_toolkit.eval.linear", True),
    "depth": ("ijepa_toolkit.eval.depth", True),
    "knn": ("ijepa_toolkit.eval.knn", False),
    "logistic": ("ijepa_toolkit.eval.logistic", False),
    "rank": ("ijepa_toolkit.eval.rank", False),
}


class Job(submitit.helpers.Checkpointable):
    """One task of a submitted run: ``Job("finetune", argv)()`` runs ``finetune.run.main(argv)``
    under the torch.distributed environment of its submitit task; returns the exit status."""

    def __init__(self, entrypoint: str, argv: Sequence[str]) -> None:
        if entrypoint not in ENTRYPOINTS:
            raise UserError(f"unknown entrypoint {entrypoint!r}; expected one of "
                            f"{', '.join(ENTRYPOINTS)}")  # fmt: skip
        self.entrypoint, self.argv = entrypoint, list(argv)
        self.preempted = False

    def __call__(self) -> int:
        # one GPU index per local rank (resolve_device), so CUDA_VISIBLE_DEVICES stays as is
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        module = importlib.import_module(ENTRYPOINTS[self.entrypoint][0])
        status = module.main(self.argv)
        if self.preempted:
            # submitit's signal handler ended the run with sys.exit(code), which run_main turned
            # into a return value: end this task with it, as the handler meant (the requeue code)
            sys.exit(status)
        if status != 0:
            raise RuntimeError(f"{self.entrypoint} {' '.join(self.argv)}: exit status {status}")
        return status

    def checkpoint(self, *args: object, **kwargs: object) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption/timeout (rank 0): the same job, resuming."""
        self.preempted = True
        argv = list(self.argv)
        if ENTRYPOINTS[self.entrypoint][1] and "--resume" not in argv:
            argv.append("--resume")
        return submitit.helpers.DelayedSubmission(Job(self.entrypoint, argv))


@dataclass
class Resources:
    """What to ask the scheduler for; ``timeout_min`` in minutes."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: Optional[int] = None  # None: one task per GPU (at least one)
    timeout_min: int = 60
    partition: Optional[str] = None
    cpus_per_task: Optional[int] = None


def executor(folder: str, res: Resources, local: bool = False) -> submitit.Executor:
    """A submitit executor for ``res``: SLURM (``sbatch`` must be on PATH) or, with ``local``, this
    machine (one node)."""
    if local and res.nodes != 1:
        raise UserError(f"--local runs on this machine: --nodes must be 1, got {res.nodes}")
    if not local and shutil.which("sbatch") is None:
        raise UserError("sbatch not found: this machine has no SLURM (use --local to run here)")
    ex = submitit.AutoExecutor(folder=folder, cluster="local" if local else "slurm")
    tasks = res.tasks_per_node or max(res.gpus_per_node, 1)
    params = dict(nodes=res.nodes, tasks_per_node=tasks, gpus_per_node=res.gpus_per_node,
                  timeout_min=res.timeout_min)  # fmt: skip
    if res.cpus_per_task is not None:
        params["cpus_per_task"] = res.cpus_per_task
    if res.partition is not None:
        params["slurm_partition"] = res.partition
    ex.update_parameters(**params)
    return ex


def submit(entrypoint: str, argv: Sequence[str], folder: str, res: Resources,
           local: bool = False) -> submitit.Job:  # fmt: skip
    """Submit ``Job(entrypoint, argv)`` with ``res``; returns the submitit job."""
    return executor(folder, res, local).submit(Job(entrypoint, argv))


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ijepa-submit", description=__doc__.split("\n\n")[0],
        usage="ijepa-submit ENTRYPOINT [options] -- [entrypoint arguments]",
        epilog="arguments after -- go to the entrypoint, e.g. -- --fname finetune/tiny_cpu",
    )  # fmt: skip
    p.add_argument("entrypoint", choices=list(ENTRYPOINTS))
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="default: one per GPU (at least one)")  # fmt: skip
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--timeout-min", type=int, default=60, help="wall-clock limit, minutes")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--folder", default="runs/slurm/%j", help="submitit logs and pickles")
    p.add_argument("--local", action="store_true", help="run here with submitit's local executor")
    p.add_argument("--wait", action="store_true", help="wait for the job (always with --local)")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    ns = p.parse_args(argv[:cut])
    ns.args = argv[cut + 1 :]
    return ns


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``ijepa-submit ENTRYPOINT [resources] -- [entrypoint args]``: exit status."""
    ns = parse(argv)
    res = Resources(ns.nodes, ns.gpus_per_node, ns.tasks_per_node, ns.timeout_min, ns.partition,
                    ns.cpus_per_task)  # fmt: skip

    def work() -> None:
        job = submit(ns.entrypoint, ns.args, ns.folder, res, ns.local)
        print(f"submitted {ns.entrypoint} as job {job.job_id}; logs: {job.paths.stderr}")
        if ns.local or ns.wait:
            try:
                statuses: List[int] = job.results()
            except submitit.core.utils.FailedJobError:
                raise JobFailed(f"job {job.job_id} failed: {last_error(job.stderr() or '')} "
                                f"(log: {job.paths.stderr})") from None  # fmt: skip
            print(f"job {job.job_id} done: exit status {statuses[0]}")

    try:
        return run_main(work)
    except JobFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


class JobFailed(RuntimeError):
    """A submitted job ended in an error: exit status 1, one line with the task's error line."""


def last_error(log: str) -> str:
    """The entrypoint's last ``error: ...`` line in a task log, else its last non-empty line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errors = [ln[len("error: ") :] for ln in lines if ln.startswith("error: ")]
    return errors[-1] if errors else (lines[-1] if lines else "no log")


if __name__ == "__main__":
    raise SystemExit(main())
