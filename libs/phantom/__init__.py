"""Parametric digital phantom: demographics → whole-body (clavicles to pelvis) PET/CT with organ labels.

The embedded default data of TotalGen (demo, tests) and the "deterministic phantom" baseline of the
paper.  See :func:`make_phantom` and :func:`sample_demographics`.
"""

from .anatomy import (
                      ICRP89_MASS_G,
                      body_length_mm,
                      draw_organ_volumes,
                      expected_volume_ml,
                      reference_volume_ml,
                      sample_demographics,
)
from .build import Phantom, make_phantom, subject_rng

__all__ = ["ICRP89_MASS_G", "Phantom", "body_length_mm", "draw_organ_volumes", "expected_volume_ml",
           "make_phantom", "reference_volume_ml", "sample_demographics", "subject_rng"]
