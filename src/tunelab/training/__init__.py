"""The training loop (loop.py: Trainer.setup builds a run, Trainer.run steps it) and the machinery only it uses:
preflight checks, the process group and wrapping (distributed), what a checkpoint holds (run_state) and its
on-disk format (checkpoint), the optimizer and schedule (optim), where metrics go (tracking).

Named `training`, not `train`: `tunelab.train` is the public function (`from tunelab import train`), and a
subpackage of that name would replace it on the package once imported."""
