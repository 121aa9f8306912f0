"""Training: the loop and its callbacks, schedules, optimizers, the stage plan, lr_find, tasks
and metrics, the weight average, the non-finite guard, parallel training. No files, no YAML."""
