"""Where kdsl keeps files of its own: one cache root for kernels, tuning data, corpora."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(*parts: str, create: bool = True) -> Path:
    """``$KDSL_CACHE_DIR`` (tests and CI point it at a temp dir) or the user's cache dir, plus ``parts``."""
    root = os.environ.get("KDSL_CACHE_DIR")
    if not root:
        import platformdirs

        root = platformdirs.user_cache_dir("kdsl")
    path = Path(root).joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path
