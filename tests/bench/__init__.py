"""`make bench`: the load generator, the raw and seed comparison servers, and the report.

Run it with `python -m tests.bench --help` from the repository root.
"""
