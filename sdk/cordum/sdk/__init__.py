"""Cordum Python SDK: CAP packet helpers (:mod:`cordum.sdk.cap`) and the worker runtime
(:mod:`cordum.sdk.worker`)."""
