"""Process launcher shared by `cordumctl up` and the test-suite.

Starts the pip-installed NATS, Valkey and Envoy binaries (and our own Python services) as
child processes on loopback ports, waits until they are ready and stops them by PID.
"""
