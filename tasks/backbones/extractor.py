"""The extraction forward pass: a backbone cut at several layers, each pooled, compiled once."""
from __future__ import annotations

from typing import Sequence

import numpy as np


from .. import tf_runtime
from .build import TIME_POOLINGS, Backbone, _preprocess_fn, pooled_shape, segment_bounds, time_segments


class Extractor:
    """A backbone cut at several layers, each pooled, as one compiled forward pass.

    ``extractor(batch_uint8)`` takes ``(n, size, size, 3)`` uint8 RGB and
    returns one float32 array per (layer, pooling), in the order given. Poolings: ``avg`` and ``max``
    over the whole map, ``time-avg`` and ``time-max`` over its width only (a spectrogram's time axis;
    ``(n, height * channels)``, row by row), ``time-avgK`` over each of K time segments
    (``(n, height * K * channels)``), ``flatten``, ``none``.
    """

    def __init__(self, backbone: Backbone, cuts: Sequence[tuple[str, str]], xla: bool = False):
        tf = tf_runtime.tensorflow()
        keras = tf_runtime.keras()
        self.backbone = backbone
        self.cuts = list(cuts)
        backbone.check_layers([layer for layer, _ in self.cuts])
        layers = list(dict.fromkeys(layer for layer, _ in self.cuts))
        self.shapes = [pooled_shape(backbone.output_shape(layer), pooling, layer) for layer, pooling in self.cuts]
        model = backbone.model
        cut = keras.Model(model.inputs, [model.get_layer(layer).output for layer in layers])
        self.model = cut  # the network that runs: its layers compute in the backbone's precision
        where = {layer: i for i, layer in enumerate(layers)}
        pre = _preprocess_fn(backbone.spec)
        cuts_ = self.cuts
        self.images_seen = 0  # rows that went through the backbone: what incremental runs are judged by

        # jit_compile: XLA fuses the pooling and casts into the network's kernels (GPUs gain most).
        @tf.function(input_signature=[tf.TensorSpec([None, backbone.size, backbone.size, 3], tf.uint8)],
                     jit_compile=bool(xla))
        def forward(x):
            x = tf.cast(x, tf.float32)
            if pre is not None:
                x = pre(x)
            outs = cut(x, training=False)
            if not isinstance(outs, (list, tuple)):
                outs = [outs]
            res = []
            for layer, pooling in cuts_:
                y = tf.cast(outs[where[layer]], tf.float32)
                if pooling == "avg":
                    y = tf.reduce_mean(y, axis=[1, 2])
                elif pooling == "max":
                    y = tf.reduce_max(y, axis=[1, 2])
                elif pooling in TIME_POOLINGS:  # over the width (time); rows (frequency) kept
                    reduce = tf.reduce_max if pooling == "time-max" else tf.reduce_mean
                    parts = [reduce(y[:, :, a:b, :], axis=2)
                             for a, b in segment_bounds(int(y.shape[2]), time_segments(pooling))]
                    y = parts[0] if len(parts) == 1 else tf.stack(parts, axis=2)
                    y = tf.reshape(y, [tf.shape(y)[0], -1])
                elif pooling == "flatten":
                    y = tf.reshape(y, [tf.shape(y)[0], -1])
                res.append(y)
            return res

        self._forward = forward
        # Trace and optimise the graph now, on one image, so that the cost lands in the build
        # and the first real batch runs at full speed.
        forward(tf.zeros([1, backbone.size, backbone.size, 3], tf.uint8))

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        self.images_seen += int(batch.shape[0])
        return [o.numpy() for o in self._forward(batch)]
