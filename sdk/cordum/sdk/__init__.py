"""Cordum Python SDK: CAP packet helpers (:mod:`cordum.sdk.cap`) and the worker runtime
(:mod:`cordum.sdk.worker`).

The API clients (:class:`AsyncClient`, :class:`Client`), their typed errors and the workflow
file loader are re-exported here; :mod:`cordum.sdk.convert` turns the API's JSON values, job
states and run statuses into plain Python."""

from cordum.sdk.client import DEFAULT_TARGET, AsyncClient, Client
from cordum.sdk.errors import (
    Aborted,
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
from cordum.sdk.policy import PolicyCheckFields
from cordum.sdk.workflows import load_workflow

__all__ = [
    "DEFAULT_TARGET",
    "Aborted",
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
    "PolicyCheckFields",
    "ResourceExhausted",
    "SubmitJobFields",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "WaitTimeout",
    "load_workflow",
]
