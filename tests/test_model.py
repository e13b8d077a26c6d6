"""SpatialSemanticControlNet and SRObjective on the tiny profile: zero-init equivalence with a plain
ControlNet (XPSR's DFC heads and semantic fusion included), every stream wired, DFC head shapes of the
real SD 1.5 / 2.1 architectures (on the meta device), save/load round-trip, the trainable/frozen split,
the shard path equal to the online fallback, the scheduler's prediction type, and overfitting 8 samples."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel

from spasem.config.model import LossConfig, ModelConfig
from spasem.encoders import ImageEncoders, encode_prompts
from spasem.model.attention import is_new_layer
from spasem.model.controlnet import SpatialSemanticControlNet
from spasem.model.latents import vae_posterior
from spasem.pixels import signed_to_hwc
from spasem.profiles.real_size import build_from_config
from spasem.profiles.tiny_sd import CLIP_VISION_DIM, DINO_DIM, TEXT_DIM
from training import losses
from training.objective import SRObjective

MODES = [("gated", "standard"), ("attention", "standard"), ("gated", "lgcaa"), ("sfa", "standard")]
K = 4


@pytest.fixture(scope="module")
def unet(tiny):
    return UNet2DConditionModel.from_pretrained(tiny["sd"], subfolder="unet")


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Random weights, as if training had moved them (zero-init layers included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def inputs(seed: int = 0, batch: int = 2, latent: tuple[int, int] = (8, 8)) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, w = latent
    return dict(
        sample=torch.randn(batch, 4, h, w, generator=g), timestep=torch.tensor([10, 700][:batch]),
        controlnet_cond=torch.rand(batch, 3, 8 * h, 8 * w, generator=g) * 2 - 1,
        encoder_hidden_states=torch.randn(batch, 77, TEXT_DIM, generator=g),
        text_low=torch.randn(batch, 77, TEXT_DIM, generator=g), boxes=torch.rand(batch, K, 4, generator=g),
        phrase_embeds=torch.randn(batch, K, TEXT_DIM, generator=g),
        box_mask=torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 0]])[:batch],
        clip_tokens=torch.randn(batch, 17, CLIP_VISION_DIM, generator=g),
        dino_tokens=torch.randn(batch, 17, DINO_DIM, generator=g),
    )


def residuals(out) -> list[torch.Tensor]:
    return [*out.down_block_res_samples, out.mid_block_res_sample]


def build(unet, fusion: str, attention: str) -> SpatialSemanticControlNet:
    return SpatialSemanticControlNet.from_unet(unet, fusion=fusion, attention=attention, max_boxes=K,
                                               clip_dim=CLIP_VISION_DIM, dino_dim=DINO_DIM, lgcaa_window=4)


def new_layers(model: SpatialSemanticControlNet) -> list[torch.nn.Module]:
    procs = [m.processor for m in model.branch.modules() if isinstance(getattr(m, "processor", None), torch.nn.Module)]
    fusions = [m.semantic_fusion for m in model.branch.modules() if hasattr(m, "semantic_fusion")]
    return procs + fusions + [model.position_net, model.clip_restorer, model.dino_restorer]


@pytest.mark.parametrize(("fusion", "attention"), MODES)
def test_untrained_model_equals_plain_controlnet_and_every_stream_is_wired(unet, fusion, attention):
    plain = ControlNetModel.from_unet(unet)
    # a plain ControlNet's residuals are zero until its zero convs move: give them (and the LR
    # encoder's last conv) trained-like weights, shared by both models, so the comparison is not 0 == 0
    for part in (plain.controlnet_down_blocks, plain.controlnet_mid_block, plain.controlnet_cond_embedding.conv_out):
        randomize(part, seed=1)
    model = build(unet, fusion, attention)
    assert (fusion == "sfa") == any(".semantic_fusion." in k for k in model.branch.state_dict())
    loaded = model.branch.load_state_dict(plain.state_dict(), strict=False)
    assert not loaded.unexpected_keys and loaded.missing_keys and all(is_new_layer(k) for k in loaded.missing_keys)
    x = inputs()
    with torch.no_grad():
        ours = model(**x)
        with_heads = model(**x, return_dfc=True)
        ref = plain(x["sample"], x["timestep"], x["encoder_hidden_states"], x["controlnet_cond"], return_dict=False)
    assert ref[1].abs().max() > 1e-3
    # XPSR's DFC heads (default init, not zero) are side outputs: running them changes no residual
    assert ours.dfc_rgb is None and len(with_heads.dfc_rgb) == 3 and len(with_heads.dfc_latent) == len(residuals(ours))
    for a, b, c in zip(residuals(ours), residuals(with_heads), [*ref[0], ref[1]], strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        assert torch.equal(a, b)
    assert ours.clip_pooled.shape == (2, CLIP_VISION_DIM) and ours.dino_pooled.shape == (2, DINO_DIM)

    # once the new outputs move, each stream changes the residuals
    for i, part in enumerate(new_layers(model)):
        randomize(part, seed=10 + i, scale=0.2)
    with torch.no_grad():
        base = residuals(model(**x))
        assert (base[-1] - ref[1]).abs().max() > 1e-4
        for key in ("text_low", "boxes", "phrase_embeds", "clip_tokens", "dino_tokens"):
            noise = torch.randn(x[key].shape, generator=torch.Generator().manual_seed(5))
            changed = dict(x, **{key: x[key] + 0.5 * noise})
            diff = max((a - b).abs().max().item() for a, b in zip(residuals(model(**changed)), base, strict=True))
            assert diff > 1e-5, f"{key} does not reach the residuals"


@pytest.mark.parametrize(("fusion", "attention"), [MODES[1], MODES[2], MODES[3]])
def test_save_load_round_trip_gives_identical_outputs(unet, tmp_path, fusion, attention):
    model = build(unet, fusion, attention)
    randomize(model, seed=3, scale=0.02)
    model.save_pretrained(tmp_path / "controlnet")
    loaded = SpatialSemanticControlNet.from_pretrained(tmp_path / "controlnet")
    assert loaded.config.fusion == fusion and loaded.config.attention == attention and loaded.config.dfc == "xpsr"
    x = inputs(seed=4, latent=(8, 12))  # non-square latents: LGCAA's windows must follow the grid
    with torch.no_grad():
        ours, theirs = model(**x, return_dfc=True), loaded(**x, return_dfc=True)
    # the DFC heads are part of the trained model: the saved folder carries them
    for a, b in zip([*residuals(ours), *ours.dfc_rgb, *ours.dfc_latent],
                    [*residuals(theirs), *theirs.dfc_rgb, *theirs.dfc_latent], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_dfc_heads_follow_xpsr_on_the_real_architectures(arch):
    # real-size layers on the meta device: shapes without weights or compute
    unet = build_from_config(f"{arch}-unet", torch.float32, "meta")
    with torch.device("meta"):
        model = SpatialSemanticControlNet.from_unet(unet, load_weights_from_unet=False)
        dim = unet.config.cross_attention_dim
        x = dict(sample=torch.zeros(1, 4, 64, 64), timestep=torch.tensor([10]),
                 controlnet_cond=torch.zeros(1, 3, 512, 512), encoder_hidden_states=torch.zeros(1, 77, dim))
    with torch.no_grad():
        out = model(**x, return_dfc=True)
    # XPSR's to_rgbs: Conv2d(C, 3, 3) after each stride-2 conv of the (16, 32, 96, 256) encoder
    assert [(h.in_channels, h.out_channels, h.kernel_size) for h in model.dfc_heads.rgb] == [
        (32, 3, (3, 3)), (96, 3, (3, 3)), (256, 3, (3, 3))]
    assert [tuple(r.shape[1:]) for r in out.dfc_rgb] == [(3, 256, 256), (3, 128, 128), (3, 64, 64)]
    # conv_degradation: 12 down residuals + conv_degradation_mid, each Conv2d(C, 4, 3) at its residual's size
    widths = [320] * 4 + [640] * 3 + [1280] * 6
    sizes = [64] * 3 + [32] * 3 + [16] * 3 + [8] * 4
    assert [(h.in_channels, h.out_channels, h.kernel_size) for h in model.dfc_heads.latent] == [
        (c, 4, (3, 3)) for c in widths]
    assert [tuple(r.shape[1:]) for r in out.dfc_latent] == [(4, s, s) for s in sizes]
    assert [r.shape[1:] for r in residuals(out)] == [torch.Size([c, s, s]) for c, s in zip(widths, sizes, strict=True)]


@pytest.fixture(scope="module")
def objective(tiny):
    return SRObjective.from_paths(tiny, ModelConfig(max_boxes=K), LossConfig(pixel_w1=0.1))


def make_batch(n: int, seed: int = 0, hr: int = 64, scale: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    # smooth images (a few random gradients), so LR and HR agree as a real pair would
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, hr), torch.linspace(-1, 1, hr), indexing="ij")
    coef = torch.rand(n, 3, 3, generator=g) * 2 - 1
    images = (coef[..., 0, None, None] * xx + coef[..., 1, None, None] * yy + coef[..., 2, None, None] * 0.5).clamp(-1, 1)
    lr = torch.nn.functional.avg_pool2d(images, scale)
    boxes = torch.zeros(n, K, 4)
    boxes[:, 0] = torch.tensor([0.1, 0.1, 0.6, 0.7])
    return {
        "hr": images, "lr": lr, "caption_high": [f"a photo number {i}" for i in range(n)],
        "caption_low": ["blurry and noisy"] * n, "phrases": [["object"] if i % 2 else [] for i in range(n)],
        "boxes": boxes, "box_mask": (torch.arange(K) == 0).float().expand(n, K).clone(),
    }


def test_only_the_controlnet_is_trainable_and_gets_gradients(objective):
    trainable = {id(p) for p in objective.trainable_parameters()}
    assert trainable == {id(p) for p in objective.controlnet.parameters()}
    frozen = [(n, p) for n, p in objective.named_parameters() if id(p) not in trainable]
    assert frozen and all(not p.requires_grad for _, p in frozen)
    assert {n.split(".")[0] for n, _ in frozen} == {"unet", "vae", "text_encoder", "clip_vision", "dino"}
    objective.zero_grad(set_to_none=True)
    out = objective(make_batch(2), generator=torch.Generator().manual_seed(0))
    # XPSR's DFC: every head's term logged on its own (tiny UNet: 4 down residuals + mid)
    dfc = {f"dfc_rgb_{i}" for i in range(3)} | {f"dfc_latent_{i}" for i in range(5)}
    assert set(out) == {"loss", "diffusion", "degradation_free", "semantic", "pixel_w1"} | dfc
    torch.testing.assert_close(out["degradation_free"], sum(out[k] for k in sorted(dfc)))
    # 0.05 on each term, summed, as XPSR's train.py
    expected = out["diffusion"] + sum(0.05 * out[k] for k in dfc) + 0.1 * out["semantic"] + 0.1 * out["pixel_w1"]
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert all(p.grad is None for _, p in frozen)
    grads = {n: p.grad for n, p in objective.controlnet.named_parameters()}
    # from step one: ControlNet's zero convs (diffusion loss) and the restorers (semantic constraint);
    # everything behind the zero convs waits until they move, as in ControlNet
    for prefix in ("branch.controlnet_mid_block", "branch.controlnet_down_blocks", "clip_restorer", "dino_restorer",
                   "dfc_heads.rgb", "dfc_heads.latent", "branch.controlnet_cond_embedding.blocks"):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), prefix
    objective.zero_grad(set_to_none=True)


def test_shard_members_give_the_same_losses_as_the_online_fallback(objective, tiny):
    batch = make_batch(2, seed=5)
    objective.eval()
    encoders = ImageEncoders.load(tiny["clip_vision"], tiny["dinov2"])
    lr_feats, hr_feats = encoders.encode(signed_to_hwc(batch["lr"])), encoders.encode(signed_to_hwc(batch["hr"]))
    text = torch.stack([encode_prompts(objective.tokenizer, objective.text_encoder, batch["caption_high"]),
                        encode_prompts(objective.tokenizer, objective.text_encoder, batch["caption_low"])], dim=1)
    shard = dict(batch, text=text.half(), latent=vae_posterior(objective.vae, batch["hr"]),
                 clip_lr=lr_feats["clip_tokens"].half(), dino_lr=lr_feats["dino_tokens"].half(),
                 clip_hr=hr_feats["clip_pooled"].half(), dino_hr=hr_feats["dino_pooled"].half())
    with torch.no_grad():
        online = objective(batch, generator=torch.Generator().manual_seed(1))
        stored = objective(shard, generator=torch.Generator().manual_seed(1))
    objective.train()
    for key in online:
        torch.testing.assert_close(stored[key], online[key], rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_target_follows_the_scheduler(objective, monkeypatch, prediction_type):
    seen = {}
    real = losses.diffusion_target

    def spy(latents, noise, timesteps, alphas_cumprod, ptype):
        seen.update(latents=latents, noise=noise, timesteps=timesteps, ptype=ptype)
        seen["target"] = real(latents, noise, timesteps, alphas_cumprod, ptype)
        return seen["target"]

    monkeypatch.setattr(losses, "diffusion_target", spy)
    original = objective.scheduler
    objective.scheduler = DDPMScheduler.from_config(original.config, prediction_type=prediction_type)
    try:
        with torch.no_grad():
            objective(make_batch(2), generator=torch.Generator().manual_seed(2))
    finally:
        objective.scheduler = original
    assert seen["ptype"] == prediction_type
    if prediction_type == "epsilon":
        expected = seen["noise"]
    else:
        expected = original.get_velocity(seen["latents"], seen["noise"], seen["timesteps"])
    torch.testing.assert_close(seen["target"], expected, rtol=1e-5, atol=1e-5)


def test_tiny_model_overfits_eight_samples(tiny):
    torch.manual_seed(0)
    model_cfg = ModelConfig(max_boxes=K, dropout={"text_high": 0, "text_low": 0, "grounding": 0, "visual": 0})
    obj = SRObjective.from_paths(tiny, model_cfg, LossConfig(degradation_free_pixels=False))
    batch = make_batch(8, seed=7, hr=32)
    optimizer = torch.optim.AdamW(obj.trainable_parameters(), lr=5e-3, weight_decay=0.0)
    history = []
    for _ in range(40):
        # the same noise and timesteps every step: the samples become memorizable
        out = obj(batch, generator=torch.Generator().manual_seed(11))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        history.append(out["loss"].item())
    start, end = history[0], min(history[-5:])
    assert end < 0.4 * start, f"loss went from {start:.4f} to {end:.4f}"


@pytest.mark.parametrize("fusion", ["attention", "sfa"])
def test_gradient_checkpointing_gives_the_same_gradients(unet, fusion):
    model = build(unet, fusion, "lgcaa")
    randomize(model, seed=6, scale=0.05)
    x = inputs(seed=7)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.zero_grad(set_to_none=True)
        out = model(**x)
        (sum(r.square().mean() for r in residuals(out)) + out.clip_pooled.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert model.branch.down_blocks[0].gradient_checkpointing
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_dfc_x0_builds_no_heads_and_the_objective_keeps_the_x0_pyramids(unet, tiny):
    model = SpatialSemanticControlNet.from_unet(unet, dfc="x0", max_boxes=K, clip_dim=CLIP_VISION_DIM,
                                                dino_dim=DINO_DIM)
    assert model.dfc_heads is None and not any(k.startswith("dfc_heads") for k in model.state_dict())
    with pytest.raises(ValueError, match="dfc='xpsr'"):
        model(**inputs(), return_dfc=True)
    obj = SRObjective.from_paths(tiny, ModelConfig(max_boxes=K, dfc="x0"), LossConfig(degradation_free_pixels=False))
    with torch.no_grad():
        out = obj(make_batch(2), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "diffusion", "degradation_free", "semantic"}


def _spy_controlled_unet(monkeypatch) -> list[dict]:
    """Records the ControlNet's control image and conditioning of every objective forward."""
    import training.objective as objective_module

    calls, real = [], objective_module.controlled_unet

    def spy(unet, controlnet, noisy, timesteps, control, text_high, **kwargs):
        calls.append(dict(control=control.detach().clone(), text_high=text_high.detach().clone(),
                          **{k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)}))
        return real(unet, controlnet, noisy, timesteps, control, text_high, **kwargs)

    monkeypatch.setattr(objective_module, "controlled_unet", spy)
    return calls


