"""The instance's run launcher: Dagster's DefaultRunLauncher, plus a health check of run processes.

Dagster's run monitoring (``run_monitoring`` in ``dagster.yaml``, run by the daemon of
``dagster dev``) fails a started run whose worker is gone only for launchers that can tell;
the DefaultRunLauncher cannot, so a run killed with ``kill -9`` (or by the OOM killer) stayed
"Started" and kept its ``musc_model`` pool slot. Every run logs the pid of the process that
executes it (an engine event with ``pid`` metadata); a run is dead when that process no longer
exists, is a zombie, or is a newer process that reuses the pid. This holds for runs launched
from the UI and for CLI runs (``dagster asset materialize``) against the same instance, all
on this host: the instance is the local ``$DAGSTER_HOME`` of ``make dev``.

Monitoring then marks the run failed, and ``free_slots_after_run_end_seconds`` hands its pool
slots back. Without a daemon (the CLI, ``materialize``) every run does the same for the runs
before it: :mod:`musc_pipeline.recovery`.
"""

from __future__ import annotations

import psutil
from dagster import DagsterEventType, DagsterInstance
from dagster._core.launcher import CheckRunHealthResult, DefaultRunLauncher, WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun


def run_process(instance: DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """(pid, when it was logged) of the process executing a run, or None before it logged one."""
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        data = record.dagster_event.event_specific_data if record.dagster_event else None
        metadata = getattr(data, "metadata", None) or {}
        if "pid" in metadata:  # the first is the run worker; later ones may be step subprocesses
            return int(metadata["pid"].value), record.timestamp
    return None


def process_gone(pid: int, logged_at: float) -> str | None:
    """Why the process that logged ``pid`` at ``logged_at`` no longer runs, or None while it does."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return "it exited and is a zombie"
        if proc.create_time() > logged_at + 1.0:
            return f"pid {pid} now belongs to a newer process ({proc.name()}), not the Dagster run"
    except psutil.NoSuchProcess:
        return "no process has that pid on this host"
    return None


def run_health(instance: DagsterInstance, run: DagsterRun) -> CheckRunHealthResult:
    found = run_process(instance, run.run_id)
    if found is None:  # between RUN_START and the executor's first engine event
        return CheckRunHealthResult(WorkerStatus.RUNNING, "run process not logged yet")
    pid, logged_at = found
    gone = process_gone(pid, logged_at)
    if gone is None:
        return CheckRunHealthResult(WorkerStatus.RUNNING, f"run process {pid} is alive")
    return CheckRunHealthResult(WorkerStatus.FAILED, f"run process {pid} is gone (killed or crashed): {gone}")


class LocalRunLauncher(DefaultRunLauncher):
    """DefaultRunLauncher whose runs' processes run monitoring can check (see module doc)."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        return run_health(self._instance, run)
