"""The extraction forward pass: a backbone cut at several layers, each pooled, compiled once."""
from __future__ import annotations

from typing import Sequence

import numpy as np


from .. import runtime
from .build import TIME_POOLINGS, Backbone, pooled_shape, preprocess_fn, segment_bounds, time_segments


class Extractor:
    """A backbone cut at several layers, each pooled, as one compiled forward pass.

    ``extractor(batch_uint8)`` takes ``(n, size, size, 3)`` uint8 RGB and
    returns one float32 array per (layer, pooling), in the order given. Poolings: ``avg`` and ``max``
    over the whole map, ``time-avg`` and ``time-max`` over its width only (a spectrogram's time axis;
    ``(n, height * channels)``, row by row), ``time-avgK`` over each of K time segments
    (``(n, height * K * channels)``), ``flatten``, ``none``.
    """

    def __init__(self, backbone: Backbone, cuts: Sequence[tuple[str, str]], xla: bool = False):
        keras = runtime.keras()
        ops = keras.ops
        self.backbone = backbone
        self.cuts = list(cuts)
        backbone.check_layers([layer for layer, _ in self.cuts])
        layers = list(dict.fromkeys(layer for layer, _ in self.cuts))
        self.shapes = [pooled_shape(backbone.output_shape(layer), pooling, layer) for layer, pooling in self.cuts]
        model = backbone.model
        cut = keras.Model(model.inputs, [model.get_layer(layer).output for layer in layers])
        self.model = cut  # the network that runs: its layers compute in the backbone's precision
        where = {layer: i for i, layer in enumerate(layers)}
        pre = preprocess_fn(backbone.spec)
        cuts_ = self.cuts
        self.images_seen = 0  # rows that went through the backbone: what incremental runs are judged by
        self.backend = runtime.backend()

        def pooled(outs):
            """Each cut's output pooled, in keras.ops: the same arithmetic on every backend."""
            if not isinstance(outs, (list, tuple)):
                outs = [outs]
            res = []
            for layer, pooling in cuts_:
                y = ops.cast(outs[where[layer]], "float32")
                if pooling == "avg":
                    y = ops.mean(y, axis=(1, 2))
                elif pooling == "max":
                    y = ops.max(y, axis=(1, 2))
                elif pooling in TIME_POOLINGS:  # over the width (time); rows (frequency) kept
                    reduce = ops.max if pooling == "time-max" else ops.mean
                    parts = [reduce(y[:, :, a:b, :], axis=2)
                             for a, b in segment_bounds(int(y.shape[2]), time_segments(pooling))]
                    y = parts[0] if len(parts) == 1 else ops.stack(parts, axis=2)
                    y = ops.reshape(y, (ops.shape(y)[0], -1))
                elif pooling == "flatten":
                    y = ops.reshape(y, (ops.shape(y)[0], -1))
                res.append(y)
            return res

        def inputs(x):
            x = ops.cast(x, "float32")
            return pre(x) if pre is not None else x

        self._forward = _compiled(self.backend, cut, inputs, pooled, bool(xla), backbone.size)
        # Trace and optimise the graph now, on one image, so that the cost lands in the build and the first real
        # batch runs at full speed (TensorFlow traces one graph for every batch size). Not on JAX: XLA compiles once
        # per batch shape, so a one-image shape would be compiled for nothing; each shape compiles when first used.
        if self.backend != "jax":
            self._forward(np.zeros([1, backbone.size, backbone.size, 3], np.uint8))

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        self.images_seen += int(batch.shape[0])
        return [np.asarray(o) for o in self._forward(batch)]


def _compiled(backend: str, cut, inputs, pooled, xla: bool, size: int):
    """``uint8 batch -> [numpy codes]``, compiled the backend's way: a ``tf.function`` (XLA on request) on
    TensorFlow, ``jax.jit`` over the model's stateless call on JAX (XLA always), eager under ``no_grad`` on
    PyTorch. The graph is the same Keras model and the same pooling arithmetic on each."""
    if backend == "tensorflow":
        tf = runtime.tensorflow()

        # jit_compile: XLA fuses the pooling and casts into the network's kernels (GPUs gain most).
        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)], jit_compile=xla)
        def forward(x):
            return pooled(cut(inputs(x), training=False))

        return lambda batch: [o.numpy() for o in forward(batch)]
    if backend == "jax":
        import jax

        trainable = [v.value for v in cut.trainable_variables]
        non_trainable = [v.value for v in cut.non_trainable_variables]

        @jax.jit
        def forward(tv, ntv, x):
            outs, _ = cut.stateless_call(tv, ntv, inputs(x), training=False)
            return pooled(outs)

        # One compilation per batch shape: a run's shorter last batch compiles once more. Padding it to the full
        # batch instead lost on a CPU (benchmarks/jax_last_batch.py): the padded rows cost more than the compilation.
        return lambda batch: [np.asarray(o) for o in forward(trainable, non_trainable, batch)]
    import torch
    from keras import ops

    def forward(batch):
        with torch.no_grad():
            return [ops.convert_to_numpy(o) for o in pooled(cut(inputs(ops.convert_to_tensor(batch)),
                                                                training=False))]

    return forward
