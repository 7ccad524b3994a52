"""kdsl's code generator: partition graphs into kernels and render them into Triton source."""

import os as _os


def _default_to_interpreter() -> None:
    # Triton decides at import time whether its own helpers (tl.cdiv, ...) are interpreted, so the
    # choice must be made before triton is imported: with no CUDA device, kernels run on the CPU
    # through Triton's interpreter unless the user set TRITON_INTERPRET themselves.
    if "TRITON_INTERPRET" in _os.environ:
        return
    try:
        import torch

        if torch.cuda.is_available():
            return
    except ImportError:  # pragma: no cover
        return
    _os.environ["TRITON_INTERPRET"] = "1"


_default_to_interpreter()
