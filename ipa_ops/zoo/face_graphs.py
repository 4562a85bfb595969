"""ONNX graphs of the zoo's InsightFace pack, written with the ``onnx`` helper API.

``detector_model`` is an SCRFD-shaped detector whose weights are *designed*, not random: it finds
bright compact discs on a dark background (see ``faces.py`` for the contract). Per FPN stride
``s`` in (8, 16, 32) it average-pools three pixel classes (bright, dark, in-between) into cells
of ``s/2`` pixels, then one fixed convolution per stride sums, around every anchor, a window of
``[-8s, 8s)`` pixels: bright mass and its first and second moments inside ``[-7s, 7s)``, bright
mass in the outer ring, dark mass inside, in-between mass anywhere. An anchor fires when a
round bright blob lies wholly inside its window (nothing bright in the ring, enough area for the
stride, disc-like second moments, little grey, some dark surround); its box and the five
landmarks follow from the blob's centroid and area, so all anchors that see the same blob
predict the same box and NMS keeps one face.

``recognizer_model`` is an ArcFace-shaped embedder: two random strided convolutions and a
random linear layer, 112x112 aligned crop in, 512 floats out. ``build_face_pack`` writes both.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .common import seed_for
from .faces import DETECTOR_FILE, KPS_UNIT, PACK_DIR, RECOGNIZER_FILE, draw_face

OPSET = 17
IR_VERSION = 8
STRIDES = (8, 16, 32)
WINDOW_CELLS = 32  # kernel size, in cells of stride/2 pixels: [-8s, 8s)
INTERIOR_CELLS = 14  # interior [-7s, 7s); the outer s pixels are the ring
# Pixel levels on the brightest channel (0..255): bright above BRIGHT_HI, dark below DARK_LO.
BRIGHT_LO, BRIGHT_HI = 176.0, 208.0
DARK_LO, DARK_HI = 48.0, 80.0
MIN_RADIUS = {8: 5.0, 16: 16.0, 32: 32.0}  # smallest blob radius (det pixels) each stride reports


def _norm(pixel: float) -> float:
    """SCRFD's input normalisation: (pixel - 127.5) / 128."""
    return (pixel - 127.5) / 128.0


