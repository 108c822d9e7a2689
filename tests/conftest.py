import os
import pathlib
import sys

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when curvature.kernels is first
# imported: set it here, before any test module imports the package. With a CUDA device the
# kernels run for real instead (set TRITON_INTERPRET=0 to force that choice either way).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# The dense ground-truth helpers live beside the tests.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
