"""A running job's ETA comes from its current run's own steps: right after a resume it no longer
counts the time the job was down (a job resumed at step 10 of 120 showed 513 s at 0.5-2 s per
step)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from service import jobs as job_service
from service.db import session_scope
from service.models import Job, utcnow
from tests.service.conftest import auth, job_body, make_dataset

TOTAL = 120


def _progress(sessions, job_id: str, owner: str, *steps: int) -> None:
    for step in steps:
        with session_scope(sessions) as session:
            assert job_service.heartbeat(session, job_id, owner, 60, step=step, total_steps=TOTAL)


def _claim(sessions, job_id: str, owner: str, from_step: int) -> None:
    """A run starts as the worker starts one: claimed, then back to its checkpoint's step."""
    with session_scope(sessions) as session:
        assert job_service.claim_job(session, job_id, owner, 60) is not None
        job_service.prepare_resume(session, job_id, from_step=from_step)


def _job(sessions, job_id: str) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def test_the_rate_is_this_runs_steps_over_this_runs_time(client, key, sessions):
    job_id = client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key))).json()["id"]
    _claim(sessions, job_id, "w1", from_step=10)
    _progress(sessions, job_id, "w1", 11, 14)
    job = _job(sessions, job_id)
    assert (job.run_first_step, job.step) == (11, 14)
    # 3 steps in 6 s since the run's first progress: 2 s per step, 106 steps to go.
    assert job_service.eta_seconds(job, now=job.run_first_step_at + timedelta(seconds=6)) == 2 * (TOTAL - 14)


def test_right_after_a_resume_the_downtime_does_not_count(client, key, sessions):
    job_id = client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key))).json()["id"]
    _claim(sessions, job_id, "w1", from_step=0)
    _progress(sessions, job_id, "w1", 5, 12)
    # The worker dies, and the job waits an hour before another one resumes it from step 10.
    with session_scope(sessions) as session:
        an_hour_ago = utcnow() - timedelta(hours=1)
        session.execute(update(Job).where(Job.id == job_id).values(started_at=an_hour_ago, lease_expires_at=an_hour_ago))
        assert job_service.recover_expired_leases(session, max_attempts=3, job_id=job_id)[0] == [job_id]
    _claim(sessions, job_id, "w2", from_step=10)
    assert client.get(f"/jobs/{job_id}", headers=auth(key)).json()["progress"]["eta_seconds"] is None  # no rate yet

    _progress(sessions, job_id, "w2", 11, 13)
    progress = client.get(f"/jobs/{job_id}", headers=auth(key)).json()["progress"]
    assert progress["step"] == 13
    # Measured from an hour ago, as it was, this would be about 8 hours; at this run's rate
    # (steps milliseconds apart) it is a few seconds at most.
    assert progress["eta_seconds"] is not None and progress["eta_seconds"] < 60
