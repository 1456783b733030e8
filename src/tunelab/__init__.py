"""tunelab: fine-tune language models from one YAML file."""

import importlib

__version__ = "0.1.0"

# Loaded on first use, so `import tunelab` stays light: the tuning service's client (`tunelab.init(url=...)`).
_LAZY = {"init": "tunelab.client", "GenerativeModel": "tunelab.client", "TuningJob": "tunelab.client",
         "ServiceError": "tunelab.client"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    return getattr(module, name)