class _Graph:
    """A tiny builder: named constants and nodes with generated output names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, value: np.ndarray | float | list[int], name: str | None = None) -> str:
        arr = np.asarray(value, dtype=np.int64 if isinstance(value, list) else np.float32)
        name = name or f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, *inputs: str, n_out: int = 1, out: str | None = None, **attrs: object):
        self.count += 1
        outs = [out] if out else [f"{op_type.lower()}_{self.count}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{op_type}_{self.count}", **attrs))
        return outs[0] if n_out == 1 else outs

    def affine(self, x: str, scale: float, shift: float) -> str:
        """``scale * x + shift``."""
        return self.op("Add", self.op("Mul", x, self.const(scale)), self.const(shift))

    def sigmoid_gate(self, x: str, slope: float, threshold: float) -> str:
        """Soft ``x > threshold`` (negative slope: ``x < threshold``)."""
        return self.op("Sigmoid", self.affine(x, slope, -slope * threshold))


def _window_kernel(stride: int) -> np.ndarray:
    """Conv weights [8, 3, K, K] over (bright, dark, grey) cell sums; see the module docstring."""
    k = WINDOW_CELLS
    p = stride // 2
    rel = np.arange(k) - k // 2  # cell offset from the anchor's cell
    centre = (rel + 0.5) * p / stride  # cell centre, in stride units
    inside = (rel >= -INTERIOR_CELLS) & (rel < INTERIOR_CELLS)
    interior = np.outer(inside, inside).astype(np.float64)
    ring = 1.0 - interior
    cy, cx = np.meshgrid(centre, centre, indexing="ij")
    area = float(p * p)  # AveragePool gives means; the kernel turns them into pixel sums
    w = np.zeros((8, 3, k, k))
    w[0, 0] = interior * area
    w[1, 0] = interior * area * cx
    w[2, 0] = interior * area * cy
    w[3, 0] = interior * area * cx**2
    w[4, 0] = interior * area * cy**2
    w[5, 0] = ring * area
    w[6, 1] = interior * area
    w[7, 2] = area
    return w.astype(np.float32)


def _stride_head(g: _Graph, maps: str, stride: int) -> tuple[str, str, str]:
    p = stride // 2
    pooled = g.op("AveragePool", maps, kernel_shape=[p, p], strides=[p, p])
    half = WINDOW_CELLS // 2
    sums = g.op(
        "Conv",
        pooled,
        g.const(_window_kernel(stride), f"window_{stride}"),
        strides=[2, 2],
        pads=[half, half, half - 1, half - 1],
        kernel_shape=[WINDOW_CELLS, WINDOW_CELLS],
    )
    m0, mx, my, mxx, myy, ring, dark, grey = g.op("Split", sums, g.const([1] * 8), axis=1, n_out=8)
    inv = g.op("Reciprocal", g.op("Add", m0, g.const(1e-3)))
    cx = g.op("Mul", mx, inv)
    cy = g.op("Mul", my, inv)
    second = g.op("Mul", g.op("Add", mxx, myy), inv)
    var = g.op("Sub", second, g.op("Add", g.op("Mul", cx, cx), g.op("Mul", cy, cy)))
    compact = g.op("Mul", g.op("Mul", var, inv), g.const(2 * math.pi * stride * stride))
    radius = g.op("Sqrt", g.op("Mul", g.op("Relu", m0), g.const(1.0 / (math.pi * stride * stride))))
    min_area = math.pi * MIN_RADIUS[stride] ** 2
    gates = [
        g.sigmoid_gate(m0, 10.0 / min_area, min_area),  # big enough for this stride
        g.sigmoid_gate(g.op("Mul", ring, inv), -1000.0, 0.01),  # nothing bright in the ring
        g.sigmoid_gate(compact, -40.0, 1.25),  # one round blob (a disc gives 1.0)
        g.sigmoid_gate(g.op("Mul", grey, inv), -20.0, 0.5),  # clean edges, no grey texture
        g.sigmoid_gate(g.op("Mul", dark, inv), 100.0, 0.05),  # dark surround inside the window
    ]
    score = gates[0]
    for gate in gates[1:]:
        score = g.op("Mul", score, gate)
    geom = g.op("Concat", cx, cy, radius, axis=1)  # [1, 3, h, w] in stride units
    box = np.array([[-1, 0, 1], [0, -1, 1], [1, 0, 1], [0, 1, 1]], dtype=np.float32)  # l, t, r, b
    kps = np.zeros((10, 3), dtype=np.float32)
    kps[0::2, 0] = 1.0
    kps[1::2, 1] = 1.0
    kps[0::2, 2] = KPS_UNIT[:, 0]
    kps[1::2, 2] = KPS_UNIT[:, 1]

    def head(x: str, weight: np.ndarray, width: int) -> str:
        # Both anchors of a cell share the geometry; only anchor 0 carries a score.
        y = g.op("Conv", x, g.const(weight[:, :, None, None]), kernel_shape=[1, 1])
        y = g.op("Transpose", y, perm=[0, 2, 3, 1])
        return g.op("Reshape", y, g.const([-1, width]))

    s_out = head(score, np.array([[1.0], [0.0]], dtype=np.float32), 1)
    b_out = head(geom, np.concatenate([box, box]), 4)
    k_out = head(geom, np.concatenate([kps, kps]), 10)
    return s_out, b_out, k_out


def detector_model() -> onnx.ModelProto:
    """SCRFD layout: input ``[1, 3, ?, ?]``; outputs score/bbox/kps for strides 8, 16, 32."""
    g = _Graph()
    brightest = g.op("ReduceMax", "input.1", axes=[1], keepdims=1)
    span_b = _norm(BRIGHT_HI) - _norm(BRIGHT_LO)
    span_d = _norm(DARK_HI) - _norm(DARK_LO)
    lo, hi = g.const(0.0), g.const(1.0)
    bright = g.op("Clip", g.affine(brightest, 1 / span_b, -_norm(BRIGHT_LO) / span_b), lo, hi)
    dark = g.op("Clip", g.affine(brightest, -1 / span_d, _norm(DARK_HI) / span_d), lo, hi)
    grey = g.op("Relu", g.op("Sub", g.op("Sub", hi, bright), dark))
    maps = g.op("Concat", bright, dark, grey, axis=1)
    heads = [_stride_head(g, maps, s) for s in STRIDES]
    names = [f"score_{s}" for s in STRIDES] + [f"bbox_{s}" for s in STRIDES] + [f"kps_{s}" for s in STRIDES]
    produced = [h[0] for h in heads] + [h[1] for h in heads] + [h[2] for h in heads]
    outputs = []
    for name, src, width in zip(names, produced, [1] * 3 + [4] * 3 + [10] * 3, strict=True):
        g.op("Identity", src, out=name)
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n_{name}", width]))
    graph = helper.make_graph(
        g.nodes,
        "zoo_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])],
        outputs,
        initializer=g.inits,
    )
    return _model(graph)


def _recognizer_weights(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)

    def rand(*shape: int, scale: float = 1.0) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return (scale * rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)

    return [
        rand(16, 3, 4, 4),
        rand(16, 1, scale=0.1)[:, 0],
        rand(32, 16, 4, 4),
        rand(32, 1, scale=0.1)[:, 0],
        rand(512, 32 * 7 * 7),
    ]


def _patch_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A convolution whose stride equals its kernel, in float64 numpy ([N, C, H, W])."""
    n, c, h, wd = x.shape
    k = w.shape[-1]
    patches = x.reshape(n, c, h // k, k, wd // k, k).transpose(0, 2, 4, 1, 3, 5).reshape(n, h // k, wd // k, -1)
    y = patches @ w.reshape(w.shape[0], -1).T.astype(np.float64) + b
    return y.transpose(0, 3, 1, 2)


def recognizer_features(crops: np.ndarray, seed: int) -> np.ndarray:
    """The recognizer's pre-projection features of RGB uint8 crops [N, 112, 112, 3]."""
    w1, b1, w2, b2, _ = _recognizer_weights(seed)
    x = (crops.astype(np.float64).transpose(0, 3, 1, 2) - 127.5) / 127.5
    x = np.maximum(_patch_conv(x, w1, b1), 0.0)
    x = np.maximum(_patch_conv(x, w2, b2), 0.0)
    return x.reshape(len(x), -1)


def recognizer_model(seed: int, mean_crops: np.ndarray) -> onnx.ModelProto:
    """ArcFace layout: input ``[N, 3, 112, 112]`` (mean/std 127.5), output ``[N, 512]``.

    Random strided convolutions and a random projection, centred on the mean features of
    ``mean_crops`` (typical zoo faces) so that different drawings get clearly different
    embeddings instead of all sharing the "bright disc" component.
    """
    w1, b1, w2, b2, proj = _recognizer_weights(seed)
    centre = recognizer_features(mean_crops, seed).mean(axis=0)
    bias = np.round(-(proj.astype(np.float64) @ centre), 4).astype(np.float32)
    g = _Graph()
    x = g.op("Relu", g.op("Conv", "input.1", g.const(w1), g.const(b1), strides=[4, 4]))
    x = g.op("Relu", g.op("Conv", x, g.const(w2), g.const(b2), strides=[4, 4]))
    x = g.op("Flatten", x, axis=1)
    g.op("Gemm", x, g.const(proj), g.const(bias), transB=1, out="683")
    graph = helper.make_graph(
        g.nodes,
        "zoo_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", 512])],
        initializer=g.inits,
    )
    return _model(graph)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ipa-zoo", ir_version=IR_VERSION
    )
    onnx.checker.check_model(model)
    return model


def build_face_pack(path: Path) -> None:
    """Write ``det_10g.onnx`` and ``w600k_r50.onnx`` (same graphs for every zoo size)."""
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(detector_model(), str(path / DETECTOR_FILE))
    crops = np.stack([np.asarray(draw_face((112, 112), (56, 56), 56, seed=1000 + i)) for i in range(32)])
    model = recognizer_model(seed_for(f"{PACK_DIR}/{RECOGNIZER_FILE}"), crops)
    onnx.save(model, str(path / RECOGNIZER_FILE))
