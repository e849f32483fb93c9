"""Every method family of `vpr models` exported to ONNX (and OpenVINO) and run there on real street-view photos:
the largest difference from vpr's own torch descriptors. Random weights, each scaled and shifted off its initial
value (LayerScale's 1e-5, zero biases) so every layer matters. Writes docs/measurements/results/deploy_families.json.

    .venv/bin/python docs/measurements/deploy_families.py [--data ../shared/data/sf_street_west/images/test/queries]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vpr import api

FAMILIES = [  # (method as `vpr models` names it, backbone, head, options)
    ("CosPlace / EigenPlaces", "resnet50", "cosplace", {}),
    ("NetVLAD / Patch-NetVLAD / SFRS", "vgg16", "netvlad", {}),
    ("MixVPR", "resnet50", "mixvpr", {"layer": 3}),
    ("Conv-AP", "resnet50", "convap", {}),
    ("BoQ (ResNet-50)", "resnet50", "boq", {"layer": 3}),
    ("BoQ (DINOv2)", "dinov2_vitb14", "boq", {}),
    ("AP-GeM", "resnet101", "apgem", {}),
    ("SALAD / CliqueMining", "dinov2_vitb14", "salad", {}),
    ("MegaLoc", "dinov2_vitb14", "megaloc", {}),
    ("SuperVLAD", "dinov2_vitb14", "supervlad", {}),
    ("SuperVLAD-CrossImage", "dinov2_vitb14", "supervlad-crossimage", {}),
    ("QAA", "dinov2_vitb14", "qaa", {}),
    ("CricaVPR", "dinov2_vitb14_cricavpr", "cricavpr", {}),
    ("EDTformer", "dinov2_vitb14_edtformer", "edtformer", {}),
    ("AnyLoc (on ViT-S/14; ViT-G's 4.4 GB is past ONNX's 2 GB protobuf)", "dinov2_vits14", "anyloc", {}),
    ("SeqSLAM patch normalisation", "pixels", "patchnorm", {}),
]


def perturb(model) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.mul_(1 + 0.05 * noise).add_(0.01 * torch.randn(parameter.shape, generator=generator))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/sf_street_west/images/test/queries"))
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "deploy_families.json")
    parser.add_argument("--start", type=int, default=0, help="Skip the first N families (their rows kept from --out).")
    args = parser.parse_args()
    import onnxruntime as ort
    import openvino as ov

    photos = sorted(args.data.glob("*.jpg"))[: args.images]
    rows = json.loads(args.out.read_text())["families"][: args.start] if args.start else []
    for method, backbone, head, options in FAMILIES[args.start:]:
        start = time.perf_counter()
        model, _ = api.new_model(backbone, head=head, **options)
        perturb(model)
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            index, images = folder / "idx", folder / "images"
            images.mkdir()
            for photo in photos:
                shutil.copy(photo, images / photo.name)
            try:
                api.build_index(images, index, model=model,
                                options=api.BuildOptions(extract=api.ExtractOptions(num_workers=0), cache=False))
            except api.VPRError as exc:  # the perturbed weights broke the network itself: nothing to export
                rows.append({"method": method, "backbone": backbone, "head": head, "torch": str(exc)})
                print(rows[-1], flush=True)
                continue
            searcher = api.Index.load(index, device="cpu")
            expected = searcher.describe(photos)
            inputs = np.stack([searcher.prepare(p).float().numpy() for p in photos])
            row = {"method": method, "backbone": backbone, "head": head, "dim": int(expected.shape[1]),
                   "input": list(inputs.shape[2:])}
            for fmt, suffix in (("onnx", ".onnx"), ("openvino", ".xml")):
                graph = folder / f"model{suffix}"
                try:
                    report = api.export_model(index, graph, fmt=fmt)
                except api.UsageError as exc:
                    row[fmt] = {"refused": str(exc)}
                    continue
                if fmt == "onnx":
                    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
                    got = np.concatenate([session.run(None, {"images": x[None]})[0] for x in inputs])
                else:
                    compiled = ov.Core().compile_model(str(graph), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
                    got = np.concatenate([next(iter(compiled(x[None]).values())) for x in inputs])
                row[fmt] = {"max_abs_diff": float(np.abs(got - expected).max()), "mb": round(report["bytes"] / 1e6, 1)}
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(row, flush=True)
        api.write_json(args.out, {"images": [str(p) for p in photos], "families": rows})  # after each family


if __name__ == "__main__":
    main()
