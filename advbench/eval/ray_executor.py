"""The Ray executor: a run's jobs on the workers of a Ray cluster (``pip install 'advbench[ray]'``).

The driver (this process) plans and alone writes the store; each worker is a Ray actor holding a
:class:`~advbench.eval.worker.Worker` of its own, so it loads each model once and keeps its clean
passes between jobs. The run's data goes into the object store once and every actor reads it
from there. Before running a job a worker checks that the model and examples it sees have the
content digests the driver planned on (a node with another file at the same path fails loudly),
and it runs the job with the job's own seed, so a Ray run writes the same results as an
in-process run, whatever worker ran which job and in which order.

Scheduling: the jobs go out in plan order, two units queued at each worker (a
minimal-perturbation attack's eps sweep is one unit, searched once). A cascaded job waits until the jobs it reads
are stored; the driver then computes, from the store, which examples they left robust and sends
that with the job (:func:`~advbench.eval.executors.needs`). A worker that dies mid-job (killed,
out of host memory, its node lost) is replaced and its unit retried, up to ``max_attempts``
times; each retry is recorded in run.json. A killed driver loses nothing stored: rerunning the
same command resumes from the store.

GPUs are Ray resources: each worker asks for ``gpus_per_job`` of them (0.5: two workers share a
GPU) and one CPU.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any


from advbench.errors import AdvbenchError, ConfigError
from advbench.eval.executors import RobustLookup, bundles, dependencies, needs
from advbench.eval.jobs import Job
from advbench.eval.worker import Worker
from advbench.provenance import resolve_device, versions
from advbench.store import JobRecord

#: how long the driver waits for a cluster's head to accept a connection
CONNECT_TIMEOUT_S = 5.0
#: units queued at each worker: its next one is there when it finishes, not a round trip later
QUEUE_DEPTH = 2


class ExecutorError(AdvbenchError):
    """The cluster cannot run the jobs: a worker lacks a dependency, keeps dying, or differs."""


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to get it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("executor 'ray' needs Ray, which is not installed: pip install 'advbench[ray]' "
                          "(or run with executor: inprocess, the default)") from None
    return ray


def check_reachable(address: str | None) -> None:
    """A one-line error when ``address`` (host:port or ray://host:port) accepts no connection:
    Ray itself would retry for minutes before failing."""
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"executor address {address!r} must be host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}; start its head with "
                          f"'ray start --head' and give the address it prints (or leave address out for a "
                          f"local cluster on this machine)") from None


def compared_versions() -> dict[str, str | None]:
    """The versions a worker must share with the driver (the numbers depend on them)."""
    return {k: v for k, v in versions().items() if k in ("advbench", "torch")}


def _group_key(keys: tuple[str, ...]) -> str:
    return "\n".join(keys)


class JobRunner:
    """One Ray worker: a :class:`Worker` of its own over the run's data (from the object store)."""

    def __init__(self, device: str, amp: bool, channels_last: bool, threads: int | None,
                 data_spec: dict[str, Any], data: Any, cwd: str) -> None:
        if os.path.isdir(cwd):  # relative model and data paths mean what they mean to the driver
            os.chdir(cwd)
        self.worker = Worker(resolve_device(device), amp=amp, threads=threads, channels_last=channels_last)
        self.worker.preload_data(data_spec, data)

    def ready(self) -> dict[str, Any]:
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "device": str(self.worker.device),
                "versions": compared_versions()}

    def run(self, jobs: list[str], masks: dict[str, dict[int, bool]]) -> tuple[list[JobRecord], list[dict[str, Any]]]:
        """Run a unit of jobs (given as JSON) with the robust masks the driver computed for them."""
        self.worker.robust_lookup = lambda keys: masks[_group_key(tuple(keys))]
        seen = len(self.worker.oom_events)
        records = []
        for text in jobs:
            job = Job.from_json(text)
            self.worker.check_content(job)
            records.append(self.worker.run(job))
        return records, self.worker.oom_events[seen:]


