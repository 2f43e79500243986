"""tf2onnx handlers for the gradient ops an attention graph leaves after freezing.

tf2onnx converts forward graphs; the attention maps need d z / d A, so the frozen graph
also holds TensorFlow's gradient ops. Grappler folds most of them into plain ops; these
are the ones that survive and have no handler in tf2onnx 1.17:

    ReluGrad               every ReLU between the feature map A and the latent code
    ShapeN                 the input-size argument of each Conv2D's backward pass
    BroadcastGradientArgs  gradients of broadcasting ops (residual adds, products) when
                           the batch dimension is dynamic
    MaxPoolGrad            a max-pool between A and the latent code (ResNet18 "conv1")

tf2onnx's own DynamicStitch handler sizes its output by the number of stitched rows, not
by the largest index; the gradient of a mean over a dynamic-batch tensor (the ResNet's
global pooling) stitches overlapping indices to build a shape, and gets trailing zeros
that ONNX Reshape reads as "copy this dimension". It is replaced here as well.

What parity cannot cover: a ReLU's gradient jumps from 0 to 1 at zero, and the two
runtimes compute a pre-activation with different round-off (about 1e-6 here). Where one
lies within that round-off of zero, the two may disagree on its sign and so on its
gradient. On the real MVTec bottle test set (83 images, 64 px, a 60-epoch ResNet18,
attention at conv1) this happens at one unit on 2 images, which move their maps by 0.6% of
the range; the other 81 agree within 1e-5. Neither value is wrong: the gradient is not
defined at the kink.

Importing this module registers them with tf2onnx's ``tf_op`` registry (default ONNX
domain), so any later conversion uses them.
"""

from __future__ import annotations

import importlib

import numpy as np
from onnx import TensorProto, helper
from tf2onnx import utils
from tf2onnx.graph_builder import GraphBuilder
from tf2onnx.handler import tf_op

importlib.import_module("tf2onnx.onnx_opset")  # the built-in handlers first; ours win

#: TensorFlow ops this module adds (or replaces) handlers for.
HANDLED_OPS = (
    "ReluGrad",
    "ShapeN",
    "BroadcastGradientArgs",
    "MaxPoolGrad",
    "DynamicStitch",
    "ParallelDynamicStitch",
)


def _replace(ctx, node, op_type, inputs, attr=None, output_count=None):
    """Swap ``node`` for one ``op_type`` node that keeps its name, outputs, shapes, dtypes."""
    outputs = list(node.output)
    shapes = [ctx.get_shape(name) for name in outputs]
    dtypes = [ctx.get_dtype(name) for name in outputs]
    name = node.name
    ctx.remove_node(name)
    return ctx.make_node(
        op_type,
        inputs,
        attr=attr or {},
        name=name,
        outputs=outputs,
        shapes=shapes,
        dtypes=dtypes,
    )


def _const(ctx, value, dtype):
    return ctx.make_const(utils.make_name("grad_const"), np.asarray(value, dtype)).output[0]


def _zeros(ctx, shape, dtype):
    """Zeros of ONNX type ``dtype`` and the (1-D int64) ``shape``: what a scatter-add
    sums into."""
    value = helper.make_tensor("value", dtype, [1], [0])
    return ctx.make_node("ConstantOfShape", [shape], attr={"value": value}).output[0]


def _to_int64(ctx, name):
    if ctx.get_dtype(name) == TensorProto.INT64:
        return name
    return ctx.make_node("Cast", [name], attr={"to": TensorProto.INT64}).output[0]


@tf_op("ReluGrad")
class ReluGrad:
    """dx = dy where the forward input was > 0, else 0 (TensorFlow's definition)."""

    @classmethod
    def version_9(cls, ctx, node, **kwargs):
        gradients, features = node.input
        dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(features))
        zero = _const(ctx, 0, dtype)
        positive = ctx.make_node("Greater", [features, zero]).output[0]
        _replace(ctx, node, "Where", [positive, gradients, zero])


@tf_op("ShapeN")
class ShapeN:
    """N shapes at once: one ONNX Shape (and a Cast to int32 if asked) per input."""

    @classmethod
    def version_1(cls, ctx, node, **kwargs):
        outputs = list(node.output)
        dtypes = [ctx.get_dtype(name) for name in outputs]
        inputs = list(node.input)
        ctx.remove_node(node.name)
        for source, output, dtype in zip(inputs, outputs, dtypes):
            if dtype == TensorProto.INT64:
                ctx.make_node("Shape", [source], outputs=[output], dtypes=[dtype])
            else:
                shape = ctx.make_node("Shape", [source]).output[0]
                ctx.make_node(
                    "Cast", [shape], attr={"to": dtype}, outputs=[output], dtypes=[dtype]
                )


