"""Request and response bodies. `*Create` are what clients send, `*Public` what they get back;
the ORM rows (`service.models`) never leave the API as they are."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StringConstraints, ValidationInfo, field_validator

from service import generations as generation_service
from service import jobs as job_service
from service.models import FAILURE_KINDS, BaseModelEntry, Checkpoint, Dataset, Generation, Job, JobMetric

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FailureKind = Literal[tuple(FAILURE_KINDS)]  # type: ignore[valid-type]

# Steps are stored as 32-bit integers: a larger cursor cannot match and would overflow the query.
MAX_STEP = 2**31 - 1


def _no_nul(text: str) -> str:
    # PostgreSQL refuses NUL in text and JSONB, so a NUL would otherwise surface as a 500.
    if "\x00" in text:
        raise ValueError("must not contain a NUL character (\\u0000)")
    return text


Text = Annotated[str, AfterValidator(_no_nul)]
"""A string from a client: a request body field, a path id or a query cursor."""


def text_of_length(min_length: int | None = None, max_length: int | None = None) -> Any:
    """`Text` with a length limit, for optional fields: on `Text | None`, a `Field` limit is
    checked as a sequence's ("at most 64 items"), not a string's ("at most 64 characters")."""
    return Annotated[str, StringConstraints(min_length=min_length, max_length=max_length), AfterValidator(_no_nul)]


def json_type(value: Any) -> str:
    return {bool: "a boolean", str: "a string"}.get(type(value), type(value).__name__)


# Request bodies: no NaN or infinity (JSON has no such numbers, but Python's parser reads
# `NaN` and `1e999`, and PostgreSQL's JSONB refuses them), no unknown fields.
REQUEST_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


class FieldError(BaseModel):
    loc: list[str | int]
    field: str = Field(description="the field path, e.g. body.allocation")
    msg: str


class ErrorResponse(BaseModel):
    detail: str = Field(description="what went wrong, for a person")
    errors: list[FieldError] | None = Field(None, description="per-field problems (422 only)")
    report: dict[str, Any] | None = Field(None, description="the dataset report of a rejected upload")


# ---- models --------------------------------------------------------------------------------
class BaseModelPublic(BaseModel):
    name: str
    model_type: str
    num_layers: int = Field(description="decoder layers: the length of an explicit allocation list")
    hidden_size: int
    target_modules: list[str] = Field(description="modules adapted by default")
    linear_modules: list[str] = Field(description="every module name that target_modules may list")
    max_positions: int | None = Field(description="the longest sequence the model takes: the limit of cutoff_len (null: unknown)")

    @classmethod
    def of(cls, row: BaseModelEntry) -> "BaseModelPublic":
        return cls(
            name=row.name,
            model_type=row.model_type,
            num_layers=row.num_layers,
            hidden_size=row.hidden_size,
            target_modules=list(row.target_modules),
            linear_modules=list(row.linear_modules),
            max_positions=row.max_positions,
        )


class BaseModelList(BaseModel):
    data: list[BaseModelPublic]


# ---- datasets ------------------------------------------------------------------------------
class TokenCounts(BaseModel):
    status: Literal["pending", "ready", "failed"] | None = Field(
        description="pending until the quick job has counted; null for datasets uploaded before token counts existed"
    )
    models: dict[str, dict[str, Any]] = Field(
        description=(
            "per base model of GET /models: total_tokens, mean_tokens, max_tokens, cutoff_len (the "
            "default of a job), over_cutoff (rows a job would cut), dropped_at_cutoff, valid_rows, "
            "unrenderable (the first rows the model's tokenizer cannot render, as {line, message})"
        )
    )
    error: str | None = Field(None, description="why counting failed, for all models or the ones named")


class DatasetPublic(BaseModel):
    id: str
    filename: str
    format: str | None = Field(description="alpaca, chat, completion, text or mixed")
    rows: int
    size_bytes: int
    sha256: str
    created_at: datetime
    report: dict[str, Any] = Field(description="the validation report: rows, formats, errors")
    token_stats: dict[str, Any] = Field(description="token statistics per base model, filled in by the jobs that tokenized it")
    token_counts: TokenCounts = Field(description="token counts per base model at the default cutoff, from a quick job after the upload")

    @classmethod
    def of(cls, row: Dataset) -> "DatasetPublic":
        return cls(
            id=row.id,
            filename=row.filename,
            format=row.format,
            rows=row.rows,
            size_bytes=row.size_bytes,
            sha256=row.sha256,
            created_at=row.created_at,
            report=row.report or {},
            token_stats=row.token_stats or {},
            token_counts=TokenCounts(status=row.token_counts_status, models=row.token_counts or {}, error=row.token_counts_error),
        )


class DatasetList(BaseModel):
    data: list[DatasetPublic]
    has_more: bool
    last_id: str | None


class Deleted(BaseModel):
    id: str
    deleted: bool = True


# ---- jobs ----------------------------------------------------------------------------------
class AllocationPreset(BaseModel):
    model_config = REQUEST_CONFIG
    preset: Text = Field(description="rectangle, triangle, inverted_triangle or hourglass")
    average: float = Field(description="mean experts per layer; the total is average * layers")


class Hyperparameters(BaseModel):
    """Training and adapter options; anything left out takes the default shown."""

    model_config = REQUEST_CONFIG

    epochs: float = Field(3.0, gt=0, le=1000, description="passes over the data (ignored if max_steps is set)")
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="optimizer steps; overrides epochs")
    learning_rate: float = Field(3e-4, gt=0, lt=1)
    batch_size: int = Field(16, ge=1, le=8192, description="examples per optimizer step")
    micro_batch_size: int = Field(4, ge=1, le=8192, description="examples per forward pass (gradient accumulation)")
    cutoff_len: int = Field(256, ge=8, le=131072, description="tokens kept per example")
    train_on_inputs: StrictBool = Field(False, description="also learn the prompt tokens")
    warmup_steps: int | None = Field(None, ge=0, le=10_000_000, description="default: 3% of the steps")
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0, le=10)
    max_grad_norm: float | None = Field(1.0, ge=0, le=1e6, description="gradient clipping; null: none")
    seed: int = Field(42, ge=0, le=2**32 - 1)
    bf16: StrictBool | None = Field(None, description="bf16 autocast; default: on where the GPU supports it")
    gradient_checkpointing: StrictBool = False
    torch_compile: StrictBool = Field(False, description="torch.compile the training forward: faster steps after minutes of compiling")
    eval_every: int | None = Field(None, ge=1, le=10_000_000, description="evaluate on the validation set every N steps")
    checkpoint_every: int | None = Field(None, ge=1, le=10_000_000, description="save a checkpoint every N steps")
    eval_generate_rows: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="at each evaluation, also generate (greedy) the completions of the first N validation rows: "
        "eval_exact_match, and eval_answer_accuracy where the references say 'the answer is X'",
    )
    rank: int = Field(8, ge=1, le=4096, description="LoRA rank of every expert")
    alpha: float = Field(16.0, gt=0, le=1e6)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[Text] | None = Field(None, min_length=1, description="default: the model's target_modules")
    aux_loss_coef: float = Field(0.001, ge=0, le=1e3, description="weight of the load-balancing loss (mola)")

    @field_validator(
        "epochs", "max_steps", "learning_rate", "batch_size", "micro_batch_size", "cutoff_len",
        "warmup_steps", "weight_decay", "max_grad_norm", "seed", "eval_every", "checkpoint_every",
        "eval_generate_rows", "rank", "alpha", "dropout", "aux_loss_coef",
        mode="before",
    )
    @classmethod
    def _numbers_are_numbers(cls, value: Any) -> Any:
        # Lax parsing would read "3" as 3 and true as 1.0: a typo should not start a job.
        if isinstance(value, (str, bool)):
            raise ValueError(f"must be a number, not {json_type(value)}")
        return value

    @field_validator(
        "max_steps", "batch_size", "micro_batch_size", "cutoff_len", "warmup_steps", "seed",
        "eval_every", "checkpoint_every", "eval_generate_rows", "rank",
        mode="before",
    )
    @classmethod
    def _whole_numbers_in_range(cls, value: Any, info: ValidationInfo) -> Any:
        # One message for every way a count can be wrong: pydantic's own say "Unable to parse
        # input string as an integer" for 1e30 (a number, not a string) and give no range.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = _bounds(cls.model_fields[info.field_name].metadata)
            if (isinstance(value, float) and not value.is_integer()) or not low <= value <= high:
                raise ValueError(f"must be a whole number within [{low}, {high}]")
        return value


def _bounds(constraints: list[Any]) -> tuple[int, int]:
    """The inclusive range of an integer field from its `ge`/`le` constraints."""
    low = next(c.ge for c in constraints if hasattr(c, "ge"))
    high = next(c.le for c in constraints if hasattr(c, "le"))
    return low, high


class JobCreate(BaseModel):
    model_config = REQUEST_CONFIG

    base_model: Text = Field(min_length=1, max_length=200, description="a name from GET /models")
    dataset_id: Text = Field(min_length=1, max_length=40)
    validation_dataset_id: text_of_length(1, 40) | None = None
    method: Literal["mola", "lora"] = "mola"
    allocation: list[int] | str | AllocationPreset | None = Field(
        None,
        description=(
            "experts per layer (mola): a list with one count per layer, a digit string in the "
            "paper's notation ('2468': quarters of the layers get 2, 4, 6, 8), a comma string, or "
            "{preset, average}. Default '2468'."
        ),
        examples=["2468", [2, 2, 4, 4], {"preset": "inverted_triangle", "average": 5}],
    )
    top_k: int | list[int] | None = Field(None, description="experts mixed per token (mola), one for all layers or one per layer; default 2")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    suffix: text_of_length(max_length=64) | None = Field(None, description="a label for the adapter")
    webhook_url: text_of_length(1, 2048) | None = Field(
        None,
        description="POSTed a signed event when the job ends (`job.succeeded`, `job.failed`, `job.cancelled`): see GET /webhooks/secret",
        examples=["https://ci.example.com/hooks/mola"],
    )

    @field_validator("allocation", mode="before")
    @classmethod
    def _allocation_shape(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError("allocation list entries must be whole numbers (experts per layer)")
            return value
        if isinstance(value, dict):
            if set(value) != {"preset", "average"} or not isinstance(value["preset"], str) or isinstance(value["average"], bool) or not isinstance(value["average"], (int, float)):
                raise ValueError("an allocation preset is {'preset': NAME, 'average': NUMBER}")
            if not math.isfinite(value["average"]):
                raise ValueError(f"an allocation preset's average must be a finite number, got {value['average']}")
            return value
        raise ValueError(
            "allocation must be a list with one expert count per layer, a string such as '2468', "
            "or {'preset': NAME, 'average': NUMBER}"
        )

    @field_validator("hyperparameters", mode="before")
    @classmethod
    def _no_hyperparameters(cls, value: Any) -> Any:
        return {} if value is None else value  # null, like a missing field: every default

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k_shape(cls, value: Any) -> Any:
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        raise ValueError("top_k must be a whole number or a list of whole numbers, one per layer")


class JobResume(BaseModel):
    model_config = REQUEST_CONFIG

    hyperparameters: Hyperparameters | None = Field(
        None,
        description=(
            "only what changes how the steps run, not what they train: "
            f"{', '.join(job_service.RESUMABLE_HYPERPARAMETERS)} (a smaller micro_batch_size after "
            "running out of memory, say); anything left out stays as it was"
        ),
    )

    def changes(self) -> dict[str, Any]:
        """The hyperparameters the client sent (not the defaults filled in for the rest)."""
        if self.hyperparameters is None:
            return {}
        return self.hyperparameters.model_dump(mode="json", include=self.hyperparameters.model_fields_set)


class SplitPlan(BaseModel):
    dataset_id: str
    rows: int = Field(description="the upload's valid rows (those the model's tokenizer renders, once counted)")
    examples: int = Field(description="the rows the run trains on: less those the cut at cutoff_len leaves without a trainable token")
    exact: bool = Field(description="examples come from the upload's token counts for this model and cutoff_len; false: the row count, an upper bound")
    over_cutoff: int | None = Field(description="rows longer than cutoff_len (cut to it)")
    dropped_at_cutoff: int | None = Field(description="rows left out: the cut leaves them no trainable token")
    basis: str = Field(description="what the numbers come from")


class SchedulePlan(BaseModel):
    epochs: float = Field(description="passes over the examples (with max_steps: what that many steps make)")
    steps_per_epoch: int | None
    total_steps: int | None = Field(description="optimizer steps: max_steps, or epochs x steps_per_epoch")
    warmup_steps: int | None = Field(description="warmup_steps, or 3% of the steps")
    micro_batches_per_step: int = Field(description="forward and backward passes per step: ceil(batch_size / micro_batch_size)")
    exact: bool = Field(description="false when the steps follow from estimated examples")


class JobPlan(BaseModel):
    """What `POST /jobs` with the same body would create and run, without creating it."""

    base_model: str
    method: str
    allocation: list[int] | None = Field(description="experts per layer, expanded")
    top_k: list[int] | None = Field(description="top-k per layer, expanded")
    hyperparameters: dict[str, Any] = Field(description="every value, defaults filled in, as the job would have them")
    adapter_parameters: int | None = Field(description="trainable parameters of the adapter, counted from the base model's shapes")
    data: dict[str, SplitPlan | None] = Field(description='{"train": ..., "validation": ... or null}')
    schedule: SchedulePlan
    warnings: list[str] = Field(description="rows that will be cut; numbers that are estimates")
    equal_size_lora: dict[str, int] | None = Field(
        description='a MoLA job\'s baseline: the plain LoRA rank on the same targets whose adapter is closest in size, '
        '`{"rank", "adapter_parameters"}` (null for a LoRA job)'
    )

    @classmethod
    def of(cls, spec: dict[str, Any], planned: dict[str, Any]) -> "JobPlan":
        return cls(
            base_model=spec["base_model"],
            method=spec["method"],
            allocation=spec["experts_per_layer"],
            top_k=spec["top_k_per_layer"],
            hyperparameters=spec["hyperparameters"],
            adapter_parameters=spec["adapter_parameters"],
            **planned,
        )


class JobProgress(BaseModel):
    step: int
    total_steps: int | None
    epoch: float | None
    fraction: float | None = Field(description="step / total_steps")
    eta_seconds: float | None


class QueuePlace(BaseModel):
    """Where a queued job or generation stands."""

    name: str = Field(description="the Celery queue it waits on")
    workers: int = Field(description="live workers consuming that queue (0: nothing will run it until one starts)")
    ahead: int = Field(description="queued jobs and generations that went to that queue before it, all tenants (a resumed job goes to the back)")
    running: int = Field(description="jobs and generations of that queue running now")


class QueueState(BaseModel):
    name: str
    carries: list[Literal["jobs", "generations", "token counts", "webhooks"]] = Field(description="what the service sends to this queue")
    workers: int = Field(description="live workers consuming it (seen within three reconciler passes)")
    waiting: int = Field(description="queued jobs and generations, pending token counts, webhooks due: all tenants")
    running: int | None = Field(description="jobs and generations running now (null for token counts and webhooks: not recorded)")


class QueueList(BaseModel):
    data: list[QueueState]


class JobPublic(BaseModel):
    id: str
    status: JobStatus
    base_model: str
    method: str
    dataset_id: str
    validation_dataset_id: str | None
    allocation: list[int] | None = Field(description="experts per layer, expanded")
    top_k: list[int] | None = Field(description="top-k per layer, expanded")
    allocation_spec: Any = Field(description="the allocation as it was requested")
    hyperparameters: dict[str, Any]
    adapter_parameters: int | None = Field(
        description="trainable parameters of the adapter (experts, routers), counted from the base model's shapes "
        "when the job was created (null for jobs created before the catalogue recorded them)"
    )
    suffix: str | None
    webhook_url: str | None = Field(description="where the job's end is POSTed (GET /jobs/{id}/webhooks: the deliveries)")
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested: bool
    progress: JobProgress
    data: dict[str, Any] | None = Field(
        description='what the run tokenized, once it has: {"train": {records, examples, over_cutoff, '
        "dropped_at_cutoff, total_tokens, trainable_tokens, mean_tokens, max_tokens, cutoff_len, "
        'train_on_inputs}, "validation": {...}} (validation only with a validation set)'
    )
    error: str | None
    error_kind: FailureKind | None = Field(
        description="a failed job's cause, by what a resume can do about it: "
        + "; ".join(f"`{kind}`: {what}" for kind, what in FAILURE_KINDS.items())
        + " (null: not failed, or failed before causes were recorded)"
    )
    result: dict[str, Any] | None
    adapter_available: bool
    attempts: int
    queue: QueuePlace | None = Field(
        None, description="while queued, where it stands (in the answers about this one job: not in lists)"
    )

    @classmethod
    def of(cls, job: Job, queue: dict[str, Any] | None = None) -> "JobPublic":
        spec = job.spec or {}
        total = job.total_steps
        return cls(
            id=job.id,
            status=job.status,  # type: ignore[arg-type]
            base_model=job.base_model,
            method=job.method,
            dataset_id=job.dataset_id,
            validation_dataset_id=job.validation_dataset_id,
            allocation=spec.get("experts_per_layer"),
            top_k=spec.get("top_k_per_layer"),
            allocation_spec=spec.get("allocation_spec"),
            hyperparameters=spec.get("hyperparameters") or {},
            adapter_parameters=spec.get("adapter_parameters"),
            suffix=spec.get("suffix"),
            webhook_url=spec.get("webhook_url"),
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            cancel_requested=job.cancel_requested_at is not None,
            progress=JobProgress(
                step=job.step,
                total_steps=total,
                epoch=job.epoch,
                fraction=(job.step / total) if total else None,
                eta_seconds=job_service.eta_seconds(job),
            ),
            data=job.data_stats,
            error=job.error,
            error_kind=job.error_kind if job.status == "failed" else None,
            result=job.result,
            adapter_available=job.adapter_key is not None,
            attempts=job.attempts,
            queue=queue,
        )


class JobList(BaseModel):
    data: list[JobPublic]
    has_more: bool
    last_id: str | None = Field(description="pass as ?after= for the next page")


class MetricPublic(BaseModel):
    step: int
    kind: Literal["train", "eval"] | str
    created_at: datetime
    metrics: dict[str, Any] = Field(description="train: loss, lm_loss, aux_loss, lr, grad_norm, tokens_per_s, epoch, ...; eval: eval_loss, ...")

    @classmethod
    def of(cls, row: JobMetric) -> "MetricPublic":
        return cls(step=row.step, kind=row.kind, created_at=row.created_at, metrics=row.values)


class MetricList(BaseModel):
    data: list[MetricPublic]
    has_more: bool
    last_step: int | None = Field(description="pass as ?after_step= to continue")


class CheckpointPublic(BaseModel):
    step: int
    created_at: datetime
    size_bytes: int = Field(description="the stored checkpoint: adapter, optimizer state and the downloadable archive")
    metrics: dict[str, Any] = Field(description="epoch, and the step's loss and eval_loss when the run reported them at that step")
    best: bool = Field(False, description="the checkpoint with the lowest eval_loss of the job's (never pruned)")

    @classmethod
    def of(cls, row: Checkpoint, best: bool = False) -> "CheckpointPublic":
        return cls(step=row.step, created_at=row.created_at, size_bytes=row.size_bytes, metrics=row.metrics or {}, best=best)


class CheckpointList(BaseModel):
    data: list[CheckpointPublic]


class ExpertRow(BaseModel):
    """One layer's (or one module's) experts: lists run over the experts, in order."""

    layer: int
    num_experts: int
    top_k: int
    tokens: int = Field(description="tokens routed (by each module of the layer)")
    modules: int | None = Field(None, description="a layer's row: its MoLA modules, whose routing it pools")
    selection_share: list[float | None] = Field(description="share of the tokens whose top-k includes the expert; sums to top_k")
    mean_weight: list[float | None] = Field(description="mean routing weight the expert received; sums to 1")
    mean_prob: list[float | None] = Field(description="mean router probability before top-k; sums to 1")
    max_load: float | None = Field(description="the busiest expert's selection share over the fair share top_k / num_experts (1: balanced); a layer's: the largest of its modules'")
    min_load: float | None = Field(description="the idlest expert's, likewise (near 0: an expert its router no longer uses); a layer's: the smallest of its modules'")
    balance_loss: float | None = Field(description="the Switch Transformer balance loss of these decisions (1 when uniform); a layer's pools its modules, as training does")
    mean_distance: float | None = Field(description="mean Frobenius distance between the experts' updates s*B_e*A_e (null: one expert)")
    mean_norm: float | None = Field(description="mean Frobenius norm of the experts' updates")
    relative_distance: float | None = Field(description="mean_distance / mean_norm: low means redundant experts (null: one expert, or untrained)")


class JobAnalysis(BaseModel):
    job_id: str
    status: Literal["ready", "failed"] = Field(description="failed: `error` says why; the job's adapter is unaffected")
    error: str | None = None
    split: Literal["validation", "train"] | None = Field(None, description="the examples routed: the validation set when the job has one")
    examples: int | None = Field(None, description="examples routed (the first 256 of the split)")
    tokens: int | None = Field(None, description="tokens routed, padding excluded")
    layers: list[ExpertRow] = Field(default_factory=list, description="per decoder layer, pooling its modules")
    modules: dict[str, ExpertRow] = Field(default_factory=dict, description="per adapted module, by its path in the model")

    @classmethod
    def of(cls, job_id: str, stored: dict[str, Any]) -> "JobAnalysis":
        return cls(job_id=job_id, **stored)


class ComparedJob(BaseModel):
    id: str
    status: JobStatus
    suffix: str | None
    base_model: str
    method: str
    dataset_id: str
    validation_dataset_id: str | None
    allocation_spec: Any = Field(description="the allocation as it was requested")
    allocation: list[int] | None = Field(description="experts per layer, expanded")
    top_k: list[int] | None
    adapter_parameters: int | None
    hyperparameters: dict[str, Any] = Field(description="as the job ran: `warmup_steps` and `bf16` left to the run are the values it chose")
    step: int
    total_steps: int | None
    seconds: float | None = Field(description="from the start of its first run to its end; null until it ends")
    train: dict[str, Any] | None = Field(
        description="its last training metrics: `step`, `loss`, `lm_loss` (the language-model loss alone: what compares across methods), "
        "`aux_loss`, `tokens_per_s` (the run's average), `peak_memory_mb`"
    )
    eval: dict[str, Any] | None = Field(description="its last evaluation: `step`, `eval_loss`, `eval_exact_match`, `eval_answer_accuracy`")
    best_eval: dict[str, Any] | None = Field(description="its evaluation with the lowest `eval_loss`, the same fields")


class JobComparison(BaseModel):
    jobs: list[ComparedJob] = Field(description="in the order asked")
    differences: list[dict[str, Any]] = Field(
        description='the settings not the same in every job: `{"field": "hyperparameters.learning_rate", "values": [...]}`, '
        "the values in the jobs' order"
    )
    best_eval_loss: str | None = Field(
        description="the job whose best `eval_loss` is the lowest; null when none evaluated or their eval_loss do not compare (`warnings`)"
    )
    warnings: list[str] = Field(description="where the jobs' numbers do not measure the same thing, each naming the numbers it concerns")


MAX_PROMPTS = 16
MAX_DATASET_ROWS = generation_service.MAX_DATASET_ROWS
MAX_PROMPT_CHARS = 16_000
MAX_NEW_TOKENS = 2048
Prompt = text_of_length(1, MAX_PROMPT_CHARS)


class GenerationCreate(BaseModel):
    model_config = REQUEST_CONFIG

    prompts: list[Prompt] | None = Field(
        None, min_length=1, max_length=MAX_PROMPTS, description=f"1 to {MAX_PROMPTS} prompts, each a bare text (formatted by `template`); or a `dataset_id`"
    )
    dataset_id: Text | None = Field(
        None,
        description=(
            "instead of prompts: one of your datasets (a test set, say) whose rows are completed, each "
            "prompt dressed as training dressed that row, and scored against the row's own completion "
            "(`scores`); text rows have no prompt and are left out"
        ),
    )
    rows: int | None = Field(
        None,
        ge=1,
        le=MAX_DATASET_ROWS,
        description=f"with `dataset_id`: its first N rows (default: all of them; a dataset of more than {MAX_DATASET_ROWS} rows needs it)",
    )
    step: int | None = Field(
        None, ge=0, le=MAX_STEP, description="the adapter of the job's checkpoint at this step (GET /jobs/{id}/checkpoints; a running job's too) instead of its final one"
    )
    template: Literal["alpaca", "chat", "raw"] | None = Field(
        None,
        description=(
            "how each prompt is dressed: `alpaca` as an Alpaca instruction, `chat` as a user turn of the "
            "tokenizer's chat template, `raw` as it is; null (default): as the job's training rows were "
            "(what its adapter records)"
        ),
    )
    input: text_of_length(max_length=MAX_PROMPT_CHARS) | None = Field(None, description="the Alpaca input that goes with every prompt (alpaca template only)")
    max_new_tokens: int = Field(128, ge=1, le=MAX_NEW_TOKENS, description="a completion also ends at EOS or the model's last position")
    temperature: float = Field(0.0, ge=0, le=5, description="0: greedy; above 0: sampled")
    top_p: float = Field(1.0, gt=0, le=1, description="with temperature > 0: nucleus sampling")
    seed: int | None = Field(None, ge=0, lt=2**32, description="makes sampling repeatable")

    @field_validator("input")
    @classmethod
    def _input_goes_with_alpaca(cls, value: str | None, info: ValidationInfo) -> str | None:
        template = info.data.get("template")
        if value is not None and template not in (None, "alpaca"):
            raise ValueError(f"an input goes with the alpaca template, not {template}")
        return value


class Completion(BaseModel):
    prompt: str = Field(description="the prompt as the model saw it, template applied")
    text: str = Field(description="what the model generated")
    row: int | None = Field(None, description="a dataset's row: its number in the upload (1 for the first)")
    reference: str | None = Field(None, description="a dataset's row: its own completion, which `text` is scored against")


class GenerationProgress(BaseModel):
    done: int = Field(description="prompts (or rows) completed, counted as each batch of them finishes")
    total: int


class GenerationScores(BaseModel):
    n: int = Field(description="the dataset's rows completed and scored")
    exact_match: float = Field(description="share of completions equal to their reference (runs of whitespace counted as one space)")
    answers_expected: int = Field(description='references that say "the answer is X" (the paper\'s format)')
    answer_accuracy: float | None = Field(None, description="share of those whose completion gives the same answer; null when no reference gives one")
    without_prompt: int = Field(0, description="rows left out for having no prompt (text rows)")
    loss: float | None = Field(
        None,
        description="the rows' held-out loss (text rows included), tokenized as the job tokenized its validation rows (its cutoff_len and "
        "train_on_inputs): comparable with the job's eval_loss; null when no token is labelled, or for a generation made before it was measured",
    )
    loss_tokens: int | None = Field(None, description="the tokens the loss is the mean over")


class GenerationPublic(BaseModel):
    id: str
    job_id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    request: dict[str, Any] = Field(description="the prompts and settings asked for, defaults filled in")
    template: str | None = Field(None, description="the template the prompts were dressed in, once done (null for a dataset's rows: each as training dressed it)")
    completions: list[Completion] | None = Field(None, description="one per prompt (or dataset row), in order, once succeeded")
    scores: GenerationScores | None = Field(None, description="a dataset's generation: how its completions compare with the rows' own")
    progress: GenerationProgress | None = Field(None, description="once running: how many of its prompts (or rows) are completed")
    seconds: float | None = Field(None, description="time spent generating (the model's loading excluded)")
    error: str | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queue: QueuePlace | None = Field(None, description="while queued, where it stands (in the answers about this one generation: not in lists)")

    @classmethod
    def of(cls, row: Generation, queue: dict[str, Any] | None = None) -> "GenerationPublic":
        result = row.result or {}
        return cls(
            id=row.id,
            job_id=row.job_id,
            status=row.status,
            request=row.request,
            template=result.get("template"),
            completions=result.get("completions"),
            scores=result.get("scores"),
            progress=row.progress,
            seconds=result.get("seconds"),
            error=row.error,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            queue=queue,
        )


class GenerationList(BaseModel):
    data: list[GenerationPublic]
    has_more: bool
    last_id: str | None = Field(description="pass as ?after= for the next page")


class WebhookSecret(BaseModel):
    secret: str = Field(description="`whsec_...`: checks the `webhook-signature` of every webhook of yours (`mola.webhooks.verify`)")


class WebhookTest(BaseModel):
    model_config = REQUEST_CONFIG

    url: text_of_length(1, 2048) = Field(description="the receiver to try, as a job's webhook_url")


class WebhookTestResult(BaseModel):
    id: str = Field(description="the ping's `webhook-id`")
    url: str
    delivered: bool = Field(description="the receiver answered 2xx")
    response_status: int | None = Field(description="its answer; null when none came")
    error: str | None = Field(description="why it was not delivered: the answer, a connection that failed, an address refused")


class WebhookDeliveryPublic(BaseModel):
    id: str = Field(description="the `webhook-id` header: the same on every attempt, to deduplicate on")
    event: str
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime | None = Field(description="while pending: when it is tried next")
    response_status: int | None = Field(description="the receiver's answer to the last attempt")
    last_error: str | None = Field(description="why the last attempt failed")
    created_at: datetime
    delivered_at: datetime | None
    payload: dict[str, Any] = Field(description="the event as it is sent")

    @classmethod
    def of(cls, delivery: Any) -> "WebhookDeliveryPublic":
        return cls(
            id=delivery.id,
            event=delivery.event,
            url=delivery.url,
            status=delivery.status,
            attempts=delivery.attempts,
            next_attempt_at=delivery.next_attempt_at if delivery.status == "pending" else None,
            response_status=delivery.response_status,
            last_error=delivery.last_error,
            created_at=delivery.created_at,
            delivered_at=delivery.delivered_at,
            payload=delivery.payload,
        )


class WebhookDeliveryList(BaseModel):
    data: list[WebhookDeliveryPublic]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str] = Field(description='{"database" | "broker" | "storage": "ok" or why it failed}')
    failed: list[str] = Field(default_factory=list, description="the backends that are not reachable")
