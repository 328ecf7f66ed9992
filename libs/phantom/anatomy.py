"""Reference anatomy and per-subject draws for the digital phantom.

Sources of the numbers (DESIGN.md "Phantom cohort"):
* ICRP Publication 89 reference adult organ masses (male / female), converted to volume with a
  tissue density of 1.05 g/mL; each organ volume is scaled with DuBois body-surface area relative to
  the ICRP reference adult (male 176 cm / 73 kg, female 163 cm / 60 kg) and varied between subjects
  with a log-normal coefficient of variation of 15 %.
* Typical FDG SUVs (liver 2.2 ± 0.4, spleen a little lower, kidneys ≈ 2.5, heart very variable,
  bladder high) and typical CT numbers (fat −100, muscle 40, liver 55, lung −850, bone 700+ HU).
* The body length law of the paper: slices at 2 mm = 146.629 · height_m + 110.419.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..demographics import Demographics

TISSUE_DENSITY_G_PER_ML = 1.05
# ICRP-89 reference organ masses in grams, (male, female).  Kidneys are per kidney.
ICRP89_MASS_G = {
    "liver": (1800.0, 1400.0),
    "spleen": (150.0, 130.0),
    "kidney": (155.0, 138.0),
    "heart": (840.0, 620.0),  # heart with blood
    "pancreas": (140.0, 120.0),
    "brain": (1450.0, 1300.0),  # outside the clavicle→pelvis field of view; kept for reference
}
ICRP89_REFERENCE_BSA_M2 = {"M": 0.007184 * 73.0**0.425 * 176.0**0.725,
                           "F": 0.007184 * 60.0**0.425 * 163.0**0.725}
ORGAN_VOLUME_CV = 0.15
HEIGHT_LAW_SLICES_2MM = (146.629, 110.419)   # slices = a · height_m + b at 2 mm (paper's fit)
BODY_LENGTH_CV = 0.025                        # scatter of real crops around the law


def reference_volume_ml(organ: str, sex: str) -> float:
    """ICRP-89 reference volume (mL) of one organ for the reference adult of that sex."""
    male, female = ICRP89_MASS_G[organ]
    return (male if sex == "M" else female) / TISSUE_DENSITY_G_PER_ML


def expected_volume_ml(organ: str, demo: Demographics) -> float:
    """Population-mean organ volume (mL) for these demographics: ICRP reference × BSA / BSA_ref."""
    return reference_volume_ml(organ, demo.sex) * demo.bsa_m2 / ICRP89_REFERENCE_BSA_M2[demo.sex]


def body_length_mm(height_m: float) -> float:
    """Clavicle→pelvis crop length (mm) predicted by the paper's height law at 2 mm slices."""
    a, b = HEIGHT_LAW_SLICES_2MM
    return 2.0 * (a * height_m + b)


def _lognormal(rng: np.random.Generator, median: float, cv: float) -> float:
    sigma = math.sqrt(math.log1p(cv * cv))
    return float(median * math.exp(rng.normal(0.0, sigma)))


def _truncnorm(rng: np.random.Generator, mean: float, sd: float, lo: float, hi: float) -> float:
    for _ in range(1000):
        v = rng.normal(mean, sd)
        if lo <= v <= hi:
            return float(v)
    return float(np.clip(mean, lo, hi))


# ------------------------------------------------------------------------------------------------
# Demographics like the AutoPET adults (Siemens Biograph mCT cohort of the paper).
def sample_demographics(rng: np.random.Generator, subject_id: str) -> Demographics:
    """One adult: sex ≈ 57 % male; height N(1.77, 0.07) m (M) / N(1.64, 0.065) m (F) in 1.50–2.00;
    BMI log-normal around 25.5 (M) / 25 (F) kg/m² with weight kept in 50–100 kg; age N(60, 14) in 20–100.

    Height and weight are correlated through BMI, and both with sex, as in real cohorts.
    """
    sex = "M" if rng.random() < 0.57 else "F"
    h_mean, h_sd = (1.77, 0.07) if sex == "M" else (1.64, 0.065)
    height = _truncnorm(rng, h_mean, h_sd, 1.50, 2.00)
    bmi_median = 25.5 if sex == "M" else 25.0
    weight = None
    for _ in range(1000):
        w = _lognormal(rng, bmi_median, 0.17) * height**2
        if 50.0 <= w <= 100.0:
            weight = w
            break
    weight = float(np.clip(bmi_median * height**2, 50.0, 100.0)) if weight is None else weight
    age = _truncnorm(rng, 60.0, 14.0, 20.0, 100.0)
    return Demographics(subject_id=subject_id, height_m=round(height, 3), weight_kg=round(weight, 1),
                        sex=sex, age_years=round(age, 1))


