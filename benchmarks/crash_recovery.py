"""Crash recovery benchmark: a run killed with kill -9 inside ``random_vit__msm_scores``, then what.

For each path, on a fresh DAGSTER_HOME with the shipped deploy/dagster.yaml, a CLI run
(``dagster asset materialize``) of one partition is killed with SIGKILL right after its
``msm_scores`` step starts (it holds the ``musc_model`` slot), and the table gives the seconds
from the kill to: the killed run marked failed, its slot free, and the next run's first model
step (``random_vit__embed``) started.

- ``daemon``: ``dagster-daemon run`` (what ``dagster dev`` runs), no new run: run monitoring
  alone (``poll_interval_seconds`` 10, ``free_slots_after_run_end_seconds`` 5);
- ``cli``: no daemon; the same CLI command run again right after the kill;
- ``python``: no daemon; ``materialize`` in this (already warm) process right after the kill.

The workload is the tests' (tests/conftest.make_category: 10 images of the PIPED demo), the
random_vit profile at 112 px, so a run takes seconds and the times are mostly recovery and
process start-up.

Run:  .venv/bin/python benchmarks/crash_recovery.py            (prints the table; ~2 min)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from dagster import AssetKey, DagsterInstance, materialize  # noqa: E402

from conftest import make_category  # noqa: E402
from musc_pipeline.definitions import build_definitions  # noqa: E402
from musc_pipeline.settings import load_settings  # noqa: E402
from run_processes import step_event_time, stop, wait_for  # noqa: E402

BIN = Path(sys.executable).parent
KEY = "mini/cat1"
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
CLI = [str(BIN / "dagster"), "asset", "materialize", "-m", "musc_pipeline.definitions",
       "--select", "*random_vit/category_metrics", "--partition", KEY]


def _site(root: Path, data: Path) -> dict:
    (root / "home").mkdir(parents=True)
    (root / "musc.yaml").write_text(
        f"storage: {root / 'store'}\nreports_dir: {root / 'reports'}\ndatasets:\n  mini: {{root: {data}}}\n"
        "profiles:\n  random_vit: {backbone: {name: ViT-B-16, weights: random, image_size: 112, seed: 0}}\n")
    shutil.copy(REPO / "deploy" / "dagster.yaml", root / "home" / "dagster.yaml")
    DagsterInstance.from_config(str(root / "home")).dispose()
    return dict(os.environ, MUSC_CONFIG=str(root / "musc.yaml"), DAGSTER_HOME=str(root / "home"),
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _kill_in_msm(instance: DagsterInstance, env: dict) -> tuple[str, float]:
    """Start the CLI run, SIGKILL it as soon as msm_scores starts; (its run id, when it was killed)."""
    first = _start(CLI, env)
    run_id = wait_for("run created", lambda: [r.run_id for r in instance.get_runs()], 300, first, poll=0.1)[0]
    wait_for("run in msm_scores", lambda: step_event_time(instance, run_id, "random_vit__msm_scores"), 300, first,
             poll=0.1)
    os.killpg(first.pid, signal.SIGKILL)
    killed_at = time.time()
    first.wait()
    return run_id, killed_at


class Watch(threading.Thread):
    """From the kill on, polls when the killed run is marked failed and when its slots are free."""

    def __init__(self, instance: DagsterInstance, run_id: str):
        super().__init__(daemon=True)
        self.instance, self.run_id = instance, run_id
        self.failed_at = self.free_at = None

    def run(self) -> None:
        while self.failed_at is None or self.free_at is None:
            now = time.time()
            if self.failed_at is None and self.instance.get_run_by_id(self.run_id).is_finished:
                self.failed_at = now
            if self.free_at is None and self.run_id not in self.instance.event_log_storage.get_concurrency_run_ids():
                self.free_at = now
            time.sleep(0.2)


def _next_run(instance: DagsterInstance, killed_id: str, killed_at: float) -> float:
    (run_id,) = [r.run_id for r in instance.get_runs() if r.run_id != killed_id]
    return step_event_time(instance, run_id, "random_vit__embed") - killed_at


def measure(path: str, root: Path, data: Path) -> tuple[float, float, float | None]:
    env = _site(root, data)
    defs = build_definitions(load_settings(env["MUSC_CONFIG"]))
    assets = [defs.resolve_assets_def(AssetKey(["random_vit", n])) for n in ("image_manifest", "backbone_features")]
    daemon = second = None
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        try:
            if path == "daemon":
                daemon = _start([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], env)
            killed_id, killed_at = _kill_in_msm(instance, env)
            watch = Watch(instance, killed_id)
            watch.start()
            if path == "cli":
                second = _start(CLI, env)
                assert second.wait(timeout=300) == 0, second.stderr.read()[-3000:]
            elif path == "python":
                assert materialize(assets, partition_key=KEY, instance=instance, run_config=QUIET).success
            watch.join(timeout=300)
            step = None if path == "daemon" else _next_run(instance, killed_id, killed_at)
            return watch.failed_at - killed_at, watch.free_at - killed_at, step
        finally:
            for proc in (second, daemon):
                if proc is not None:
                    stop(proc)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_category(data, "cat1")
        rows = [(path, *measure(path, Path(tmp) / path, data)) for path in ("daemon", "cli", "python")]
    print(f"{'path':8} {'kill→failed s':>14} {'kill→slot free s':>17} {'kill→next model step s':>23}")
    for path, failed, free, step in rows:
        print(f"{path:8} {failed:14.1f} {free:17.1f} {'—' if step is None else f'{step:.1f}':>23}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
