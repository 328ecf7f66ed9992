#!/usr/bin/env python
"""Train the low-resolution stage (demographics → 56×56×96 PET/CT at 8 mm for the paper preset).

    python 1_Trainings/train_lowres.py --config 1_Trainings/configs/lowres_paper.yaml
    torchrun --nproc_per_node 4 1_Trainings/train_lowres.py --config 1_Trainings/configs/lowres_paper.yaml

Rerunning the same command resumes from the newest checkpoint in the run folder.
"""

from libs.cli import training_command
from libs.lowres import LowresConfig, train_lowres

main = training_command(LowresConfig, train_lowres,
                        "Train (or resume) the demographics-conditioned low-resolution diffusion model.")

if __name__ == "__main__":
    main()
