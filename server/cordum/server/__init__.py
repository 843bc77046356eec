"""Cordum control-plane server: gRPC services, scheduler, safety gate and workflows."""
