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
- the slots (claimed or queued) of runs that are dead, finished with their process gone, or
  deleted are freed;
- what was done is written to the recovering run's event log (and so to the CLI's console).

A slot of a live run is never touched: its process exists and is the one that logged the pid.
Pids are compared on this host, which is where the instance of ``dagster.yaml`` keeps its runs.
"""

from __future__ import annotations

from collections.abc import Callable

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.launcher import WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun

from musc_pipeline.launcher import process_gone, run_health, run_process


def _slot_holder_gone(instance: DagsterInstance, run_id: str) -> str | None:
    """Why a run that holds or queues for pool slots will never free them, or None."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        return f"run {run_id} no longer exists in the instance"
    if not run.is_finished:
        health = run_health(instance, run)
        return health.msg if health.status == WorkerStatus.FAILED else None
    found = run_process(instance, run_id)
    if found is not None and process_gone(*found) is None:
        return None  # finished moments ago; its own process frees its slots
    return f"run {run_id} ended ({run.status.value}) without freeing them"


def recover_runs(instance: DagsterInstance, current: DagsterRun, report: Callable[[str], object]) -> list[str]:
    """Fail dead STARTED runs and free the pool slots no live run holds.

    ``report`` writes each line of what was done to the current run's event log. Returns those
    lines (none when every other run is live or finished cleanly).
    """
    done = []
    current_run_id = current.run_id
    for run in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED])):
        if run.run_id == current_run_id:
            continue
        health = run_health(instance, run)
        if health.status == WorkerStatus.FAILED:
            instance.report_run_failed(run, f"Marked failed by run {current_run_id}: {health.msg}.")
            done.append(f"run {run.run_id} marked failed: {health.msg}")
    for run_id in sorted(instance.event_log_storage.get_concurrency_run_ids() - {current_run_id}):
        reason = _slot_holder_gone(instance, run_id)
        if reason is not None:
            instance.event_log_storage.free_concurrency_slots_for_run(run_id)
            done.append(f"pool slots of run {run_id} freed: {reason}")
    for line in done:
        report(f"Crash recovery: {line}")
    return done
