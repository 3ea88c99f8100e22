"""Session-wide set-up: the tests' own modules hold models and datasets that recorded runs
reference, so the test session trusts them (see the trust boundary in
``attribution.record.references``); and ``device=auto`` stays on the CPU even on a GPU machine,
where the bit-for-bit checks hold (the CUDA tests ask for ``cuda`` by name; subprocesses inherit
the setting)."""

import os

from attribution.record.compute import AUTO_VARIABLE
from attribution.record.references import trust

os.environ.setdefault(AUTO_VARIABLE, "cpu")

trust("tests")
