"""Public tensor ops: causal kernelized attention with RPE in its parallel form and its recurrent form (a state
and one step of it), and the feature maps that feed it."""
from lm.ops.feature_maps import (RELU_EPS, elu_features, nprf_features, positive_random_features,
                                 random_projection, relu_features)
from lm.ops.kernelized import METHODS, RPE_METHODS, kernelized_attention
from lm.ops.recurrent import RecurrentState, graphable, initial_state, kernelized_attention_step, state_after
from lm.ops.threads import CPUThreads

__all__ = ["kernelized_attention", "kernelized_attention_step", "RecurrentState", "initial_state", "state_after",
           "graphable", "METHODS", "RPE_METHODS", "CPUThreads", "random_projection", "positive_random_features",
           "nprf_features", "elu_features", "relu_features", "RELU_EPS"]
