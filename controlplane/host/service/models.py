"""The API's request and response models (strict pydantic: unknown fields and wrong types are 422)."""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from controlplane.host.service.limits import MAX_BODY

NONCE_HEX = r"^[0-9a-fA-F]{32,128}$"   # 16..64 bytes: fresh enough, bounded
PCR_MAX = 23
BASE64 = r"^[A-Za-z0-9+/]+={0,2}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class QuoteRequest(Strict):
    nonce: str = Field(pattern=NONCE_HEX, description="verifier nonce, 16-64 bytes as hex")
    pcrs: list[Annotated[int, Field(ge=0, le=PCR_MAX)]] = Field(min_length=1, max_length=PCR_MAX + 1)

    @field_validator("pcrs")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("PCR indices must be unique")
        return sorted(v)


class QuoteResponse(BaseModel):
    quote: dict
    tls_spki_sha256: str
    log_length: int
    pcr: int


class LogResponse(BaseModel):
    start: int
    count: int
    total: int
    pcr: int
    ascii: str = Field(description="ima-ng ASCII lines, one entry per line, entries start..start+count-1")


class ImaLogResponse(LogResponse):
    """The kernel's own IMA log (its template: ima-ng or ima-sig), same paging as /v1/log."""


class PolicyResponse(BaseModel):
    policy_digest: str | None
    db_digest: str | None
    mode: str | None
    policy: str | None


class PolicyPush(Strict):
    policy: str = Field(min_length=1, max_length=MAX_BODY // 2)
    signature: str = Field(min_length=1, max_length=256, description="base64 Ed25519 signature (the .sig file)")


class HealthResponse(BaseModel):
    status: str
    version: str
    pcr: int
    log_length: int
    tls_spki_sha256: str
    ima_pcr: int | None = Field(None, description="the kernel IMA log's PCR when /v1/ima-log serves it")


class EnrolResponse(BaseModel):
    ek_public: str
    ek_certificate: str | None
    ak_public: str
    ak_name: str


class ActivateRequest(Strict):
    credential_blob: str = Field(min_length=4, max_length=4096, pattern=BASE64)
    secret: str = Field(min_length=4, max_length=4096, pattern=BASE64)


class ActivateResponse(BaseModel):
    secret: str


class ErrorResponse(BaseModel):
    error: str
