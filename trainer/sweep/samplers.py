"""Optuna's samplers and pruners as the space file names them (none written here), with the one
addition a shared study needs: a seed per trial rather than per process."""

from __future__ import annotations

import json

import optuna

from trainer.sweep.space import Space


def make_sampler(space: Space) -> optuna.samplers.BaseSampler:
    s = space.sampler
    if s.name == "grid":
        grid = {k: [choice_key(v) for v in p.choice] for k, p in space.params.items()}
        make = lambda seed: optuna.samplers.GridSampler(grid, seed)  # noqa: E731
    elif s.name == "random":
        make = lambda seed: optuna.samplers.RandomSampler(seed=seed)  # noqa: E731
    else:  # constant_liar: workers in parallel try different points
        make = lambda seed: optuna.samplers.TPESampler(  # noqa: E731
            n_startup_trials=s.startup_trials, seed=seed, constant_liar=True
        )
    return make(None) if s.seed is None else TrialSeeded(make, s.seed)


class TrialSeeded(optuna.samplers.BaseSampler):
    """A seeded sampler whose draws for trial n come from a generator of (seed, n), as the data's
    batches come from (seed, epoch, batch): one seeded sampler per process would make every worker
    of a shared study, and every re-run of a stopped one, draw the first worker's points again."""

    def __init__(self, make, seed: int):
        self.make, self.seed = make, seed
        self.inner = make(seed)

    def before_trial(self, study, trial) -> None:
        import numpy as np

        self.inner = self.make(int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0]))
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def make_pruner(space: Space) -> optuna.pruners.BasePruner:
    p = space.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, p.warmup_epochs))
    return optuna.pruners.NopPruner()


def choice_key(value):
    """Optuna's categorical choices are plain values: a list (model.layers) goes as its YAML text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)
