"""Neural-network modules of mmfast: aggregators ``Cls(feature_dim, latent_dim, **options)``
mapping modality features ``[B, M, E]`` and a subset mask (``[B, M]`` or a ``[B, S, M]`` bank)
to a posterior, and encoders / decoders for vectors, MNIST, SVHN and text."""
from mmfast.nn.attention import AttentionBlock, SelfAttention, SelfAttentionMixture
from mmfast.nn.decoders import MLPDecoder, MNISTDecoder, SVHNDecoder, TextDecoder
from mmfast.nn.encoders import MLPEncoder, MNISTEncoder, SVHNEncoder, TextEncoder
from mmfast.nn.experts import MoE, MoEPlus, PoE, PoEPlus
from mmfast.nn.mlp import MLP
from mmfast.nn.pooling import SumPooling, SumPoolingMixture

AGGREGATORS = {cls.__name__: cls for cls in (SumPooling, SelfAttention, PoE, MoE, PoEPlus,
                                              MoEPlus, SumPoolingMixture, SelfAttentionMixture)}

__all__ = ["MLP", "AttentionBlock", "SumPooling", "SumPoolingMixture", "SelfAttention",
           "SelfAttentionMixture", "PoE", "MoE", "PoEPlus", "MoEPlus", "AGGREGATORS",
           "MLPEncoder", "MNISTEncoder", "SVHNEncoder", "TextEncoder", "MLPDecoder",
           "MNISTDecoder", "SVHNDecoder", "TextDecoder"]
