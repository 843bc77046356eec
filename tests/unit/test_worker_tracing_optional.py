"""The SDK's tracing is optional: without opentelemetry the worker runtime imports and its
tracing helpers do nothing (no span, no headers)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_the_worker_runs_without_opentelemetry() -> None:
    # A fresh interpreter where every `opentelemetry` import fails, as when it is not installed.
    snippet = textwrap.dedent(
        """
        import sys

        class NoOtel:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ModuleNotFoundError(name)
                return None

        sys.meta_path.insert(0, NoOtel())
        from cordum.sdk.worker import Worker
        from cordum.sdk._tracing import WorkerTracing

        tracing = WorkerTracing(None, "test")
        assert not tracing.enabled
        span = tracing.start_job({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}, {})
        assert span is None and tracing.headers(span) is None
        with tracing.use(span):
            tracing.finish(span, "JOB_STATUS_FAILED")
        Worker(worker_id="w-1")
        assert not any(m.startswith("opentelemetry") for m in sys.modules)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
