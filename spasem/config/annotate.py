"""Config sections for the models (profiles) and the annotation stages of prepare.

`spasem.config` composes them into the one tree as ``models`` and ``annotate``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# XPSR's high-level prompt as its caption scripts write it (the paper's text drops the final period)
HIGH_PROMPT = "Please provide a descriptive summary of the content of this image."
LOW_PROMPT = (
    "Please describe the quality of this image and evaluate it based on factors such as clarity, color, "
    "noise, and lighting"
)
# the grounding queries: asked after the same image prefix as the captions, so it costs only its tokens
OBJECTS_PROMPT = "List the objects in this image as short noun phrases, separated by commas"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelsConfig(_Section):
    profile: str = Field("tiny", description="tiny: random-init models built once into cache_dir; else real ids")
    cache_dir: str = Field(".cache/models", description="where the tiny profile's models are built")
    llava: str = Field("llava-hf/llava-1.5-7b-hf", description="LLaVA (hub id or local path)")
    grounding_dino: str = Field("IDEA-Research/grounding-dino-base", description="Grounding DINO")
    clip_vision: str = Field("openai/clip-vit-large-patch14", description="CLIP image encoder")
    dinov2: str = Field("facebook/dinov2-base", description="DINOv2")
    sd: str = Field("stable-diffusion-v1-5/stable-diffusion-v1-5", description="SD base: vae, text_encoder, unet")
    dtype: str = Field("float32", description="float32 | bfloat16 | float16")
    device: str = Field("cpu", description="cpu | cuda | cuda:N")


class StagePoolConfig(_Section):
    enabled: bool = True
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(0.5, gt=0)
    pool_size: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1, description="micro-batch inside a shard (rows per model call)")
    compile: bool = Field(False, description="GPU: torch.compile the stage's models (static KV cache for LLaVA)")


class CaptionsConfig(StagePoolConfig):
    backend: str = Field("transformers", description="transformers | vllm (own runtime_env) | llava_torch")
    high_prompt: str = HIGH_PROMPT
    low_prompt: str = LOW_PROMPT
    objects_prompt: str = Field(OBJECTS_PROMPT, description="asked about the LR: the objects grounding looks for")
    max_new_tokens: int = Field(64, ge=1)
    template: Literal["xpsr", "chat"] = Field(
        "xpsr", description="prompt format: xpsr, XPSR's caption scripts' '<image>\\nUSER: {prompt} \\nASSISTANT:'; "
                            "chat, the checkpoint's chat template"
    )
    high_on: Literal["hr", "lr"] = Field(
        "hr", description="image of the high-level caption: hr as XPSR trains (upscale has only the lr)"
    )
    low_on: Literal["lr", "hr"] = Field("lr", description="image of the low-level (quality) caption: lr as XPSR")
    low_hr: bool = Field(
        True, description="also ask the low-level prompt about the HR (XPSR's lowlevel_prompt_q_GT): the caption "
                          "training uses when it conditions on the HR (model.original_image_ratio)"
    )
    max_objects: int = Field(8, ge=0, description="objects listed for grounding (0: no objects prompt)")


class GroundingConfig(StagePoolConfig):
    box_threshold: float = Field(0.35, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    nms_iou: float = Field(0.5, ge=0, le=1)
    max_boxes: int = Field(8, ge=1)


class AnnotateConfig(_Section):
    shards_per_wave: int = Field(64, ge=1, description="shards per Ray Data execution (pools start once per wave)")
    captions: CaptionsConfig = Field(default_factory=CaptionsConfig)
    grounding: GroundingConfig = Field(default_factory=GroundingConfig)
    embeddings: StagePoolConfig = Field(default_factory=StagePoolConfig)
    encode: StagePoolConfig = Field(default_factory=StagePoolConfig)
