"""Code location for running steps on Celery workers (Dagster's ``dagster-celery`` executor).

The same assets and settings as :mod:`musc_pipeline.definitions`; only the executor differs:
each step of a run becomes a Celery task that any worker listening on the broker may take.
Workers and the process that launches runs share ``$DAGSTER_HOME`` (the instance), the
settings file (``$MUSC_CONFIG``) and the storage location (a shared path or an fsspec URL).
See README "Scaling out" for the recipe; ``tests/test_celery.py`` runs it on loopback.
"""

from dagster_celery import celery_executor

from musc_pipeline.definitions import build_definitions

defs = build_definitions(executor=celery_executor)


def category_job(profile: str = "musc"):
    """The per-category job of a profile, resolved for execution (reconstructable by name)."""
    return defs.resolve_job_def(f"{profile}_categories")


def musc_categories():
    return category_job("musc")
