"""tunelab: fine-tune language models from one YAML file."""

__version__ = "0.1.0"

# The tuning service's client, loaded on first use so `import tunelab` stays light.
_LAZY = {"init": "tunelab.client", "GenerativeModel": "tunelab.client", "TuningJob": "tunelab.client",
         "ServiceError": "tunelab.client"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