def test_original_image_ratio_conditions_on_the_hr_with_its_quality_caption(objective, tiny, monkeypatch, caplog):
    """XPSR's original_image_ratio: a picked sample's ControlNet input, quality text and visual tokens are
    its HR's; the others keep their LR's. Eval never swaps; shards without the HR's caption never swap."""
    from training.objective import control_image

    n = 8
    batch = dict(make_batch(n, seed=9), caption_low_hr=[f"sharp clean photo {i}" for i in range(n)])
    encoders = ImageEncoders.load(tiny["clip_vision"], tiny["dinov2"])
    hr_tokens = encoders.encode(signed_to_hwc(batch["hr"]))["clip_tokens"]
    lr_tokens = encoders.encode(signed_to_hwc(batch["lr"]))["clip_tokens"]
    low = encode_prompts(objective.tokenizer, objective.text_encoder, batch["caption_low"])
    low_hr = encode_prompts(objective.tokenizer, objective.text_encoder, batch["caption_low_hr"])
    lr_control = control_image(batch["lr"], (64, 64))
    calls = _spy_controlled_unet(monkeypatch)
    saved = objective.model_cfg
    none = saved.dropout.model_copy(update={"text_high": 0, "text_low": 0, "grounding": 0, "visual": 0})
    try:
        for ratio in (1.0, 0.5, 0.0):
            objective.model_cfg = saved.model_copy(update={"original_image_ratio": ratio, "dropout": none})
            with torch.no_grad():
                objective(batch, generator=torch.Generator().manual_seed(4))
        objective.eval()
        objective.model_cfg = saved.model_copy(update={"original_image_ratio": 1.0, "dropout": none})
        with torch.no_grad():
            objective(batch, generator=torch.Generator().manual_seed(4))
        objective.train()
        objective._warned_no_hr_caption = False  # the module's objective warned already in earlier tests
        with torch.no_grad(), caplog.at_level("WARNING"):  # shards annotated without annotate.captions.low_hr
            objective({k: v for k, v in batch.items() if k != "caption_low_hr"}, generator=torch.Generator().manual_seed(4))
    finally:
        objective.model_cfg = saved
        objective.train()
    picked_per_call = []
    for call in calls:
        on_hr = [bool(torch.equal(call["control"][i], batch["hr"][i])) for i in range(n)]
        for i in range(n):
            if on_hr[i]:
                torch.testing.assert_close(call["text_low"][i], low_hr[i])
                torch.testing.assert_close(call["clip_tokens"][i], hr_tokens[i], rtol=1e-4, atol=1e-4)
            else:
                torch.testing.assert_close(call["control"][i], lr_control[i])
                torch.testing.assert_close(call["text_low"][i], low[i])
                torch.testing.assert_close(call["clip_tokens"][i], lr_tokens[i], rtol=1e-4, atol=1e-4)
        picked_per_call.append(sum(on_hr))
    # ratio 1, ratio 0.5 (this seed picks some, not all), ratio 0, eval, no HR caption
    assert picked_per_call[0] == n and 0 < picked_per_call[1] < n and picked_per_call[2:] == [0, 0, 0]
    assert "all samples have no quality caption of the HR" in caplog.text


