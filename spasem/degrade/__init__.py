"""Real-ESRGAN-style degradations: kernels, pure image operations, parameter sampling."""
