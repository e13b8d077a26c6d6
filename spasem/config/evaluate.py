"""Config section of ``pipeline.evaluate`` (issue 7); `spasem.config` composes it into the one tree."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    reference: str | None = Field(None, description="HR reference URI (--reference); paired by relative path")
    lr: str | None = Field(None, description="LR input URI (--lr), optional: shown in the report's crops")
    protocol: Literal["basicsr", "pyiqa"] = Field(
        "basicsr", description="PSNR/SSIM formulas: basicsr (crop scale px, Y) or pyiqa (XPSR/SeeSR tables: no crop)"
    )
    crop_border: int | None = Field(
        None, ge=0, description="border cropped before PSNR/SSIM (default: data.scale for basicsr, 0 for pyiqa)"
    )
    clip_model: str | None = Field(
        None, description="CLIP folder (save_pretrained) for clip_good_photo (not pyiqa's clipiqa); none: skipped"
    )
    pyiqa_metrics: list[str] = Field(
        default_factory=list, description="pyiqa metrics (musiq, maniqa, lpips, ...); used where pyiqa and weights exist"
    )
    device: str = Field("cpu", description="torch device of the CLIP and pyiqa models")
    crop_size: int = Field(128, ge=8, description="side of the report crops, in HR pixels")
    report_images: int = Field(24, ge=0, description="images that get crops in the report (all are in the table)")

    def effective_crop_border(self, scale: int) -> int:
        """BasicSR crops ``scale`` px from each border; pyiqa's psnr/ssim (XPSR's test.py) crop nothing."""
        if self.crop_border is not None:
            return self.crop_border
        return scale if self.protocol == "basicsr" else 0
