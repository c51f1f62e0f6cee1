"""The torch devices the engine is tested on: the CPU, and the GPU where torch sees one.

Tests parametrised over :data:`AVAILABLE_DEVICES` check the CPU alone on a machine
without a GPU (CI): nothing is skipped there, and on a GPU machine the same tests
check the CUDA path too.
"""

import torch

AVAILABLE_DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
