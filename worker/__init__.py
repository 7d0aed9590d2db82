"""The Celery worker: thin tasks (`worker/tasks.py`) over the run orchestration
(`worker/runner.py`). Torch is imported only inside the worker process, when a job runs."""
