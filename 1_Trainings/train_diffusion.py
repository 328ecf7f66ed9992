#!/usr/bin/env python
"""The original project's name for the low-resolution trainer (its Quick Start line):

    cd 1_Trainings && python train_diffusion.py --config config_lowres.yaml

Same command, options and behaviour as train_lowres.py.
"""

from libs.cli import training_command
from libs.lowres import LowresConfig, train_lowres

main = training_command(LowresConfig, train_lowres,
                        "Train (or resume) the low-resolution diffusion model (alias of train_lowres.py).")

if __name__ == "__main__":
    main()
