"""Real-size model architectures with random weights, built from ``configs/models/*.json`` without downloads.

Each JSON names the library, the model class, the hub id it mirrors (``source``) and the published
architecture config. Benchmarks build them directly on the target device in the target dtype
(``build_from_config("llava-1.5-7b", torch.bfloat16, "cuda")``), so a 7B model is ready in seconds and
never touches the CPU's memory. The weights are random: figures are about speed and memory only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

MODELS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


def available() -> list[str]:
    """Names of the architecture configs under ``configs/models``."""
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def load_spec(name: str) -> dict[str, Any]:
    """The spec ``{"library", "class", "source", "config"}`` of ``configs/models/<name>.json``."""
    path = MODELS_DIR / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no architecture config {name!r} in {MODELS_DIR}; available: {', '.join(available())}")
    return json.loads(path.read_text())


def transformers_config(spec: dict[str, Any]):
    """The transformers config object of a spec (sub-configs by their ``model_type``)."""
    from transformers import AutoConfig

    raw = dict(spec["config"])
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def build_from_config(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A random-init model (or scheduler) of architecture ``name``, in eval mode, on ``device`` in ``dtype``."""
    spec = load_spec(name)
    if spec["class"].endswith("Scheduler"):
        import diffusers

        return getattr(diffusers, spec["class"]).from_config(spec["config"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialize in the target dtype: a 7B model never exists in fp32
    try:
        with torch.device(device):
            if spec["library"] == "transformers":
                import transformers

                model = getattr(transformers, spec["class"])._from_config(transformers_config(spec), dtype=dtype)
            elif spec["library"] == "diffusers":
                import diffusers

                model = getattr(diffusers, spec["class"]).from_config(spec["config"])
            else:
                raise ValueError(f"{name}: unknown library {spec['library']!r} (transformers | diffusers)")
    finally:
        torch.set_default_dtype(previous)
    if spec["library"] == "transformers":
        model = model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("python -m spasem.profiles.real_size", description="build real-size random-init models")
    parser.add_argument("names", nargs="*", help=f"architectures (default: all): {', '.join(available())}")
    parser.add_argument("--device", default="meta", help="meta (count parameters only), cpu or cuda")
    args = parser.parse_args(argv)
    for name in args.names or available():
        model = build_from_config(name, torch.bfloat16, args.device)
        count = parameter_count(model) if isinstance(model, torch.nn.Module) else 0
        print(f"{name:26s} {load_spec(name)['class']:34s} {count / 1e6:10.1f} M parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