def test_under_zero3_every_rank_runs_the_encoders_whatever_it_picked(objective, monkeypatch):
    """ZeRO-3 gathers the frozen encoders' partitions collectively: a rank whose draw picked no sample
    must still run them, or its peers wait forever. Partitioned parameters carry DeepSpeed's ``ds_id``."""
    n = 4
    batch = dict(make_batch(n, seed=2), caption_low_hr=["clean"] * n)
    encoded = []
    real = objective.encoders.encode
    monkeypatch.setattr(objective.encoders, "encode", lambda images: encoded.append(len(images)) or real(images))
    saved = objective.model_cfg
    objective.model_cfg = saved.model_copy(update={"original_image_ratio": 1e-9})  # picks nothing
    try:
        for partitioned in (False, True):
            for p in objective.clip_vision.parameters():
                if partitioned:
                    p.ds_id = 0
                elif hasattr(p, "ds_id"):
                    del p.ds_id
            encoded.clear()
            with torch.no_grad():
                objective(batch, generator=torch.Generator().manual_seed(0))
            # the batch has no stored features: the LR's tokens and the HR's pooled targets are computed
            # online (two calls of n rows); under ZeRO-3 a third one on the n HRs for the swap
            assert encoded == ([n, n, n] if partitioned else [n, n])
    finally:
        for p in objective.clip_vision.parameters():
            if hasattr(p, "ds_id"):
                del p.ds_id
        objective.model_cfg = saved


def test_only_samples_with_the_hrs_caption_are_conditioned_on_the_hr(objective, monkeypatch, caplog):
    """Shards may mix samples annotated before ``annotate.captions.low_hr`` with newer ones (a prepare
    resumed across the change): ``has_low_hr`` False keeps the LR, whatever the draw."""
    n = 6
    has = torch.tensor([True, False, True, False, False, True])
    batch = dict(make_batch(n, seed=3), caption_low_hr=["clean" if h else "" for h in has.tolist()], has_low_hr=has)
    calls = _spy_controlled_unet(monkeypatch)
    saved = objective.model_cfg
    objective.model_cfg = saved.model_copy(update={"original_image_ratio": 1.0})
    objective._warned_no_hr_caption = False
    try:
        with torch.no_grad(), caplog.at_level("WARNING"):
            objective(batch, generator=torch.Generator().manual_seed(1))
    finally:
        objective.model_cfg = saved
    on_hr = [bool(torch.equal(calls[0]["control"][i], batch["hr"][i])) for i in range(n)]
    assert on_hr == has.tolist()
    assert "some samples have no quality caption of the HR" in caplog.text
