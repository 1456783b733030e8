"""tunelab: fine-tune language models from one YAML file.

`import tunelab` stays light (no torch): every name below is imported on first use.

    from tunelab import train, load_config, evaluate, merge, generate, UserError   # the Python API (tunelab.api)
    import tunelab; tunelab.init(url=...); tunelab.GenerativeModel(...)             # the tuning service's client
"""

import importlib

__version__ = "0.1.0"

# name -> the module that defines it, loaded on first use.
_LAZY = {
    "train": "tunelab.api",
    "load_config": "tunelab.api",
    "evaluate": "tunelab.api",
    "merge": "tunelab.api",
    "generate": "tunelab.api",
    "UserError": "tunelab.config",
    "init": "tunelab.client",
    "GenerativeModel": "tunelab.client",
    "TuningJob": "tunelab.client",
    "ServiceError": "tunelab.client",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    return getattr(module, name)
