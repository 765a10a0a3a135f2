"""Measure (verify): classify generated images with a classifier that does not read the edited hook, and
report how far their attribute distribution is from the target and how much of each image was kept;
calibrate the edit strength on a small batch with the same classifier instead of guessing it.
"""

from .calibration import CalibrationConfig, CalibrationResult, Trial, calibrate
from .classifier import (
    EmbeddingClassifier,
    FitConfig,
    FitReport,
    ImageClassifier,
    LinearProbe,
    fit_probe,
)
from .measure import GroupFigures, MeasureReport, Preservation, measure, measure_images, preservation
from .probe_file import load_probe, save_probe
from .report import format_fit, format_report, per_image_table

__all__ = [
    "CalibrationConfig",
    "CalibrationResult",
    "EmbeddingClassifier",
    "FitConfig",
    "FitReport",
    "GroupFigures",
    "ImageClassifier",
    "LinearProbe",
    "MeasureReport",
    "Preservation",
    "Trial",
    "calibrate",
    "fit_probe",
    "format_fit",
    "format_report",
    "load_probe",
    "measure",
    "measure_images",
    "per_image_table",
    "preservation",
    "save_probe",
]
