"""(Runs before conftest imports transformers, whose model modules import Triton.)"""

import torch as _torch

from common.settings import interpret_triton as _interpret_triton

if not _torch.cuda.is_available():  # Triton kernels run in its interpreter here (engine/attention/triton_kernel.py)
    _interpret_triton()
