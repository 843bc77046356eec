"""The fault-injection suite (`make chaos`; a bounded subset runs in `make test`)."""
