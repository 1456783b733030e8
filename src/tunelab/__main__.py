import os
import sys

from tunelab.cli import main

code = main()
if "TORCHELASTIC_RUN_ID" in os.environ:
    # A torchrun rank has written, flushed and closed everything by now. Ending it without interpreter
    # finalization avoids a known abort there: gloo's C++ worker threads torn down during finalization call
    # std::terminate ("terminate called without an active exception", pytorch/pytorch#179291), which turns a
    # finished run into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
