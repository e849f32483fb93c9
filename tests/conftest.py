"""Shared fixtures: tiny deterministic geo-tagged image sets and a tiny model."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np
import pytest
import torch
from PIL import Image

from vpr.data.geo import format_at_name
from vpr.models.model import ModelConfig, build_model

torch.set_num_threads(2)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ZONE = (10, "S")
TINY_SIZE = (48, 64)  # height, width of the tiny model's input


def place_image(rng: np.random.Generator, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A distinctive smooth random 'place': low-frequency colour blobs, uint8 H x W x 3."""
    coarse = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size[1], size[0]), Image.BICUBIC))


def perturb(image: np.ndarray, rng: np.random.Generator, noise: float = 8.0) -> np.ndarray:
    """The same place seen again: a brightness change plus pixel noise."""
    out = image.astype(np.float32) * rng.uniform(0.85, 1.15) + rng.normal(0, noise, image.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def write_places(folder: Path, count: int, seed: int, *, spacing: float = 100.0) -> tuple[list[Path], list[Path]]:
    """Write `count` database places 100 m apart and one perturbed query per place, as `@`-named JPEGs."""
    rng = np.random.default_rng(seed)
    db_dir, q_dir = folder / "database", folder / "queries"
    db_dir.mkdir(parents=True)
    q_dir.mkdir(parents=True)
    db_paths, q_paths = [], []
    for i in range(count):
        east, north = 550000.0 + spacing * i, 4180000.0 + 37.0 * (i % 3)
        image = place_image(rng)
        db = db_dir / format_at_name(east, north, *ZONE, heading=(30.0 * i) % 360)
        Image.fromarray(image).save(db, quality=95)
        q = q_dir / format_at_name(east + 3.0, north - 2.0, *ZONE, heading=(30.0 * i + 5) % 360)
        Image.fromarray(perturb(image, rng)).save(q, quality=95)
        db_paths.append(db)
        q_paths.append(q)
    return db_paths, q_paths


def truncated_load_error(source: Path, target: Path, keep: int | None = None) -> str:
    """The error `load_checkpoint` gives for `target`, a copy of `source` cut to `keep` bytes (half by default)
    as a broken download leaves it; asserts it is a one-line `CheckpointError`."""
    from vpr.errors import CheckpointError
    from vpr.models.checkpoints import load_checkpoint

    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2 if keep is None else keep])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(target)
    assert "\n" not in str(info.value)
    return str(info.value)


@torch.no_grad()
def perturb_weights(module: torch.nn.Module, gen: torch.Generator,
                    scaled: tuple[str, ...] = ("qkv.weight", "in_proj_weight")) -> torch.nn.Module:
    """Random weights away from their init, so every layer changes the output: layer scales, norms,
    biases, BatchNorm statistics, position embeddings and learned queries; weights named in `scaled` x4."""
    for name, t in module.state_dict(keep_vars=True).items():
        t = t.data
        if not t.is_floating_point():
            continue
        if name.endswith("gamma") or name.endswith("running_var") or (t.dim() == 1 and name.endswith("weight")):
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
        elif name.endswith(("bias", "running_mean")):
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
        elif name.endswith(("pos_embed", "cls_token", "queries")):
            t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
        elif name.endswith(scaled):
            t.mul_(4.0)
    return module.eval()


def restated_encoder(state: dict, x: torch.Tensor, layers: int = 2, heads: int = 16) -> torch.Tensor:
    """Post-norm Transformer encoder layers (`encoder.layers.N.*` of `state`) over x (S x N x C), restated:
    Z = LN(x + MHA(x)), E = LN(Z + W2 GELU(W1 Z))."""
    import math

    import torch.nn.functional as F

    s, n, c = x.shape
    for i in range(layers):
        p = f"encoder.layers.{i}."
        q, k, v = F.linear(x, state[p + "self_attn.in_proj_weight"], state[p + "self_attn.in_proj_bias"]).chunk(3, -1)
        split = lambda t: t.reshape(s, n, heads, c // heads).permute(1, 2, 0, 3)  # N x heads x S x d
        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(c // heads), dim=-1) @ split(v)
        att = F.linear(att.permute(2, 0, 1, 3).reshape(s, n, c), state[p + "self_attn.out_proj.weight"],
                       state[p + "self_attn.out_proj.bias"])
        z = F.layer_norm(x + att, (c,), state[p + "norm1.weight"], state[p + "norm1.bias"])
        ffn = F.linear(F.gelu(F.linear(z, state[p + "linear1.weight"], state[p + "linear1.bias"])),
                       state[p + "linear2.weight"], state[p + "linear2.bias"])
        x = F.layer_norm(z + ffn, (c,), state[p + "norm2.weight"], state[p + "norm2.bias"])
    return x


@pytest.fixture(scope="module")
def resnet50():
    """A random torchvision ResNet-50 with BatchNorm statistics away from their init."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    return perturb_batchnorm(model, torch.Generator().manual_seed(1))


def perturb_batchnorm(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Move every BatchNorm2d's weight, bias and running statistics away from their init, drawing from `generator`."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=generator) * 0.4 + 0.3)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return model


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for a server or torch.distributed the test starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def join_gloo(rank: int, world: int, port: int) -> None:
    """Make this spawned process rank `rank` of `world` on localhost, as torchrun would (one torch thread; a
    120 s collective timeout), and join the gloo group."""
    from vpr import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), VPR_DIST_TIMEOUT="120")
    torch.set_num_threads(1)
    distributed.init("cpu")


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run `vpr ARGS` in-process; return (exit code, stdout, stderr)."""
    from cli.app import main

    monkeypatch.setattr(sys, "argv", ["vpr", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def places(tmp_path_factory) -> Path:
    """A folder with `database/` (12 places) and `queries/` (one per place, within 25 m of it only)."""
    root = tmp_path_factory.mktemp("places")
    write_places(root, 12, seed=0)
    return root


@pytest.fixture()
def one_torch_thread():
    """One torch thread for the test: tiny tensors run faster without OpenMP hand-offs, and parallel
    ranks do not fight over the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return ModelConfig(backbone="resnet18", head="cosplace", descriptor_dim=64, input_size=TINY_SIZE)


@pytest.fixture()
def tiny_model(tiny_config):
    return build_model(tiny_config, seed=0)


@pytest.fixture(scope="session")
def places_index(places, tmp_path_factory, tiny_config) -> Path:
    """An index of `places/database` by the tiny model (flat, no cache), shared by tests that only read it."""
    from vpr.data.datasets import load_image_set
    from vpr.retrieval.options import ExtractOptions
    from vpr.retrieval.build import build_index

    out = tmp_path_factory.mktemp("places-index") / "places"
    build_index(load_image_set(places / "database"), out, model=build_model(tiny_config, seed=0),
                options=ExtractOptions(num_workers=0))
    return out
