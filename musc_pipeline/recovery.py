"""Crash recovery without a daemon: every run fails the dead runs before it and frees their slots.

The daemon of ``dagster dev`` (run monitoring with :class:`~musc_pipeline.launcher.LocalRunLauncher`)
fails a run whose process is gone and hands back its pool slots. Runs from the command line
(``dagster asset materialize``, ``dagster job execute``, ``dg launch``) and from Python
(``materialize``, ``execute_job``) have no daemon, so a run killed with ``kill -9`` inside a model
step kept the ``musc_model`` slot and every later run waited for it forever. Here each run does
that work itself, with Dagster's instance APIs only:

- :func:`recover_runs` — at the start of every run that uses the model (the model resource's
  setup) and again while a step of it waits for a pool slot (:mod:`musc_pipeline.slot_wait`);
- a run still ``STARTED`` whose logged process is gone (:func:`~musc_pipeline.launcher.run_health`)
  is marked failed with the reason, whether or not it holds a slot;
- the slots (claimed or queued) of runs that are dead, finished or deleted are freed;
- what was done is written to the recovering run's event log (at setup also to the CLI's console).

A pid means something only on its own host (a Kubernetes pod or a Celery worker has its own),
so only runs tagged :data:`HOST_TAG` with this host are judged by their pid: the tag is written
by the process that executes the run's steps, the in-process executor
(:class:`~musc_pipeline.slot_wait.SlotWait`), whose pid Dagster logs. A slot of a live run is
never touched: its process exists and is the one that logged the pid.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.launcher import WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun

from musc_pipeline.launcher import run_health

#: Run tag: the host whose process executes the run's steps (where its logged pid means something).
HOST_TAG = "musc_pipeline/host"


def tag_run_host(instance: DagsterInstance, run: DagsterRun) -> None:
    """Record that this process, on this host, executes ``run`` (so later runs may judge it)."""
    instance.add_run_tags(run.run_id, {HOST_TAG: socket.gethostname()})


def _dead_here(instance: DagsterInstance, run: DagsterRun) -> str | None:
    """Why an unfinished run of this host no longer runs, or None (alive, or not judged here)."""
    if run.tags.get(HOST_TAG) != socket.gethostname():
        return None
    health = run_health(instance, run)
    return health.msg if health.status == WorkerStatus.FAILED else None


def _slot_holder_gone(instance: DagsterInstance, run_id: str) -> str | None:
    """Why a run that holds or queues for pool slots will never free them, or None."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        return f"run {run_id} no longer exists in the instance"
    if not run.is_finished:
        return _dead_here(instance, run)
    return f"run {run_id} ended ({run.status.value}) without freeing them"


def recover_runs(instance: DagsterInstance, current: DagsterRun, report: Callable[[str], object]) -> list[str]:
    """Fail dead STARTED runs and free the pool slots no live run holds.

    ``report`` writes each line of what was done to the current run's event log. Returns those
    lines (none when every other run is live or finished cleanly).
    """
    done = []
    current_run_id = current.run_id
    here = RunsFilter(statuses=[DagsterRunStatus.STARTED], tags={HOST_TAG: socket.gethostname()})
    for run in instance.get_runs(here):
        gone = None if run.run_id == current_run_id else _dead_here(instance, run)
        if gone is not None:
            instance.report_run_failed(run, f"Marked failed by run {current_run_id}: {gone}.")
            done.append(f"run {run.run_id} marked failed: {gone}")
    for run_id in sorted(instance.event_log_storage.get_concurrency_run_ids() - {current_run_id}):
        reason = _slot_holder_gone(instance, run_id)
        if reason is not None:
            instance.event_log_storage.free_concurrency_slots_for_run(run_id)
            done.append(f"pool slots of run {run_id} freed: {reason}")
    for line in done:
        report(f"Crash recovery: {line}")
    return done
