"""Why a run failed, in words for the job's `error` and as one of `service.models.FAILURE_KINDS`
for its `error_kind`: the kind says what a resume can do about it (a smaller micro-batch after
running out of memory; nothing, for data that cannot train), so the API can refuse a resume
that would fail the same way and the CLI can say what to change."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from service.models import FAILURE_KINDS

ERROR_LIMIT = 2000
# How allocators word it: torch.cuda.OutOfMemoryError's "CUDA out of memory", MPS's "MPS
# backend out of memory", the CPU allocator's "DefaultCPUAllocator: can't allocate memory".
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory")


class RunFailure(Exception):
    """A failure whose cause the run knows: ``kind`` (a FAILURE_KINDS key) goes on the job."""

    def __init__(self, kind: str, message: str):
        if kind not in FAILURE_KINDS:
            raise ValueError(f"not a failure kind: {kind!r}")
        super().__init__(message)
        self.kind = kind


@contextmanager
def failing_as(kind: str) -> Iterator[None]:
    """Within the block, an exception (other than running out of memory, which is a kind of
    its own wherever it happens) is a RunFailure of ``kind`` with the exception's message:
    the kind says what went wrong, so the exception's type name would only be noise."""
    try:
        yield
    except RunFailure:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        raise RunFailure(kind, str(exc) or type(exc).__name__) from exc


def is_out_of_memory(exc: BaseException) -> bool:
    message = str(exc).lower()
    return any(words in message for words in _OUT_OF_MEMORY)


def failure_kind(exc: BaseException) -> str:
    if is_out_of_memory(exc):
        return "out_of_memory"
    return exc.kind if isinstance(exc, RunFailure) else "internal"


def describe_error(exc: BaseException) -> str:
    """A message for the job's `error` field: the exception, plus a hint for the usual causes."""
    text = str(exc) if isinstance(exc, RunFailure) else f"{type(exc).__name__}: {exc}"
    if is_out_of_memory(exc):
        text += " (hint: lower micro_batch_size or cutoff_len, or turn on gradient_checkpointing)"
    return text[:ERROR_LIMIT]
