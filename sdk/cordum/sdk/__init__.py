"""Cordum Python SDK: CAP packet helpers (:mod:`cordum.sdk.cap`) and the worker runtime
(:mod:`cordum.sdk.worker`).

The API clients (:class:`AsyncClient`, :class:`Client`) and their typed errors are
re-exported here; :mod:`cordum.sdk.convert` turns the API's JSON values and job states into
plain Python."""

from cordum.sdk.client import DEFAULT_TARGET, AsyncClient, Client
from cordum.sdk.errors import (
    AlreadyExists,
    CordumError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    WaitTimeout,
)
from cordum.sdk.jobs import JobOutcome, SubmitJobFields

__all__ = [
    "DEFAULT_TARGET",
    "AlreadyExists",
    "AsyncClient",
    "Client",
    "CordumError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "JobOutcome",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "SubmitJobFields",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "WaitTimeout",
]
