#!/usr/bin/env python
"""Train the label stage: organ labels predicted from (generated) CT + PET and demographics.

    python 1_Trainings/train_labels.py --config 1_Trainings/configs/labels_bench.yaml

It trains on the cohort's own images and labels (phantoms, or a real cohort with TotalSegmentator labels from
0_Preprocess/2_segment_organs.py); 2_Tests/infer.py --labels then writes labels/<id>.nii.gz for every generated
subject. Rerunning the same command resumes from the newest checkpoint in the run folder.
"""

from libs.cli import training_command
from libs.labelstage import LabelConfig, train_labels

main = training_command(LabelConfig, train_labels,
                        "Train (or resume) the label stage: organ labels from CT + PET and demographics.")

if __name__ == "__main__":
    main()
