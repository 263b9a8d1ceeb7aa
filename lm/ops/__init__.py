"""Public tensor ops: causal kernelized attention with RPE, and the feature maps that feed it."""
from lm.ops.feature_maps import (RELU_EPS, elu_features, nprf_features, positive_random_features,
                                 random_projection, relu_features)
from lm.ops.kernelized import kernelized_attention
from lm.ops.threads import CPUThreads

__all__ = ["kernelized_attention", "CPUThreads", "random_projection", "positive_random_features", "nprf_features",
           "elu_features", "relu_features", "RELU_EPS"]
