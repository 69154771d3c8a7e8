"""Where pitsearch's Hydra config tree and sweep files live.

They sit at the top of the repository (`conf/`, `sweeps/`) so users can read and copy them; the README install
is editable, so they are found from the package's location, whatever the working directory.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
SWEEPS_DIR = REPO_ROOT / "sweeps"
MODEL_CONF_DIR = CONF_DIR / "model"
