"""Training: TrainState, compiled steps, the fit loop with callbacks, checkpoints, config-driven runs."""

from jaxnn.train.callbacks import Callback, EarlyStopping, FitContext
from jaxnn.train.checkpoint import CheckpointError, Checkpointer
from jaxnn.train.fit import (FitResult, LogOptions, NonFiniteLossError, StepOptions, create_train_state, evaluate,
                             fit)
from jaxnn.train.population import (PopulationOptions, PopulationResult, ensemble_metrics, population_grid,
                                    train_population)
from jaxnn.train.run import (LoadedRun, RunFolderError, check_config, load_run, restore_state, train_from_config,
                             train_run)
from jaxnn.train.state import TrainState
from jaxnn.train.step import make_eval_step, make_train_step
from jaxnn.train.word2vec import Word2VecOptions, Word2VecResult, train_word2vec

__all__ = [
    "Callback", "EarlyStopping", "FitContext", "CheckpointError", "Checkpointer", "FitResult", "NonFiniteLossError",
    "create_train_state", "evaluate", "fit", "LogOptions", "StepOptions", "LoadedRun", "RunFolderError",
    "check_config", "load_run", "restore_state", "train_from_config", "train_run", "TrainState", "make_eval_step", "make_train_step",
    "PopulationOptions", "PopulationResult", "ensemble_metrics", "population_grid", "train_population",
    "Word2VecOptions", "Word2VecResult", "train_word2vec",
]
