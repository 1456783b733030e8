"""The tuning service's client side, stdlib only so that `import tunelab` stays light: the Python client
(service.py: tunelab.init, TuningJob, GenerativeModel), the managed-service workflow (tuning/, imported as
`from tunelab.tuning import sft`) and `tunelab jobs` (jobs_cli.py)."""

from tunelab.client.service import Client, GenerativeModel, Response, ServiceError, TuningJob, client, init

__all__ = ["Client", "GenerativeModel", "Response", "ServiceError", "TuningJob", "client", "init"]
