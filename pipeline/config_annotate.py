"""Config sections for the models (profiles) and the annotation stages of prepare.

Owned by the annotation work (issue 4); `pipeline.config` composes them into the one tree.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelsConfig(_Section):
    profile: str = Field("tiny", description="tiny (random-init, built into cache_dir) or a named real profile")
    cache_dir: str = Field(".cache/models", description="where tiny models are built once and loaded by path")


class StagePoolConfig(_Section):
    enabled: bool = True
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(0.5, gt=0)
    pool_size: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)


class AnnotateConfig(_Section):
    captions: StagePoolConfig = Field(default_factory=StagePoolConfig)
    grounding: StagePoolConfig = Field(default_factory=StagePoolConfig)
    embeddings: StagePoolConfig = Field(default_factory=StagePoolConfig)
    encode: StagePoolConfig = Field(default_factory=StagePoolConfig)
