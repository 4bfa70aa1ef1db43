"""Flax Linen models keyed by name, with pure init/apply.

Every model's ``__call__(x, train=False)`` maps NHWC images (B, H, W, C) or vectors (B, d) to logits
(B, num_classes); ``train=True`` uses batch statistics in batch norm (and returns updated ``'batch_stats'``
when applied with ``mutable=['batch_stats']``) and turns dropout on (rng name ``'dropout'``)::

    model = jaxnn.models.get_model("resnet20", num_classes=10)
    params, model_state = jaxnn.models.init_model(model, jax.random.key(0), (32, 32, 3))
    logits = model.apply({"params": params, **model_state}, x)                      # eval mode
    logits, new_state = model.apply({"params": params, **model_state}, x, train=True,
                                    rngs={"dropout": key}, mutable=["batch_stats"])   # train mode
"""

from jaxnn.models.activations import ACTIVATIONS, get_activation
from jaxnn.models.initializers import INITIALIZERS, get_initializer
from jaxnn.models.layers import (
    BATCH_NORM_MOMENTUM,
    NORM_EPSILON,
    NORMALIZATIONS,
    default_param_dtype,
    normalization_layer,
)
from jaxnn.models.lenet import LeNet
from jaxnn.models.mlp import MLP
from jaxnn.models.recurrent import CELLS, RecurrentClassifier
from jaxnn.models.registry import (
    MODELS,
    ModelFactory,
    count_params,
    get_model,
    init_model,
    model_names,
    registry_spec,
)
from jaxnn.models.resnet import (
    RESNET_DEPTHS,
    BasicBlock,
    CifarResNet,
    option_a_shortcut,
    resnet_blocks_per_stage,
)
from jaxnn.models.seq2seq import ATTENTIONS, Seq2Seq, beam_search, greedy_decode, sequence_accuracy, sequence_log_prob
from jaxnn.models.transformer import (
    POSITIONS,
    TransformerBlock,
    TransformerClassifier,
    TransformerLM,
    sinusoidal_positions,
)
from jaxnn.models.vgg import VGGSmall
from jaxnn.models.word2vec import (SkipGram, analogy_accuracy, analogy_predictions, nearest_neighbours,
                                   negative_sampling_loss)


def from_nnx(build, **kwargs):
    """An NNX module class as a model the engines take (:func:`jaxnn.models.nnx.from_nnx`; Flax NNX is imported on
    first use)."""
    from jaxnn.models.nnx import from_nnx as build_from_nnx

    return build_from_nnx(build, **kwargs)

__all__ = [
    "ACTIVATIONS",
    "ATTENTIONS",
    "BATCH_NORM_MOMENTUM",
    "BasicBlock",
    "CELLS",
    "CifarResNet",
    "INITIALIZERS",
    "LeNet",
    "MLP",
    "MODELS",
    "registry_spec",
    "ModelFactory",
    "NORMALIZATIONS",
    "NORM_EPSILON",
    "POSITIONS",
    "RESNET_DEPTHS",
    "RecurrentClassifier",
    "Seq2Seq",
    "SkipGram",
    "TransformerBlock",
    "TransformerClassifier",
    "TransformerLM",
    "VGGSmall",
    "analogy_accuracy",
    "analogy_predictions",
    "beam_search",
    "count_params",
    "default_param_dtype",
    "from_nnx",
    "get_activation",
    "greedy_decode",
    "get_initializer",
    "get_model",
    "init_model",
    "model_names",
    "nearest_neighbours",
    "negative_sampling_loss",
    "normalization_layer",
    "option_a_shortcut",
    "resnet_blocks_per_stage",
    "sequence_accuracy",
    "sequence_log_prob",
    "sinusoidal_positions",
]
