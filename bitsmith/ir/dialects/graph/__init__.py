"""The `graph` dialect: the ops a model is imported into, before fusion and lowering."""
from . import constant, elementwise, linalg, nn, reduce, shape  # noqa: F401 - registers ops
from .constant import ArangeOp, ConstantOp, FullOp
from .elementwise import BINARY_OPS, UNARY_OPS, CastOp, ClampOp, GeluOp, WhereOp
from .linalg import AdaptiveAvgPool2dOp, AvgPool2dOp, Conv2dOp, LinearOp, MatmulOp, MaxPool2dOp
from .nn import AttentionOp, BatchNormOp, LayerNormOp, LogSoftmaxOp, RmsNormOp, SoftmaxOp
from .reduce import (
    ArgMaxOp,
    ArgMinOp,
    CumsumOp,
    ReduceAllOp,
    ReduceAnyOp,
    ReduceMaxOp,
    ReduceMeanOp,
    ReduceMinOp,
    ReduceProdOp,
    ReduceSumOp,
)
from .shape import (
    ConcatOp,
    EmbeddingOp,
    ExpandOp,
    GatherOp,
    IndexOp,
    IndexSelectOp,
    PadOp,
    PermuteOp,
    ReshapeOp,
    SliceOp,
    SplitOp,
)

__all__ = [
    "ArangeOp", "ConstantOp", "FullOp", "BINARY_OPS", "UNARY_OPS", "CastOp", "ClampOp",
    "GeluOp", "WhereOp", "AdaptiveAvgPool2dOp", "AvgPool2dOp", "Conv2dOp", "LinearOp",
    "MatmulOp", "MaxPool2dOp", "AttentionOp", "BatchNormOp", "LayerNormOp", "LogSoftmaxOp",
    "RmsNormOp", "SoftmaxOp", "ArgMaxOp", "ArgMinOp", "CumsumOp", "ReduceAllOp",
    "ReduceAnyOp", "ReduceMaxOp", "ReduceMeanOp", "ReduceMinOp", "ReduceProdOp",
    "ReduceSumOp", "ConcatOp", "EmbeddingOp", "ExpandOp", "GatherOp", "IndexSelectOp",
    "IndexOp", "PadOp", "PermuteOp", "ReshapeOp", "SliceOp", "SplitOp",
]
