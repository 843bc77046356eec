"""JetStream mode's pure parts: stream names per namespace, and the redelivery delays."""

from __future__ import annotations

from nats.js import api

from cordum.server.bus import Subjects
from cordum.server.jetstream import JetStreamConfig, Streams


def test_namespaced_subjects_get_namespaced_streams_and_shared_ones_do_not() -> None:
    streams = Streams.of(Subjects("t1a2b.x."))
    assert streams.submit.name == "t1a2b_x_CORDUM_SUBMIT"
    assert streams.submit.subjects == ("t1a2b.x.sys.job.submit",)
    assert streams.submit.retention == api.RetentionPolicy.WORK_QUEUE
    assert streams.dlq.name == "t1a2b_x_CORDUM_DLQ"
    assert streams.dlq.subjects == ("t1a2b.x.sys.job.dlq",)
    # CAP's own subjects are the same for every namespace: one stream each per server.
    assert streams.results == Streams.of(Subjects("other.")).results
    assert streams.results.subjects == ("sys.job.result",)
    assert streams.jobs.subjects == ("job.>", "worker.*.jobs")
    assert streams.durable("scheduler") == "t1a2b_x_cordum-scheduler"


def test_the_default_namespace_uses_plain_names() -> None:
    streams = Streams.of(Subjects())
    assert [s.name for s in streams.all()] == [
        "CORDUM_SUBMIT",
        "CORDUM_RESULTS",
        "CORDUM_DLQ",
        "CORDUM_JOBS",
    ]
    assert streams.submit.subjects == ("sys.job.submit",)
    assert streams.durable("scheduler") == "cordum-scheduler"


def test_redelivery_delays_double_up_to_a_cap_however_often_a_message_comes_back() -> None:
    config = JetStreamConfig(redeliver_delay_s=0.5, redeliver_delay_max_s=10.0)
    assert [config.redeliver_delay(n) for n in (1, 2, 3, 4, 5, 6)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        10.0,
    ]
    assert config.redeliver_delay(100_000) == 10.0
