"""A step waiting for a pool slot sleeps, stops on SIGTERM/SIGINT and recovers dead slot holders.

Dagster's in-process executor (every run of this project: the CLI, ``materialize``,
``execute_in_process``, runs launched by the daemon) waits for a pool slot in
``ActiveExecution.sleep_til_ready``, which sleeps ``sleep_interval()`` seconds; with a pending
claim that is ``InstanceConcurrencyContext.interval_to_next_pending_claim_check()``, which returns
``min([0, *(ready_at - now)])`` — never above 0 — so the loop never sleeps and the waiting run
takes a whole core (dagster 1.13; docs/upstream-dagster-slot-wait.md). And the CLI captures
SIGTERM/SIGINT (``capture_interrupts``) into a flag that only a step's own code checks, so a run
that waits for a slot cannot be stopped short of ``kill -9``.

:class:`SlotWait` is Dagster's class with these changes: it sleeps until the next claim is
due (at most :data:`MAX_SLEEP` seconds at a time, so a signal is seen within that); it raises
Dagster's own ``DagsterExecutionInterruptedError`` when a signal arrived while the step waited
(Dagster then fails the run and frees its queued claims, and the process's exit skips the final
collection of the objects it loaded); every :data:`RECOVERY_INTERVAL` seconds of waiting it runs
:func:`~musc_pipeline.recovery.recover_runs`, claiming again at once when that freed a slot; and
it tags the run with this host (:data:`~musc_pipeline.recovery.HOST_TAG`), as the in-process
executor runs every step in the process whose pid Dagster logs for the run. :func:`install`
puts it in the in-process executor, whose module looks the class up after a run's resources are
set up; the model resource's setup installs it.
"""

from __future__ import annotations

import atexit
import gc
import time

from dagster import DagsterInstance
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from dagster._core.executor import in_process
from dagster._core.storage.dagster_run import DagsterRun
from dagster._utils.interrupts import pop_captured_interrupt

from musc_pipeline.recovery import recover_runs, tag_run_host

MAX_SLEEP = 1.0  # seconds between checks for a signal while a step waits
RECOVERY_INTERVAL = 2.0  # seconds between looks for dead slot holders while a step waits


class SlotWait(InstanceConcurrencyContext):
    """Dagster's per-run pool-slot claims, waiting without a busy loop (see module doc)."""

    def __init__(self, instance: DagsterInstance, dagster_run: DagsterRun):
        super().__init__(instance, dagster_run)
        self._run = dagster_run
        self._next_recovery = 0.0
        tag_run_host(instance, dagster_run)  # this process executes the steps: its pid is the run's

    def claim(self, concurrency_key: str, step_key: str, step_priority: int = 0) -> bool:
        if pop_captured_interrupt():
            # The process ends next. Its final garbage collection walks every object torch and Dagster
            # loaded: 7 s of a loaded 2-core machine after SIGTERM, 1 s with them frozen first.
            atexit.register(gc.freeze)
            raise DagsterExecutionInterruptedError(
                f"Interrupted while step {step_key} waited for a slot of pool {concurrency_key}")
        if super().claim(concurrency_key, step_key, step_priority):
            return True
        now = time.time()
        if now >= self._next_recovery:
            self._next_recovery = now + RECOVERY_INTERVAL
            if recover_runs(self._instance, self._run, self._report):
                self._pending_timeouts[step_key] = now  # a slot may be free: claim on the next pass
        return False

    def _report(self, line: str) -> None:
        self._instance.report_engine_event(line, self._run)

    def interval_to_next_pending_claim_check(self) -> float:
        if not self._pending_claims:
            return 0.0
        now = time.time()
        due = min((ready_at - now for ready_at in self._pending_timeouts.values()), default=0.0)
        return min(MAX_SLEEP, max(0.01, due))


def install() -> None:
    """Make the in-process executor use :class:`SlotWait` (idempotent)."""
    in_process.InstanceConcurrencyContext = SlotWait
