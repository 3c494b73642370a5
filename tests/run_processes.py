"""Helpers for tests that run real Dagster processes against a real instance and signal them."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance


def wait_for(what: str, condition, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.5):
    """condition()'s first truthy value, polled; fails when ``proc`` exits first or after ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def step_event_time(instance: DagsterInstance, run_id: str, step: str,
                    event: DagsterEventType = DagsterEventType.STEP_START) -> float | None:
    """When a step of a run logged ``event`` (first time), or None."""
    for record in instance.all_logs(run_id, of_type=event):
        if record.step_key == step:
            return record.timestamp
    return None


def _holds_no_sqlite_lock(home: str) -> bool:
    """Whether every SQLite file of the instance can take a write lock at once."""
    for db in Path(home).rglob("*.db"):
        con = sqlite3.connect(db, timeout=0)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.rollback()
        except sqlite3.OperationalError:
            return False
        finally:
            con.close()
    return True


def freeze(proc: subprocess.Popen, home: str, tries: int = 200) -> None:
    """SIGSTOP a process group between two of its writes to the instance's SQLite storage: one
    frozen inside a write would hold the lock, and every other process's write would fail."""
    for _ in range(tries):
        os.killpg(proc.pid, signal.SIGSTOP)
        if _holds_no_sqlite_lock(home):
            return
        os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError(f"process {proc.pid} held a SQLite lock of {home} at each of {tries} tries")


def stop(proc: subprocess.Popen) -> None:
    """End a process group started by the test (SIGTERM, then SIGKILL after 30 s)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGCONT)  # a stopped group cannot act on SIGTERM
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
