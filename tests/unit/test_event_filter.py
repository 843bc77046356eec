"""Event-stream filters: parsing (with clear errors naming the field) and matching, tenant
scope included."""

from __future__ import annotations

import grpc
import pytest

from cordum.server.errors import CordumError
from cordum.server.services.caller import Caller
from cordum.server.services.event_streams import EventFilter
from cordum.v1 import event_pb2

EVERYONE = Caller(tenant=None)
ACME = Caller(tenant="acme", role="viewer")


def event(kind: str = "job_state", **fields: str) -> event_pb2.Event:
    return event_pb2.Event(kind=kind, **fields)


def test_kinds_may_be_repeated_or_comma_separated() -> None:
    f = EventFilter.build(EVERYONE, kinds=["job_state, job_result", "alert"])
    assert f.kinds == {"job_state", "job_result", "alert"}
    assert f.matches(event("job_result"), None)
    assert not f.matches(event("heartbeat"), None)


def test_every_bad_field_is_named() -> None:
    with pytest.raises(CordumError) as caught:
        EventFilter.build(EVERYONE, kinds=["nope"], topic="job.[", job_id="a b", run_id="c\nd")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in caught.value.violations] == ["kinds", "topic", "job_id", "run_id"]


def test_topic_is_a_glob_on_the_jobs_topic() -> None:
    f = EventFilter.build(EVERYONE, topic="job.billing.*")
    assert f.matches(event(topic="job.billing.invoice"), None)
    assert not f.matches(event(topic="job.billing.a/b"), None)
    assert not f.matches(event(topic="job.other"), None)
    # Events about no job (heartbeats, run events without a job) never match a topic.
    assert not f.matches(event("heartbeat"), None)


def test_job_and_run_ids_must_be_equal() -> None:
    f = EventFilter.build(EVERYONE, job_id="j1", run_id="r1")
    assert f.matches(event(job_id="j1", run_id="r1"), "t")
    assert not f.matches(event(job_id="j1", run_id="r2"), "t")
    assert not f.matches(event(job_id="j2", run_id="r1"), "t")


def test_a_tenant_bound_caller_sees_its_tenant_only() -> None:
    f = EventFilter.build(ACME)
    assert f.matches(event(), "acme")
    assert not f.matches(event(), "beta")
    # No tenant's events (workers, platform alerts) are for keys of every tenant only.
    assert not f.matches(event("heartbeat"), None)
    everyone = EventFilter.build(EVERYONE)
    assert everyone.matches(event(), "beta") and everyone.matches(event("heartbeat"), None)
