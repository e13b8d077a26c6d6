"""spasem: the Spatial-Semantic ControlNet SR library (config, storage, shard format, model); no Ray."""