class RayExecutor:
    """Runs jobs on ``workers`` Ray actors of the cluster at ``address`` (None: a local cluster
    started for the run, with this machine's CPUs, shut down after it; a cluster already
    initialized in this process is used as it is). ``on_result`` is called after each record
    is handed to the driver (tests use it to kill a worker mid-run)."""

    def __init__(self, address: str | None = None, workers: int | None = None, gpus_per_job: float = 0.0,
                 on_result: Callable[[RayExecutor], None] | None = None, max_attempts: int = 3) -> None:
        self.ray = import_ray()
        check_reachable(address)
        self.address, self.requested, self.gpus_per_job = address, workers, float(gpus_per_job)
        self.on_result, self.max_attempts = on_result, max_attempts
        self.actors: list[Any] = []
        self.info: list[dict[str, Any]] = []
        self.retries: list[dict[str, Any]] = []
        self.oom_events: list[dict[str, Any]] = []
        self._busy: dict[int, list[Any]] = {}  # actor index -> the refs of its units in flight, in order
        self._owns = False
        self._spawn_args: tuple[Any, ...] = ()

    # ------------------------------------------------------------------ cluster
    def start(self, worker: Worker, data_spec: dict[str, Any], data: Any) -> None:
        ray = self.ray
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                         logging_level="ERROR", configure_logging=True)
            except (ConnectionError, RuntimeError) as exc:
                raise ConfigError(f"cannot connect to a Ray cluster at {self.address or 'this machine'}: "
                                  f"{' '.join(str(exc).split())[:300]}") from None
            self._owns = True
        if worker.device.type == "cuda" and not self.gpus_per_job:
            raise ConfigError("device cuda with the ray executor needs executor.gpus_per_job > 0 (a worker sees "
                              "only the GPUs Ray gives it); give gpus_per_job: 1, or 0.5 for two workers per GPU")
        n = self._worker_count(ray.cluster_resources())
        device = "auto" if self.gpus_per_job else "cpu"  # a worker's GPUs are those Ray assigned it
        self._spawn_args = (device, worker.amp, worker.channels_last, worker.threads, data_spec, ray.put(data),
                            os.getcwd())
        self._remote = ray.remote(JobRunner).options(num_cpus=1, num_gpus=self.gpus_per_job, max_restarts=0)
        self.actors = [self._remote.remote(*self._spawn_args) for _ in range(n)]
        self.info = [self._ready(i) for i in range(n)]

    def _worker_count(self, resources: dict[str, float]) -> int:
        cpus, gpus = int(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        fit = cpus if not self.gpus_per_job else min(cpus, int(gpus / self.gpus_per_job + 1e-9))
        n = self.requested or max(fit, 1)
        if n > cpus or n * self.gpus_per_job > gpus + 1e-9:
            raise ConfigError(f"executor: {n} worker(s) with 1 CPU and {self.gpus_per_job:g} GPU each need {n} CPU(s) "
                              f"and {n * self.gpus_per_job:g} GPU(s); the cluster has {cpus} CPU(s) and {gpus:g} GPU(s) "
                              f"(give fewer workers, a smaller gpus_per_job, or a larger cluster)")
        return n

    def _ready(self, i: int) -> dict[str, Any]:
        """Wait for actor ``i`` to start; a worker that cannot import what it needs is an error."""
        try:
            info = self.ray.get(self.actors[i].ready.remote())
        except Exception as exc:  # noqa: BLE001 - Ray wraps the worker's own error
            raise ExecutorError(f"a Ray worker could not start: {_cause(exc)}; every node needs advbench and "
                                f"its dependencies installed as on the driver (pip install 'advbench[ray]')") from None
        mine = compared_versions()
        if info["versions"] != mine:
            raise ExecutorError(f"a Ray worker on node {info['node'][:12]} has {info['versions']}, the driver "
                                f"{mine}: install the same versions on every node (results would not compare)")
        return info

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()
        self._owns = False

    def busy_pids(self) -> list[int]:
        """The process ids of the workers running a unit now."""
        return [self.info[i]["pid"] for i, refs in self._busy.items() if refs]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": "ray", "address": self.address or "local", "workers": len(self.info),
                               "gpus_per_job": self.gpus_per_job,
                               "nodes": len({i["node"] for i in self.info}), "retries": self.retries}
        if self.oom_events:
            out["out_of_memory"] = self.oom_events
        return out

    # ------------------------------------------------------------------ running
    def map(self, jobs: list[Job], worker: Worker, lookup: RobustLookup) -> Iterator[tuple[Job, JobRecord]]:
        ray = self.ray
        todo_keys = {j.key for j in jobs}
        pending: list[tuple[list[Job], int]] = [(b, 1) for b in bundles(jobs)]
        done: set[str] = set()
        #: ref -> (actor index, the actor's generation when sent, unit, attempt)
        flight: dict[Any, tuple[int, int, list[Job], int]] = {}
        generation = [0] * len(self.actors)

        def ready(unit: list[Job]) -> bool:
            return all(k in done or k not in todo_keys for j in unit for k in dependencies(j))

        while pending or flight:
            self._dispatch(pending, ready, lookup, flight, generation)
            if not flight:
                raise ExecutorError("no job can run: the plan's cascade waits on jobs that never run (a bug)")
            (ref,), _ = ray.wait(list(flight), num_returns=1)
            i, gen, unit, attempt = flight.pop(ref)
            self._busy[i] = [r for r in self._busy.get(i, []) if r != ref]
            try:
                records, ooms = ray.get(ref)
            except _ACTOR_GONE(ray) as exc:
                if gen == generation[i]:  # the first of its units to report the death replaces it
                    self._replace(i)
                    generation[i] += 1
                    self._busy[i] = []
                self._retry(unit, attempt, exc, pending)
                continue
            except ray.exceptions.RayTaskError as exc:
                raise _job_error(exc, unit[0], self.info[i]["node"]) from None
            self.oom_events += ooms
            for job, rec in zip(unit, records):
                done.add(job.key)
                yield job, rec
            if self.on_result is not None:
                self.on_result(self)

    def _dispatch(self, pending: list[tuple[list[Job], int]], ready: Callable[[list[Job]], bool],
                  lookup: RobustLookup, flight: dict[Any, tuple[int, int, list[Job], int]],
                  generation: list[int]) -> None:
        """Keep up to :data:`QUEUE_DEPTH` units queued at every worker (the next one waits there
        while the driver stores the last one's records), the first ready units in plan order."""
        for depth in range(1, QUEUE_DEPTH + 1):
            for i in range(len(self.actors)):
                if len(self._busy.setdefault(i, [])) >= depth:
                    continue
                pick = next((p for p in pending if ready(p[0])), None)
                if pick is None:
                    return
                pending.remove(pick)
                unit, attempt = pick
                masks = {_group_key(g): lookup(g) for j in unit for g in needs(j)}
                ref = self.actors[i].run.remote([j.to_json() for j in unit], masks)
                flight[ref] = (i, generation[i], unit, attempt)
                self._busy[i].append(ref)

    def _replace(self, i: int) -> None:
        """A new actor in place of dead actor ``i``."""
        self.actors[i] = self._remote.remote(*self._spawn_args)
        self.info[i] = self._ready(i)

    def _retry(self, unit: list[Job], attempt: int, exc: Exception, pending: list[tuple[list[Job], int]]) -> None:
        """Put a dead worker's unit first in line again (an error after ``max_attempts``)."""
        what = f"{unit[0].model['name']} / {unit[0].attack_label} ({len(unit)} job(s))"
        self.retries.append({"jobs": [j.key for j in unit], "what": what, "attempt": attempt,
                             "error": " ".join(str(exc).split())[:200], "time": time.time()})
        if attempt >= self.max_attempts:
            raise ExecutorError(f"{what} failed {attempt} times: its Ray worker died each time "
                                f"({' '.join(str(exc).split())[:200]})")
        pending.insert(0, (unit, attempt + 1))


def _ACTOR_GONE(ray: Any) -> tuple[type[BaseException], ...]:  # noqa: N802 - reads as the exception tuple it is
    """The errors of a worker that died (ActorUnavailableError is Ray >= 2.30's name for one restarting)."""
    return tuple(e for e in (ray.exceptions.RayActorError, getattr(ray.exceptions, "ActorUnavailableError", None)) if e)


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"


def _job_error(exc: Any, job: Job, node: str) -> Exception:
    """The error a job raised on a worker, as the driver reports it (one line): a missing module
    as the worker lacking a dependency the driver has, any other advbench error as it is."""
    cause = getattr(exc, "cause", None)
    where = f"a Ray worker (node {node[:12]})"
    missing = isinstance(cause, ImportError) or (isinstance(cause, ConfigError) and "cannot import module" in str(cause))
    if missing:
        return ExecutorError(f"{where} lacks a dependency the driver has, running model {job.model['name']!r}: "
                             f"{_cause(cause)}; install it on every node (or put the module on their PYTHONPATH)")
    if isinstance(cause, AdvbenchError):
        return ExecutorError(f"on {where}: {' '.join(str(cause).split())}")
    return cause if isinstance(cause, Exception) else ExecutorError(f"{where} failed: {_cause(exc)}")
