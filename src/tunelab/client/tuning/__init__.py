"""The managed-service workflow: `from tunelab.tuning import sft; job = sft.train(...)`."""

from tunelab.client import TuningJob

__all__ = ["TuningJob"]