@tf_op("BroadcastGradientArgs")
class BroadcastGradientArgs:
    """Axes to sum each operand's gradient over: where its (left-padded) shape is 1.

    TensorFlow's gradient code always reshapes the reduced gradient back to the
    operand's shape, so summing over every axis where the operand has size 1 (including
    axes where the output has size 1 as well) gives the same result as TensorFlow's own
    index lists; the empty list needs ReduceSum's ``noop_with_empty_axes``, which
    tf2onnx sets for dynamic axes from opset 13.
    """

    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        out_dtype = ctx.get_dtype(node.output[0])
        shapes = [_to_int64(ctx, name) for name in node.input]
        lengths = [ctx.make_node("Shape", [shape]).output[0] for shape in shapes]
        rank = ctx.make_node("Max", lengths).output[0]
        one = _const(ctx, [1], np.int64)
        results = []
        for shape, length in zip(shapes, lengths):
            missing = ctx.make_node("Sub", [rank, length]).output[0]
            ones = ctx.make_node(
                "ConstantOfShape",
                [missing],
                attr={"value": helper.make_tensor("value", TensorProto.INT64, [1], [1])},
            ).output[0]
            padded = ctx.make_node("Concat", [ones, shape], attr={"axis": 0}).output[0]
            is_one = ctx.make_node("Equal", [padded, one]).output[0]
            axes = ctx.make_node("NonZero", [is_one]).output[0]  # (1, k)
            flat = ctx.make_node("Reshape", [axes, _const(ctx, [-1], np.int64)]).output[0]
            results.append(flat)
        outputs = list(node.output)
        ctx.remove_node(node.name)
        for flat, output in zip(results, outputs):
            ctx.make_node(
                "Cast",
                [flat],
                attr={"to": out_dtype},
                outputs=[output],
                shapes=[[-1]],
                dtypes=[out_dtype],
            )


@tf_op("MaxPoolGrad")
class MaxPoolGrad:
    """Route each pooled gradient to its window's arg-max: MaxPool's Indices output,
    then ScatterElements with ``reduction="add"`` (so opset 16 or later).

    At a tie (a window holding its max twice: flat or saturated image regions, zeros
    after a ReLU) both ONNX Runtime's indices and TensorFlow's CPU kernel take the first
    element in row-major order, so the routing is the same (tests/test_export_onnx.py
    checks it on real bottle features).
    """

    @classmethod
    def version_16(cls, ctx, node, **kwargs):
        original, _, gradient = node.input
        data_format = node.get_attr_value("data_format", b"NHWC")
        data_format = data_format.decode() if isinstance(data_format, bytes) else data_format
        padding = node.get_attr_value("padding")
        padding = padding.decode() if isinstance(padding, bytes) else padding
        utils.make_sure(
            padding in ("SAME", "VALID"),
            "MaxPoolGrad with padding %s has no ONNX handler",
            padding,
        )
        ksize = node.get_attr_value("ksize")
        strides = node.get_attr_value("strides")
        channels_last = data_format == "NHWC"
        spatial = slice(1, 3) if channels_last else slice(2, 4)
        if channels_last:
            original = ctx.make_node(
                "Transpose", [original], attr={"perm": [0, 3, 1, 2]}
            ).output[0]
            gradient = ctx.make_node(
                "Transpose", [gradient], attr={"perm": [0, 3, 1, 2]}
            ).output[0]
        pool = ctx.make_node(
            "MaxPool",
            [original],
            output_count=2,
            attr={
                "kernel_shape": list(ksize[spatial]),
                "strides": list(strides[spatial]),
                "auto_pad": "SAME_UPPER" if padding == "SAME" else "VALID",
            },
        )
        flat = _const(ctx, [-1], np.int64)
        indices = ctx.make_node("Reshape", [pool.output[1], flat]).output[0]
        updates = ctx.make_node("Reshape", [gradient, flat]).output[0]
        shape = ctx.make_node("Shape", [original]).output[0]
        size = ctx.make_node("ReduceProd", [shape], attr={"keepdims": 1}).output[0]
        zeros = _zeros(ctx, size, ctx.get_dtype(node.output[0]))
        summed = ctx.make_node(
            "ScatterElements", [zeros, indices, updates], attr={"axis": 0, "reduction": "add"}
        ).output[0]
        if not channels_last:
            _replace(ctx, node, "Reshape", [summed, shape])
            return
        restored = ctx.make_node("Reshape", [summed, shape]).output[0]
        _replace(ctx, node, "Transpose", [restored], attr={"perm": [0, 2, 3, 1]})


