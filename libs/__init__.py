"""TotalGen shared library: volumes I/O, intensity transforms, demographics, phantom, models.

Array convention (used everywhere in this package): a volume is a numpy array indexed
``[x, y, z]`` in RAS+ order — x runs towards the subject's Right, y towards Anterior, z towards
Superior — so ``z = 0`` is the most inferior slice.  Torch tensors add batch and channel in front:
``(B, C, X, Y, Z)``.  :mod:`libs.volumes` reorients every file it reads to this order.
"""

__version__ = "0.1.0"
