"""Executors: where a run's jobs execute. The driver (the evaluator) plans, hands the jobs still
to run to an executor, and writes each record to the store as it arrives (one transaction per
job); an executor only runs jobs and yields their records.

Two executors ship: :class:`InProcessExecutor` (the default: jobs one after another in this
process) and :class:`~advbench.eval.ray_executor.RayExecutor` (jobs on the workers of a Ray
cluster; ``pip install 'advbench[ray]'``). Both give the same records, because a job is
self-contained: its seed, examples and content digests travel with it, and the only thing it
reads from other jobs (in cascade mode: which examples earlier attacks left robust) is computed
by the driver from the store once those jobs are written (:func:`needs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from advbench.eval.jobs import Job
from advbench.eval.worker import Worker
from advbench.store import JobRecord

#: per example index of a job: whether the given earlier jobs left it robust (from the store)
RobustLookup = Callable[[tuple[str, ...]], dict[int, bool]]


class Executor(Protocol):
    """Runs jobs and yields ``(job, record)`` as each finishes (in any order)."""

    def start(self, worker: Worker, data_spec: dict[str, Any], data: Any) -> None:
        """Get ready to run jobs on ``data`` (before the run writes anything: a cluster that
        cannot be reached fails here, leaving nothing behind)."""
        ...

    def map(self, jobs: list[Job], worker: Worker, lookup: RobustLookup) -> Iterator[tuple[Job, JobRecord]]: ...

    def close(self) -> None:
        """Release what :meth:`start` acquired."""
        ...

    def describe(self) -> dict[str, Any]:
        """What run.json records of the executor (its name, workers, retries, ...)."""
        ...


def needs(job: Job) -> tuple[tuple[str, ...], ...]:
    """The groups of earlier jobs whose outcome ``job`` reads (each group is asked of the store
    as one robust mask): its cascade's ``after`` (a minimal attack ignores it), or each eps's
    ``after`` of a minimal suite component's sweep."""
    if job.minimal:
        return tuple(a for a in job.sweep_after if a)
    return (job.after,) if job.after else ()


def dependencies(job: Job) -> set[str]:
    """The keys of every job that must be stored before ``job`` can run."""
    return {k for group in needs(job) for k in group}


def bundles(jobs: Iterable[Job]) -> list[list[Job]]:
    """The jobs grouped into the units an executor dispatches: consecutive jobs of one
    minimal-perturbation run (the eps of its sweep: one search, re-audited at each eps) travel
    together so one worker searches once; every other job travels alone."""
    out: list[list[Job]] = []
    for job in jobs:
        if out and job.minimal and out[-1][-1].minimal and out[-1][-1].sweep_key == job.sweep_key:
            out[-1].append(job)
        else:
            out.append([job])
    return out


class InProcessExecutor:
    """Runs jobs one after another in this process, in plan order (the default executor)."""

    def __init__(self) -> None:
        self.worker: Worker | None = None

    def start(self, worker: Worker, data_spec: dict[str, Any], data: Any) -> None:
        self.worker = worker

    def close(self) -> None:
        pass

    def map(self, jobs: list[Job], worker: Worker, lookup: RobustLookup) -> Iterator[tuple[Job, JobRecord]]:
        worker.robust_lookup = lookup
        for job in jobs:
            yield job, worker.run(job)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": "inprocess"}
        if self.worker is not None and self.worker.oom_events:
            out["out_of_memory"] = list(self.worker.oom_events)
        return out

