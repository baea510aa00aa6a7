"""Backbones: a registry over ``keras.applications``, cut at named layers.

Names are the Keras constructor names in snake case (``resnet50``, ``mobilenet_v2``,
``efficientnet_b0``, ``convnext_tiny``...); a path to a ``.keras``/``.h5`` model file is a backbone
too. The exact Keras layer names are the vocabulary of cut points.

- :mod:`.catalog`: the registry, model files, constructor options, the one preprocessing table;
- :mod:`.spec`: :class:`BackboneSpec`, validated settings and the store identity;
- :mod:`.build`: :func:`build_backbone` (precision, seeded random weights, Keras's weights cache);
- :mod:`.extractor`: :class:`Extractor`, the compiled multi-layer forward pass of extraction.

Nothing here imports TensorFlow at module import time: the registry can be listed and parameters
validated without it.
"""
from .build import (POOLINGS, TIME_POOLINGS, Backbone, LayerInfo, build_backbone, imagenet_weights_available,
                    pooled_shape, segment_bounds, time_segments)
from .catalog import (FAMILY_MODES, MODEL_SUFFIXES, MODES, PREPROCESSING_MODES, REGISTRY, BackboneInfo,
                      backbone_info, is_model_file, list_backbones, parse_backbone_args, preprocess_mode,
                      preprocessing_of)
from .extractor import Extractor
from .spec import BackboneSpec

__all__ = ["POOLINGS", "TIME_POOLINGS", "FAMILY_MODES", "MODEL_SUFFIXES", "MODES", "PREPROCESSING_MODES", "REGISTRY", "Backbone", "BackboneInfo",
           "BackboneSpec", "Extractor", "LayerInfo", "backbone_info", "build_backbone", "imagenet_weights_available", "segment_bounds", "time_segments",
           "is_model_file", "list_backbones", "parse_backbone_args", "pooled_shape", "preprocess_mode",
           "preprocessing_of"]
