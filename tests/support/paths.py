"""Where the repository and the tests' cache are."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Tokenizers, tables and tiny models, converted or fitted once (``TOKENBRIDGE_CACHE`` overrides).
CACHE_DIR = Path(os.environ.get("TOKENBRIDGE_CACHE", REPO / ".cache"))
