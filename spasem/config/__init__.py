"""The typed configuration tree, its YAML loading, dotted overrides and the shared command line.

Every section is a pydantic model with ``extra="forbid"``; unknown keys are reported with the
nearest valid name before pydantic ever sees them, so a typo is an error, never silently ignored.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spasem.config.annotate import AnnotateConfig, ModelsConfig
from spasem.config.evaluate import EvaluateConfig
from spasem.config.model import LossConfig, ModelConfig
from spasem.config.train import DeepSpeedConfig, TrainConfig
from spasem.config.upscale import UpscaleConfig
from spasem.storage import Store, arrow_location, open_store

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # GIF: its first frame


class ConfigError(ValueError):
    """A configuration value or key the user must fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    hr_size: int = Field(512, ge=16, description="side of the square HR crop")
    scale: int = Field(4, ge=1, le=16, description="HR side / LR side")
    crops_per_image: int = Field(1, ge=1, description="random crops cut from each source image")
    hflip: bool = Field(True, description="mirror each crop left-right with probability 1/2, seeded per crop "
                                          "(the papers' datasets: BasicSR's use_hflip)")
    shard_size: int = Field(64, ge=1, description="samples per shard")
    seed: int = Field(0, description="base seed; each sample's RNG is derived from (seed, key)")
    min_size: int | None = Field(None, ge=1, description="reject images whose short side is below this (default: hr_size); smaller "
                                    "images that pass are padded to hr_size by reflection, as RealESRGANDataset does")
    max_pixels: int = Field(89_478_485, ge=1, description="reject images with more pixels, before decoding")
    max_bytes: int = Field(512 * 1024 * 1024, ge=1, description="reject files larger than this")
    extensions: list[str] = Field(default_factory=lambda: list(IMAGE_EXTENSIONS))

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.hr_size % self.scale:
            raise ValueError(f"data.hr_size={self.hr_size} must be divisible by data.scale={self.scale}")
        return self

    @property
    def lr_size(self) -> int:
        return self.hr_size // self.scale

    @property
    def effective_min_size(self) -> int:
        return self.min_size if self.min_size is not None else self.hr_size

    @property
    def suffixes(self) -> tuple[str, ...]:
        """``extensions`` as lower-case suffixes with their dot, for listing."""
        return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in self.extensions)


class DegradationConfig(Section):
    preset: Literal["xpsr", "realesrgan", "stablesr"] = Field(
        "xpsr", description="xpsr: XPSR's make_train.py (x4plus ranges); realesrgan: x4plus; stablesr: StableSR's milder set"
    )
    usm: bool | None = Field(
        None, description="USM-sharpen the HR crop before degrading and store it as hr.png (default: the preset's: on)"
    )


class PrepareConfig(Section):
    phases: list[Literal["shard", "annotate"]] = Field(default_factory=lambda: ["shard", "annotate"])
    read_num_cpus: float = Field(0.5, gt=0, description="CPUs per read/degrade task (fractional on small machines)")
    shard_parallelism: int | None = Field(None, ge=1, description="shard builders at once (default: cluster CPUs / read_num_cpus)")
    progress: bool = True


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster address; default RAY_ADDRESS or a new local cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a new local cluster (default: all)")


class StorageConfig(Section):
    endpoint_url: str | None = Field(None, description="S3 endpoint; default AWS_ENDPOINT_URL")
    region: str | None = Field(None, description="S3 region; default AWS_REGION, else the bucket's own")

    def open(self, uri: str) -> Store:
        """A local path or ``s3://`` URI as a Store with this endpoint and region."""
        return open_store(uri, self.endpoint_url, self.region)

    def arrow(self, uri: str) -> tuple[Any, str]:
        """``(pyarrow filesystem or None, path)`` of ``uri`` for Ray Data and Ray Train."""
        return arrow_location(uri, self.endpoint_url, self.region)


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    degradation: DegradationConfig = Field(default_factory=DegradationConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    upscale: UpscaleConfig = Field(default_factory=UpscaleConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    input: str | None = Field(None, description="input URI (local folder or s3://bucket/prefix)")
    output: str | None = Field(None, description="output URI")


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"


def _check_keys(raw: Any, model: type[BaseModel], path: str = "") -> None:
    """Raise ConfigError for the first unknown key, naming the nearest valid one."""
    if not isinstance(raw, dict):
        return
    fields = model.model_fields
    for key, value in raw.items():
        dotted = f"{path}{key}"
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{path}{near[0]}'?" if near else f"; valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        annotation = fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _check_keys(value, annotation, dotted + ".")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``dotted.key=value``; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"--set expects dotted.key=value, got {text!r}")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects dotted.key=value, got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), **top: Any) -> Config:
    """Load YAML (default: configs/tiny.yaml), apply ``--set`` overrides and top-level values, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(raw).__name__}")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    for key, value in top.items():
        if value is not None:
            raw[key] = value
    return validate_config(raw)


def validate_config(raw: dict) -> Config:
    """Validate a raw mapping into a Config, with errors that name the dotted key."""
    _check_keys(raw, Config)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            lines.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _key_lines(model: type[BaseModel], prefix: str = "") -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines += _key_lines(ann, f"{prefix}{name}.")
        elif prefix:
            default = field.get_default(call_default_factory=True)
            desc = f"  {field.description}" if field.description else ""
            lines.append(f"  {prefix}{name} = {default!r}{desc}")
    return lines


def build_parser(prog: str, description: str, sections: Sequence[str]) -> argparse.ArgumentParser:
    """The command line every entry point shares; --help lists the keys of ``sections``."""
    keys = []
    for name in sections:
        keys += _key_lines(Config.model_fields[name].annotation, f"{name}.")
    epilog = "commonly used keys (--set KEY=VALUE), with defaults:\n" + "\n".join(keys)
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("--input", default=None, help="input URI: local folder or s3://bucket/prefix")
    parser.add_argument("--output", default=None, help="output URI: local folder or s3://bucket/prefix")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.hr_size=256 (repeatable)")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides, input=args.input, output=args.output)


def parse_cli(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, default_input: str, default_output: str
) -> tuple[argparse.Namespace, Config]:
    """Parse an entry point's command line: logging on, config errors reported by argparse, default URIs."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    cfg.input = absolute_uri(cfg.input or default_input)
    cfg.output = absolute_uri(cfg.output or default_output)
    return args, cfg


def sample_photos() -> str:
    """The bundled sample photos: scikit-image's data folder, installed as a dependency."""
    import skimage.data

    return skimage.data.data_dir


def absolute_uri(uri: str) -> str:
    """``s3://`` URIs as given; local paths made absolute, because Ray Train workers run in their own
    working directory, where a relative ``--output`` would land in Ray's session folder."""
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))
