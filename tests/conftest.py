"""Shared test settings: no network (model hubs are unreachable here), paths to the shared test data."""

import os
from pathlib import Path

# Set before anything imports huggingface_hub, so hub look-ups fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
