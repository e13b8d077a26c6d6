"""The Spatial-Semantic ControlNet, its SR pipeline, latents and tiled sampling."""
