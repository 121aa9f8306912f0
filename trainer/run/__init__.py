"""A run: the fit spine, the session, the learner builder, the checkpoint and resume format, the
run directory and its status, signals, the machine's settings, distributed start and launch."""
