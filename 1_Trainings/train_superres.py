#!/usr/bin/env python
"""Train the residual super-resolution stage (paper: 56×56×96 patches of 224×224×384 volumes).

    python 1_Trainings/train_superres.py --config 1_Trainings/configs/superres_paper.yaml
    torchrun --nproc_per_node 4 1_Trainings/train_superres.py --config 1_Trainings/configs/superres_paper.yaml

The config names the low-resolution preset it pairs with (`lowres_config`); grid, polyphase factor, voxel
size, intensity standardization and height law come from there. Rerunning the same command resumes.
"""

from libs.cli import training_command
from libs.superres import SRConfig, load_pairing, train_superres

main = training_command(SRConfig, train_superres, "Train (or resume) the residual super-resolution diffusion model.",
                        check=load_pairing)

if __name__ == "__main__":
    main()
