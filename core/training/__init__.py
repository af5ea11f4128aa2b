"""What every trainer shares: run folders, typed base config, no-pickle checkpoints, curves, the loop.

The dense, generative and reader trainers each supply a model, a batch source, a loss and an
evaluator; this package does the rest the same way for all of them.
"""
from core.training.config import TrainConfig
from core.training.loop import TrainLoop, train
from core.training.run import RunFolder

__all__ = ["TrainConfig", "RunFolder", "TrainLoop", "train"]
