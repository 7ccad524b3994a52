"""kdsl's code generator: partition graphs into kernels and render them into Triton source."""

import os as _os


def _default_to_interpreter() -> None:
    # Triton decides at import time whether its own helpers (tl.cdiv, ...) are interpreted, so the
    # choice must be made before triton is imported: with no GPU device node, kernels run on the
    # CPU through Triton's interpreter unless the user set TRITON_INTERPRET themselves. (Checking
    # device nodes instead of torch.cuda keeps `import codegen` free of a torch import.)
    if "TRITON_INTERPRET" in _os.environ:
        return
    if any(_os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")):
        return
    _os.environ["TRITON_INTERPRET"] = "1"


_default_to_interpreter()
