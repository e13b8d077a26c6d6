"""Vision-language captioning backends (LLaVA) behind one interface."""
