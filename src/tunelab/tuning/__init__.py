"""`from tunelab.tuning import sft`: the public name of the managed-service workflow, which lives with the rest of
the client in tunelab/client/tuning/."""

from tunelab.client.tuning import TuningJob, sft

__all__ = ["TuningJob", "sft"]
