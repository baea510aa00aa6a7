"""Fine-tuning (cases 3 and 4 of transfer learning): the backbone itself is trained.

- :mod:`.config`: :class:`FineTuneConfig`, the settings;
- :mod:`.network`: the network (backbone + preprocessing layer + new head), freezing, the optimizer
  with the head's learning-rate multiplier;
- :mod:`.data`: the input pipeline (``tf.data`` on TensorFlow, a ``keras.utils.PyDataset`` on JAX and
  PyTorch) and augmentation;
- :mod:`.training`: :func:`fine_tune`, the training phases with checkpoints, resume and early stopping;
- :mod:`.evaluation`: loading a fine-tuned model, predicting, metrics per split, learning curves;
- :mod:`.report`: registering the model and writing its report.
"""
from .config import AUGMENTATIONS, OPTIMIZERS, SCHEDULES, FineTuneConfig, precision_of
from .data import SkipLog, augmentation, make_dataset, split_arrays
from .evaluation import (evaluate_finetuned, load_finetuned, plot_learning_curves, predict_images_array,
                         predict_paths, self_training_for)
from .network import Network, apply_freezing, build_network, keras_pieces, make_optimizer
from .report import evaluate_register_report, register_finetuned
from .training import FineTuneResult, default_strategy, fine_tune

__all__ = ["AUGMENTATIONS", "OPTIMIZERS", "SCHEDULES", "FineTuneConfig", "FineTuneResult", "Network", "SkipLog",
           "apply_freezing", "augmentation", "build_network", "default_strategy", "evaluate_finetuned",
           "evaluate_register_report", "fine_tune", "keras_pieces", "load_finetuned", "make_dataset",
           "make_optimizer", "plot_learning_curves", "precision_of", "predict_images_array", "predict_paths",
           "register_finetuned", "self_training_for", "split_arrays"]
