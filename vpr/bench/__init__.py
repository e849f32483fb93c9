"""`vpr bench`, by job: config, measure, reference, data, the extraction/search/memory cases, machine, run.

CASES names what it can measure (here, so that `vpr bench --help` needs nothing heavy)."""

CASES = ("extraction", "search", "memory")  # search: index build, search, single-image query latency
BACKEND_VARIANTS = ("torch_fp32", "torch_bf16", "onnxruntime_fp32", "onnxruntime_int8", "openvino_fp32", "openvino_bf16",
                    "openvino_int8")  # the backends case (`--backend all`)
