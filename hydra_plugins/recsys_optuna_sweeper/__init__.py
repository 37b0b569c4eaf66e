"""The `optuna` sweeper of this project (configs/hydra/sweeper/optuna.yaml), a Hydra plugin:
Hydra imports every module of the `hydra_plugins` namespace package at start-up to find it."""
