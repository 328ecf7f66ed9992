"""Real data → cohort directory: DICOM/AutoPET import, SUV (QIBA), segmentation, crop, height law.

The work directory written by the import steps (``1_dicom_to_nifti.py``, ``1b_import_autopet_nifti.py``)::

    WORK/
      demographics.csv          subject_id,height_m,weight_kg,sex,age_years (rebuilt from meta/ at the end)
      ct/<subject_id>.nii.gz    CT in HU, int16, the CT series' own grid
      suv/<subject_id>.nii.gz   PET as SUVbw, float32, the PET series' own grid
      labels/<subject_id>.nii.gz  TotalSegmentator 'total' ids on the CT grid (``2_segment_organs.py``)
      meta/<subject_id>.json    demographics and non-identifying provenance (SUV rule, vendor, grids)
      skipped.csv               subject_id,reason for every study refused (untrusted SUV, missing data)

``3_crop_and_resample.py`` turns it into the cohort directory of DESIGN.md.
"""
