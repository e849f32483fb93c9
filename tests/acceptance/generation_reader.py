"""Load an index in a loop until a stop file appears, and report what the loads saw (a second process for the
half-swapped-reads check of issue 23): `python generation_reader.py INDEX STOP_FILE` counts its loads in
STOP_FILE.loads (one byte each, so the writer knows how many it has run into) and at the stop prints one JSON
line with the number of loads, the errors, and how many loads combined a model with another build's descriptors."""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from vpr.data.images import load_rgb, preprocess
from vpr.models.inference import forward_batch, inference_model
from vpr.retrieval.store import load_index

out, stop = Path(sys.argv[1]), Path(sys.argv[2])
loads, errors, mixed = 0, [], 0
torch.set_num_threads(1)
tally = open(f"{stop}.loads", "ab", buffering=0)
while not stop.exists():
    try:
        bundle = load_index(out)
    except Exception as exc:  # every failure is evidence: counted and reported, never raised
        errors.append(f"{type(exc).__name__}: {exc}")
        continue
    loads += 1
    tally.write(b".")
    # the model and the descriptors must be of one build: database image 0 described now equals its stored row
    image = preprocess(load_rgb(bundle.database.paths[0]), bundle.model.config.preprocess)[None]
    row = bundle.project(forward_batch(inference_model(bundle.model, torch.device("cpu")), image, None).numpy())
    if row.shape[1] != bundle.descriptors.shape[1] or float(row[0] @ np.asarray(bundle.descriptors[0])) < 0.999:
        mixed += 1
print(json.dumps({"loads": loads, "errors": errors[:5], "error_count": len(errors), "mixed": mixed}))
