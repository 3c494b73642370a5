"""Every command the README shows either runs here, as written, or is covered by a named test.

The README's ``bash`` and ``python`` blocks are parsed into commands. The cheap ones run in a
user's folder holding a small copy of the demo data (one category of 4 + 4 images, both demo
profiles): ``make demo``, the Python snippet, the SQL query. The others (the test suite itself,
the UI, the CLI run of a full-size category, Celery) are listed in ``COVERED`` with the test that
runs them; a README command that is in neither list fails the test, so the README cannot promise
a command that nothing checks.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_category

README = REPO / "README.md"

# command prefix -> the test (file::function) that runs it
COVERED = {
    "make test": "tests/test_readme.py::test_every_readme_command_is_run_or_covered",  # this suite
    "make dev": "tests/test_webserver.py::test_make_dev_serves_asset_graph_without_warnings",
    "make studies": "tests/test_studies.py::test_a_study_job_runs_its_own_study_of_the_shared_reaggregation",
    ".venv/bin/dg launch": "tests/test_pipeline.py::test_cli_materialize_one_partition",
    "redis-server": "tests/test_celery.py::test_three_partitions_on_two_celery_workers",
    "export DAGSTER_HOME=": "tests/test_celery.py::test_three_partitions_on_two_celery_workers",
    "dagster-celery worker start": "tests/test_celery.py::test_three_partitions_on_two_celery_workers",
    "dagster dev -m musc_pipeline.celery_definitions": "tests/test_celery.py::test_three_partitions_on_two_celery_workers",
}
RUN_HERE = ("make demo", "make plan", ".venv/bin/python -c", "python:")


def readme_commands(text: str) -> list[str]:
    """Shell commands of the ``bash`` blocks (quotes may span lines) and the ``python`` blocks,
    each of the latter as one command ``python:<source>``."""
    commands = []
    for lang, body in re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.S):
        if lang == "python":
            commands.append("python:" + body)
            continue
        pending = ""
        for line in body.splitlines():
            pending += line + "\n"
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # an open quote: the command goes on on the next line
                continue
            if words:
                commands.append(pending.strip())
            pending = ""
        assert not pending.strip(), f"unterminated command in README: {pending!r}"
    return commands


def _test_exists(node: str) -> bool:
    path, name = node.split("::")
    tree = ast.parse((REPO / path).read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body)


def test_readme_parser_joins_quoted_lines_and_drops_comment_lines():
    text = "```bash\n# a comment\nmake demo   # note\npython -c \"a\nb\"\n```\n```python\nx = 1\n```\n"
    assert readme_commands(text) == ["make demo   # note", 'python -c "a\nb"', "python:x = 1\n"]


def test_every_readme_command_is_run_or_covered():
    commands = readme_commands(README.read_text())
    assert len(commands) >= 8
    for node in set(COVERED.values()):
        assert _test_exists(node), f"COVERED names a test that does not exist: {node}"
    unaccounted = [c for c in commands if not c.startswith(RUN_HERE) and not c.startswith(tuple(COVERED))]
    assert not unaccounted, f"README commands neither run by this test nor covered by a named one: {unaccounted}"


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> tuple[Path, dict]:
    """A folder with a musc.yaml naming a small demo dataset and both demo profiles."""
    tmp = tmp_path_factory.mktemp("readme")
    make_category(tmp / "data", "PA_BDP01_TL", n=4)
    (tmp / "musc.yaml").write_text(
        "storage: .musc\nreports_dir: reports\n"
        "datasets:\n  demo: {root: data, layout: mvtec}\n"
        "profiles:\n"
        "  musc: {backbone: {name: auto}}\n"
        "  random_vit: {backbone: {name: ViT-B-16, weights: random, image_size: 224, seed: 0}}\n")
    (tmp / "home").mkdir()
    (tmp / ".venv").symlink_to(Path(sys.executable).parent.parent)  # the README's .venv/bin/…
    env = dict(os.environ, MUSC_CONFIG=str(tmp / "musc.yaml"), DAGSTER_HOME=str(tmp / "home"),
               HF_HOME=str(tmp / "hf"), HF_HUB_OFFLINE="1")  # no hub cache: `auto` is the offline backbone
    return tmp, env


def _readme_command(prefix: str) -> str:
    (command,) = [c for c in readme_commands(README.read_text()) if c.startswith(prefix)]
    return command


def _run_make(prefix: str, env: dict, timeout: int) -> str:
    """The README's ``make`` command starting with ``prefix``, run in the repo; its stdout."""
    make = shlex.split(_readme_command(prefix), comments=True)
    # -o: the installed .venv counts as up to date (the suite runs inside it)
    proc = subprocess.run([make[0], "-o", ".venv/.installed", *make[1:]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_make_demo_prints_the_headline_and_where_the_report_is(user_folder):
    tmp, env = user_folder
    out = _run_make("make demo", env, 900)
    assert re.search(r"random_vit\s+demo\s+PA_BDP01_TL\s+vit-b-16", out, flags=re.I), out
    assert re.search(r"musc\s+all\s+mean", out), out
    report = re.search(r"^Report: (.+)$", out, flags=re.M).group(1)
    assert (tmp / report).is_file() and (tmp / report).name == "index.html"


def test_make_plan_names_each_profile_s_backbone_and_the_categories(user_folder):
    _, env = user_folder
    out = _run_make("make plan", env, 300)
    for expected in ("musc", "efficientnet_lite0", "random_vit", "ViT-B-16", "PA_BDP01_TL"):
        assert expected in out, out


def test_python_snippet_and_sql_query_run_as_written(user_folder):
    tmp, env = user_folder
    snippet = _readme_command("python:")[len("python:"):]
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sql = subprocess.run(["bash", "-c", _readme_command(".venv/bin/python -c")], cwd=tmp, env=env,
                         capture_output=True, text=True, timeout=120)
    assert sql.returncode == 0, sql.stderr[-3000:]
    assert "PA_BDP01_TL" in sql.stdout and "random_vit" in sql.stdout, sql.stdout
