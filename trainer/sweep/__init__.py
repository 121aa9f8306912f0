"""`trainer sweep`: hyperparameter search with Optuna over ordinary runs."""
