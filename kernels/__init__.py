"""GPU kernels (installed as ``curvature.kernels``).

No Triton kernels exist yet: every operation runs through the torch implementations in the core.
"""
