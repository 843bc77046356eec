"""Helpers shared by the tests (real servers, polling waits)."""
