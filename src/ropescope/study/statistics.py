"""The statistics moved to `ropescope.statistics`; this name stays until its last importer moves."""

from ropescope.statistics import auroc  # noqa: F401