@tf_op(["DynamicStitch", "ParallelDynamicStitch"])
class DynamicStitch:
    """merged[indices[m][i]] = data[m][i]; a later (m, i) wins on a repeated index and
    the output has max(indices) + 1 rows. Only rank-0/1 index tensors (shape building).

    Rows overridden by a later duplicate are dropped first (an n x n comparison of the
    few indices), so the ScatterElements that follows never sees a duplicate.
    """

    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        count = len(node.input) // 2
        builder = GraphBuilder(ctx)
        flat = _const(ctx, [-1], np.int64)
        indices = [
            ctx.make_node("Reshape", [_to_int64(ctx, name), flat]).output[0]
            for name in node.input[:count]
        ]
        data = []
        for index_name, data_name in zip(node.input[:count], node.input[count:]):
            index_rank = len(ctx.get_shape(index_name) or [])
            utils.make_sure(
                ctx.get_shape(index_name) is not None and index_rank <= 1,
                "DynamicStitch handler takes rank-0/1 indices, got %s",
                index_name,
            )
            data.append(
                data_name
                if index_rank == 1
                else builder.make_unsqueeze({"data": data_name, "axes": [0]})
            )
        index = ctx.make_node("Concat", indices, attr={"axis": 0}).output[0]  # (n,)
        values = ctx.make_node("Concat", data, attr={"axis": 0}).output[0]  # (n, ...)
        size = ctx.make_node("Shape", [index]).output[0]
        position = ctx.make_node(
            "Range",
            [
                _const(ctx, 0, np.int64),
                builder.make_squeeze({"data": size, "axes": [0]}),
                _const(ctx, 1, np.int64),
            ],
        ).output[0]
        column = builder.make_unsqueeze({"data": index, "axes": [1]})
        row = builder.make_unsqueeze({"data": index, "axes": [0]})
        same = ctx.make_node("Equal", [column, row]).output[0]
        later = ctx.make_node(
            "Less",
            [
                builder.make_unsqueeze({"data": position, "axes": [1]}),
                builder.make_unsqueeze({"data": position, "axes": [0]}),
            ],
        ).output[0]
        overridden = ctx.make_node(
            "Cast",
            [ctx.make_node("And", [same, later]).output[0]],
            attr={"to": TensorProto.FLOAT},
        ).output[0]
        overridden = builder.make_reduce_max({"data": overridden, "axes": [1], "keepdims": 0})
        keep = ctx.make_node("Equal", [overridden, _const(ctx, 0, np.float32)]).output[0]
        index = ctx.make_node("Compress", [index, keep], attr={"axis": 0}).output[0]
        values = ctx.make_node("Compress", [values, keep], attr={"axis": 0}).output[0]
        rows = ctx.make_node(
            "Add",
            [
                builder.make_reduce_max({"data": index, "axes": [0], "keepdims": 1}),
                _const(ctx, [1], np.int64),
            ],
        ).output[0]
        value_shape = ctx.make_node("Shape", [values]).output[0]
        tail = builder.make_slice(
            {"data": value_shape, "starts": [1], "ends": [2**62], "axes": [0]}
        )
        out_shape = ctx.make_node("Concat", [rows, tail], attr={"axis": 0}).output[0]
        zeros = _zeros(ctx, out_shape, ctx.get_dtype(node.output[0]))
        value_rank = len(ctx.get_shape(node.input[count]) or []) + (
            1 - len(ctx.get_shape(node.input[0]) or [])
        )
        if value_rank > 1:
            index = builder.make_unsqueeze({"data": index, "axes": list(range(1, value_rank))})
        index = ctx.make_node("Expand", [index, value_shape]).output[0]
        _replace(ctx, node, "ScatterElements", [zeros, index, values], attr={"axis": 0})
