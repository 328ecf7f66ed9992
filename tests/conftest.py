"""Shared test settings: keep numeric libraries to the CI machine's two cores."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
