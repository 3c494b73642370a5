"""A run killed with kill -9 inside a model step gives its pool slot back without a human.

Real instance (the shipped dagster.yaml on a temporary DAGSTER_HOME), the real daemon of
`dagster dev` (run monitoring), real runs of the README's CLI, a real SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

from conftest import REPO
from run_processes import step_event_time, stop, wait_for

BIN = Path(sys.executable).parent
POOL = "musc_model"


def _materialize(tmp_path: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "musc_pipeline.definitions",
         "--select", "musc/image_manifest,musc/backbone_features", "--partition", "mini/cat1"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def test_run_killed_in_backbone_features_frees_its_slot_and_the_next_run_completes(tmp_path, mini_root):
    cfg = tmp_path / "musc.yaml"
    cfg.write_text(f"storage: {tmp_path / 'store'}\ndatasets:\n  mini: {{root: {mini_root}}}\n"
                   "profiles:\n  musc: {backbone: {name: efficientnet_lite0}}\n")
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")  # the instance config we ship
    env = dict(os.environ, MUSC_CONFIG=str(cfg), DAGSTER_HOME=str(home))
    # Create the instance's SQLite storages before three processes open them at once: each would stamp its own
    # alembic revision row into a fresh schedule database ("more than one head present", seen once in CI).
    DagsterInstance.from_config(str(home)).dispose()
    daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = second = None
    try:
        first = _materialize(tmp_path, env)
        with DagsterInstance.from_config(str(home)) as instance:
            run_id = wait_for("first run created", lambda: [r.run_id for r in instance.get_runs()], 300, first)[0]
            wait_for("first run in backbone_features", lambda: step_event_time(instance, run_id, "musc__embed"),
                     300, first)
            assert instance.event_log_storage.get_concurrency_info(POOL).active_run_ids == {run_id}
            os.killpg(first.pid, signal.SIGKILL)  # the run's only process: all steps run in it
            killed_at = time.time()
            first.wait(timeout=30)
            assert instance.get_run_by_id(run_id).status == DagsterRunStatus.STARTED  # nothing told Dagster
            # the daemon's run monitoring finds it (a later run would too: tests/test_cli_recovery.py)
            wait_for("daemon failed the killed run", lambda: instance.get_run_by_id(run_id).is_finished, 120)

            second = _materialize(tmp_path, env)  # blocked on the pool until the slot is handed back
            assert second.wait(timeout=400) == 0, second.stderr.read()[-3000:]
            (second_id,) = [r.run_id for r in instance.get_runs() if r.run_id != run_id]
            got_slot = step_event_time(instance, second_id, "musc__embed")
            dead = instance.get_run_by_id(run_id)
            assert dead.status == DagsterRunStatus.FAILURE
            failure = instance.all_logs(run_id, of_type=DagsterEventType.RUN_FAILURE)[-1]
            assert "is gone (killed or crashed)" in failure.dagster_event.message
            assert not instance.event_log_storage.get_concurrency_info(POOL).active_run_ids
        assert (tmp_path / "store" / "musc" / "backbone_features" / "mini" / "cat1.safetensors").is_file()
        print(f"recovery: slot free and the next run's backbone_features started {got_slot - killed_at:.1f} s after kill -9")
    finally:
        for proc in (first, second, daemon):
            if proc is not None:
                stop(proc)
