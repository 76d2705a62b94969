"""Test setup shared by all test files.

XLA reads `XLA_FLAGS` once, when jax initializes its CPU backend, so the flag
that splits the host into 8 CPU devices is set here, before any test module
imports jax. `jax.devices()` therefore returns 8 CPU devices in every test,
and tests that need one device use `jax.devices()[0]`. A value of `XLA_FLAGS`
set before pytest starts is kept.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# The modules under test (model.py, checkpoint.py, ...) are at the repository root.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
