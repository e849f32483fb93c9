"""`vpr bench` by job: config, measure, reference, data, the extraction/search/memory cases, machine, run."""
