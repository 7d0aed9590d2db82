"""The Celery task wrappers, run in-process (`Task.apply`), without a broker."""

from __future__ import annotations

import logging

import pytest

runner = pytest.importorskip("worker.runner")
tasks = pytest.importorskip("worker.tasks")


def test_a_job_taken_while_the_worker_stops_goes_back_with_one_line_of_log(caplog):
    runner.SHUTDOWN.set()
    try:
        with caplog.at_level(logging.WARNING, logger="celery.app.trace"):
            result = tasks.train_job.apply(args=["job_taken_on_the_way_out"])
    finally:
        runner.SHUTDOWN.clear()
    assert result.state == "REJECTED"
    (record,) = [r for r in caplog.records if r.name == "celery.app.trace"]
    assert "worker shutting down" in record.getMessage() and record.exc_info is None
    assert "Traceback" not in caplog.text