# ------------------------------------------------------------------------------------------------
@dataclass
class PhantomParams:
    """Everything drawn for one subject before voxelization (mm, mL, HU, SUV)."""

    length_mm: float
    fat_mm: float                 # subcutaneous fat thickness at the chest
    half_width_mm: float          # mean torso half-width (left-right)
    half_depth_mm: float          # mean torso half-depth (antero-posterior)
    visceral_fat: float           # fraction of abdominal filler that is fat
    volumes_ml: dict[str, float] = field(default_factory=dict)
    suv: dict[str, float] = field(default_factory=dict)
    hu: dict[str, float] = field(default_factory=dict)
    pet_fwhm_mm: float = 6.5
    pet_noise: float = 0.18       # SD of SUV noise = pet_noise · sqrt(SUV) at 2 mm
    ct_noise_hu: float = 18.0     # SD of CT noise at 2 mm
    jitter: dict[str, float] = field(default_factory=dict)


def draw_organ_volumes(demo: Demographics, rng: np.random.Generator) -> dict[str, float]:
    """Organ volumes (mL): ICRP-89 × BSA scaling × log-normal (CV 15 %); bladder and stomach vary more."""
    vols = {organ: _lognormal(rng, expected_volume_ml(organ, demo), ORGAN_VOLUME_CV)
            for organ in ("liver", "spleen", "heart", "pancreas")}
    vols["kidney_right"] = _lognormal(rng, expected_volume_ml("kidney", demo), ORGAN_VOLUME_CV)
    vols["kidney_left"] = _lognormal(rng, expected_volume_ml("kidney", demo), ORGAN_VOLUME_CV)
    vols["gallbladder"] = _lognormal(rng, 35.0, 0.35)
    vols["stomach"] = _lognormal(rng, 300.0 if demo.sex == "M" else 250.0, 0.3)
    vols["urinary_bladder"] = float(rng.uniform(80.0, 400.0))
    return vols


def draw_suv(demo: Demographics, rng: np.random.Generator) -> dict[str, float]:
    """Per-tissue SUVbw for one subject (typical FDG values, DESIGN.md)."""
    liver = _truncnorm(rng, 2.2, 0.4, 1.2, 3.6)
    kidney = _truncnorm(rng, 2.5, 0.4, 1.5, 4.0)
    urine = float(np.clip(_lognormal(rng, 12.0, 0.6), 3.0, 60.0))
    return {
        "air": 0.0, "fat": rng.uniform(0.2, 0.4), "muscle": rng.uniform(0.5, 0.9), "soft": rng.uniform(0.8, 1.2),
        "bowel": rng.uniform(1.0, 1.8), "lung": rng.uniform(0.3, 0.55), "liver": liver,
        "spleen": liver * rng.uniform(0.80, 0.95), "kidney_cortex": kidney,
        "kidney_medulla": kidney * rng.uniform(0.7, 0.9), "renal_pelvis": urine * rng.uniform(0.3, 0.6),
        "myocardium": float(np.clip(_lognormal(rng, 3.5, 0.9), 1.2, 18.0)),
        "blood": liver * rng.uniform(0.7, 0.9), "stomach_wall": rng.uniform(1.3, 2.8),
        "stomach_content": rng.uniform(0.3, 0.7), "gas": 0.02, "pancreas": rng.uniform(1.2, 1.9),
        "gallbladder": rng.uniform(0.4, 0.9), "urine": urine, "cortical_bone": rng.uniform(0.3, 0.6),
        "marrow": rng.uniform(1.2, 2.2), "spinal_canal": rng.uniform(0.3, 0.5), "disc": rng.uniform(0.5, 0.9),
        "visceral_fat": rng.uniform(0.25, 0.45),
    }


