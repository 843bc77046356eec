"""The workflow engine: definitions, runs, the DAG engine, its reconciler and services."""
