"""Request and response models; every route declares its response shape."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    Strict,
    StrictFloat,
    StrictInt,
    StrictStr,
)

from vodq.models import Vod, VodState
from vodq.service import redact_url

# Times are UTC, written in ISO 8601 with an explicit "+00:00" offset.
IsoTime = Annotated[
    datetime, PlainSerializer(lambda value: value.isoformat(), return_type=str)
]


def _int64(value: int) -> int:
    if not -(2**63) <= value <= 2**63 - 1:
        raise ValueError("must fit a signed 64-bit integer")
    return value


# The range is documented as format int64 rather than minimum and maximum,
# which FastAPI's OpenAPI model writes as floats that round past 2**63 - 1.
Priority = Annotated[
    int,
    AfterValidator(_int64),
    Field(examples=[100], json_schema_extra={"format": "int64"}),
]


# Request bodies: unknown fields are errors, and JSON types are taken as they
# are ("100" is not a priority, 0 is not false).
INPUT_CONFIG = ConfigDict(extra="forbid", strict=True)


class ErrorResponse(BaseModel):
    error: str


class VodIn(BaseModel):
    """A VOD to queue: a bare id (turned into a URL by VOD_URL_TEMPLATE) or a URL."""

    model_config = INPUT_CONFIG

    vod_id: str | None = Field(default=None, examples=["123456789"])
    url: str | None = Field(
        default=None, examples=["https://www.twitch.tv/videos/123456789"]
    )
    title: str | None = None
    date: str | None = Field(default=None, examples=["2024-10-15T18:30:00+00:00"])
    channel: str | None = None
    priority: Priority = 0


class PriorityIn(BaseModel):
    model_config = INPUT_CONFIG

    vod_id: str = Field(examples=["123456789"])
    priority: Priority


class BatchPriorityIn(BaseModel):
    """A priority for many VODs: listed by id, or selected by every given filter."""

    model_config = INPUT_CONFIG

    priority: Priority
    vod_ids: list[str] | None = Field(default=None, max_length=10_000)
    date_from: str | None = Field(default=None, description="inclusive, ISO 8601")
    date_to: str | None = Field(default=None, description="exclusive, ISO 8601")
    channel: str | None = None
    # JSON has no enums, so states arrive as strings even in strict mode.
    states: list[Annotated[VodState, Strict(False)]] | None = None


class BatchPriorityOut(BaseModel):
    status: str
    priority: int
    updated: int


class VodRef(BaseModel):
    model_config = INPUT_CONFIG

    vod_id: str = Field(examples=["123456789"])


class SkipUploadIn(BaseModel):
    model_config = INPUT_CONFIG

    vod_id: str = Field(examples=["123456789"])
    skip: bool = True


class UploadsIn(BaseModel):
    """Done VODs to upload that were never uploaded: listed, or all of them."""

    model_config = INPUT_CONFIG

    vod_ids: list[str] | None = Field(
        default=None, max_length=10_000, examples=[["123456789"]]
    )
    all_not_uploaded: bool = Field(
        default=False,
        description="every done VOD without a remote id whose file still exists",
    )


class UploadsOut(BaseModel):
    status: str
    queued: list[str] = Field(description="ids sent to the upload stage")
    missing_files: list[str] = Field(
        description="with all_not_uploaded: ids left out because the file is gone"
    )


class PauseIn(BaseModel):
    model_config = INPUT_CONFIG

    stop_running: bool = Field(
        default=False,
        description="also stop running downloads, keeping their partial files",
    )


class PauseOut(BaseModel):
    status: str
    paused: bool
    stopped: int


class PriorityOut(BaseModel):
    status: str
    vod_id: str
    priority: int


class VodOut(BaseModel):
    vod_id: str
    source_url: str
    title: str | None
    date: IsoTime | None
    channel: str | None
    priority: int
    state: str
    processed: bool
    attempts: int
    next_attempt_at: IsoTime | None
    last_error: str | None
    error_class: str | None
    bytes_done: int
    bytes_total: int | None
    progress: float | None = Field(description="bytes_done / bytes_total, 0 to 1")
    speed_bps: int | None
    file_path: str | None
    lease_owner: str | None
    lease_expires_at: IsoTime | None
    created_at: IsoTime
    updated_at: IsoTime
    started_at: IsoTime | None
    finished_at: IsoTime | None
    download_ms: int | None
    skip_upload: bool
    upload_attempts: int
    upload_next_at: IsoTime | None
    uploader: str | None = Field(description="the uploader that finished the upload")
    remote_id: str | None = Field(
        description="the uploaded copy's id; null when nothing was uploaded"
    )
    remote_url: str | None
    uploaded_at: IsoTime | None
    upload_ms: int | None

    @classmethod
    def from_vod(cls, vod: Vod) -> VodOut:
        progress = None
        if vod.bytes_total:
            progress = min(1.0, vod.bytes_done / vod.bytes_total)
        return cls(
            vod_id=vod.vod_id,
            source_url=redact_url(vod.source_url),
            title=vod.title,
            date=vod.date,
            channel=vod.channel,
            priority=vod.priority,
            state=vod.state.value,
            processed=vod.processed,
            attempts=vod.attempts,
            next_attempt_at=vod.next_attempt_at,
            last_error=vod.last_error,
            error_class=vod.error_class,
            bytes_done=vod.bytes_done,
            bytes_total=vod.bytes_total,
            progress=progress,
            speed_bps=vod.speed_bps,
            file_path=vod.file_path,
            lease_owner=vod.lease_owner,
            lease_expires_at=vod.lease_expires_at,
            created_at=vod.created_at,
            updated_at=vod.updated_at,
            started_at=vod.started_at,
            finished_at=vod.finished_at,
            download_ms=vod.download_ms,
            skip_upload=vod.skip_upload,
            upload_attempts=vod.upload_attempts,
            upload_next_at=vod.upload_next_at,
            uploader=vod.uploader,
            remote_id=vod.remote_id,
            remote_url=vod.remote_url,
            uploaded_at=vod.uploaded_at,
            upload_ms=vod.upload_ms,
        )


class VodPage(BaseModel):
    items: list[VodOut]
    next_after: int | None = Field(
        description="pass as 'after' to get the next page; null on the last page"
    )


class PriorityCount(BaseModel):
    priority: int
    count: int


class RetryConfig(BaseModel):
    download_max_attempts: int
    download_backoff_base: str
    upload_max_attempts: int
    upload_backoff_base: str
    processing_retry_cooldown: str


class WorkerOut(BaseModel):
    worker_id: str
    hostname: str
    pid: int
    started_at: IsoTime
    last_heartbeat: IsoTime
    slots: int
    alive: bool = Field(description="false once the heartbeat is 15 s old")
    downloads: list[str] = Field(description="ids of the VODs it holds leases on")


class StatusOut(BaseModel):
    pending: int
    queue_by_priority: list[PriorityCount]
    queue_by_state: dict[str, int]
    active_downloads: int
    max_concurrent_downloads: int
    uploader: str = Field(description="none, command or youtube")
    uploading: int = Field(description="VODs uploading, across every worker")
    awaiting_upload: int = Field(
        description="downloaded VODs waiting for an upload slot or retry"
    )
    max_concurrent_uploads: int
    retry_config: RetryConfig
    download_rate_limit: str | None
    download_rate_limit_bytes: int | None
    circuit_state: str
    circuit_failures: int
    circuit_open_until: IsoTime | None
    last_process_run: IsoTime | None
    avg_download_ms: int
    worker_id: str | None
    paused: bool
    workers: list[WorkerOut]
    download_total_rate_limit: str | None
    download_total_rate_limit_bytes: int | None
    config: dict[str, ConfigValue]


class ConfigValue(BaseModel):
    value: int | str | None
    source: str = Field(description="default, environment or runtime")


ConfigReport = dict[str, ConfigValue]

# A runtime change: variable name (any case) to its new value in the start-up
# grammar, or null to return to the start-up value.
# Strict, so that JSON true and false are refused rather than read as 1 and 0.
ConfigChanges = dict[str, StrictInt | StrictFloat | StrictStr | None]


class HealthOut(BaseModel):
    status: str
