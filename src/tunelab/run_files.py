"""What a run leaves for others to read: the run directory's file names, the CLI's exit codes and the prefixes of
the one-line messages a run ends with. `tunelab train` writes them and the service (serve/scheduler.py) reads them,
so both import these names from here; the module imports nothing, so the service stays free of torch.
"""

# The run directory (cfg.output_dir), as README's "run directory" describes it.
CONFIG = "config.yaml"  # the run's resolved config; --resume checks the new config against it
METRICS = "metrics.jsonl"  # one JSON object per logged step
LOSS_PLOT = "loss.svg"
FINAL = "final"  # the finished model: an adapter dir or a full model dir
FINAL_TMP, FINAL_OLD = ".final-tmp", ".final-old"  # final/ is replaced atomically through these two
CHECKPOINTS = "checkpoints"  # checkpoints/step-00000100/ ...
STEP_PREFIX = "step-"
EVAL_REPORT = "eval.json"  # what `tunelab eval` writes
# The service's own files in a job's run directory.
JOB_CONFIG = "job.yaml"  # the validated config the service runs `tunelab train` with
TRAIN_LOG = "train.log"  # the child's stdout and stderr
START_MODEL = "start-model"  # continuous tuning: the merged copy of the fine-tuned model a job starts from


def step_dir(step: int) -> str:
    """The name of step STEP's checkpoint directory; zero-padded so that names sort as steps do."""
    return f"{STEP_PREFIX}{step:08d}"


# Exit codes of `tunelab ...`.
EXIT_USER_ERROR = 2  # bad input (UserError): the same input fails the same way again, so never retried
EXIT_TRAINING_ERROR = 3  # a training-time condition with its own message (too many bad steps, a failed save)
EXIT_INTERRUPTED = 130  # stopped on request (SIGINT / SIGTERM) after saving a checkpoint, as a shell reports ^C

# The last line a failed or stopped run prints to stderr starts with one of these; the service shows it as the
# job's error.
ERROR_PREFIX = "error:"
STOPPED_PREFIX = "stopped:"
# A finished run's summary starts with this line, `done at step N/T: ...`: the step it ended at, which the service
# reads when no metrics row came (train.log_every above the run's steps).
DONE_PREFIX = "done at step "