def draw_hu(demo: Demographics, rng: np.random.Generator) -> dict[str, float]:
    """Per-tissue mean CT number (HU) for one subject (non-contrast CT)."""
    marrow = 260.0 - 1.6 * (demo.age_years - 20.0) + rng.normal(0.0, 25.0)  # trabecular loss with age
    return {
        "air": -1000.0, "fat": rng.normal(-100.0, 8.0), "muscle": rng.normal(45.0, 5.0),
        "soft": rng.normal(35.0, 5.0), "bowel": rng.normal(25.0, 6.0), "lung": rng.normal(-850.0, 30.0),
        "liver": rng.normal(55.0, 6.0), "spleen": rng.normal(45.0, 4.0), "kidney_cortex": rng.normal(35.0, 4.0),
        "kidney_medulla": rng.normal(30.0, 4.0), "renal_pelvis": 10.0, "myocardium": rng.normal(42.0, 4.0),
        "blood": rng.normal(40.0, 4.0), "stomach_wall": rng.normal(40.0, 5.0), "stomach_content": 15.0,
        "gas": -950.0, "pancreas": rng.normal(40.0, 5.0), "gallbladder": 10.0, "urine": 8.0,
        "cortical_bone": rng.normal(900.0, 80.0), "marrow": max(marrow, 90.0), "spinal_canal": 25.0,
        "disc": 85.0, "visceral_fat": rng.normal(-95.0, 8.0),
    }


def draw_params(demo: Demographics, rng: np.random.Generator) -> PhantomParams:
    """All random quantities of one phantom subject, from its demographics."""
    length = body_length_mm(demo.height_m) * _lognormal(rng, 1.0, BODY_LENGTH_CV)
    female = demo.sex == "F"
    fat = float(np.clip((1.8 * (demo.bmi - 17.0) + (6.0 if female else 0.0)) * rng.uniform(0.85, 1.15), 3.0, 45.0))
    # Trunk ≈ 50 % of body mass at ~0.97 g/mL spread over the crop length → mean cross-section area.
    area_mm2 = 0.52 * demo.weight_kg * 1e6 / length * rng.uniform(0.93, 1.07)
    ratio = float(np.clip(1.48 - 0.012 * (demo.bmi - 22.0) - (0.05 if female else 0.0), 1.15, 1.6))
    half_width = math.sqrt(area_mm2 / math.pi * ratio)
    half_depth = math.sqrt(area_mm2 / (math.pi * ratio))
    visceral = float(np.clip(0.10 + 0.02 * (demo.bmi - 20.0) + (0.0 if female else 0.08), 0.05, 0.5))
    jitter = {k: float(rng.normal(0.0, 1.0)) for k in
              ("diaphragm", "heart", "liver", "kidneys", "spine", "bladder", "stomach", "spleen")}
    return PhantomParams(length_mm=length, fat_mm=fat, half_width_mm=half_width, half_depth_mm=half_depth,
                         visceral_fat=visceral, volumes_ml=draw_organ_volumes(demo, rng),
                         suv=draw_suv(demo, rng), hu=draw_hu(demo, rng),
                         pet_fwhm_mm=float(rng.uniform(6.0, 7.0)), pet_noise=float(rng.uniform(0.12, 0.22)),
                         ct_noise_hu=float(rng.uniform(12.0, 25.0)), jitter=jitter)


# Tissue classes of the phantom (index = class id in the tissue volume).  Each has a CT number
# (:func:`draw_hu`) and an SUV (:func:`draw_suv`) per subject; labels are a separate volume.
TISSUES = ("air", "fat", "muscle", "soft", "bowel", "lung", "liver", "spleen", "kidney_cortex",
           "kidney_medulla", "renal_pelvis", "myocardium", "blood", "stomach_wall", "stomach_content", "gas",
           "pancreas", "gallbladder", "urine", "cortical_bone", "marrow", "spinal_canal", "disc",
           "visceral_fat")
TISSUE = {name: i for i, name in enumerate(TISSUES)}
