"""Export a registered model (linear probe or fine-tuned network) for serving without cnncodes.

- :mod:`.fold`: a probe's scikit-learn pipeline as exact affine maps (NumPy, no TensorFlow);
- :mod:`.layers`: those maps, the preprocessing and the pooling as standard Keras layers;
- :mod:`.model`: the deployable network of a registered model, checked against it;
- :mod:`.bundle`: the export folder (keras, SavedModel or TFLite, ``model.json``, the model card);
- :mod:`.card`: the model card.

Nothing here imports TensorFlow at module import time.
"""
from .bundle import export_model, tflite_predict
from .fold import ExportError, fold_pipeline

__all__ = ["ExportError", "export_model", "fold_pipeline", "tflite_predict"]
