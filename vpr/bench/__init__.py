"""`vpr bench`, by job: config, measure, reference, data, the extraction/search/memory cases, machine, run.

CASES names what it can measure (here, so that `vpr bench --help` needs nothing heavy)."""

CASES = ("extraction", "search", "memory")  # search: index build, search, single-image query latency
