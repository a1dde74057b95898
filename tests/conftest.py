"""Shared test settings: no network (model hubs are unreachable here), paths to the shared test data."""

import os
from pathlib import Path

# Set before anything imports huggingface_hub, so hub look-ups fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# The real test data (PF-Willow, an SPair-71k sample, PF-Pascal pairs): $SDM_TEST_DATA, else ../shared/data.
SHARED_DATA = Path(os.environ.get("SDM_TEST_DATA") or REPO.parent / "shared" / "data")
# Subprocess tests run quick commands (seconds on an idle 2-core machine) but CI machines may be busy (load 3-6
# made a 29 s command take 6 minutes): a limit that only catches a hang.
SUBPROCESS_TIMEOUT = 1800
