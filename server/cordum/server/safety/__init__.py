"""The safety kernel: decides, before a job runs, whether it may (upstream policy format).

Modules: `glob` (Go path.Match), `model` (policy dataclasses, parsing, merge, snapshots),
`evaluate` (the decision algorithm and its differences from upstream), `kernel` (the
service object: cache, reload, watcher), `servicer` (CAP gRPC), `client` (for the scheduler).
"""
