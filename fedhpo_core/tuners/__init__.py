"""Tuners: what decides each client's hyperparameters, round by round. A module per method."""

from fedhpo_core.tuners.base import FixedConfig, PerClientConfig, Tuner

__all__ = ["FixedConfig", "PerClientConfig", "Tuner"]
