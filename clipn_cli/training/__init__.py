"""CLIPN training: data sources, the starting model, frozen-feature batches, the loop, checkpoints."""

from __future__ import annotations

from .base import Base, load_base
from .data import open_data
from .trainer import StepLog, TrainConfig, TrainResult, train

__all__ = ["Base", "StepLog", "TrainConfig", "TrainResult", "load_base", "open_data", "train"]
