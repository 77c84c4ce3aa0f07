"""`prodcat export`: a run as ONE ONNX graph, from the uint8 pictures of one product to its top-k leaves.

The graph (ONNX opset 18, float32; any ONNX Runtime, no prodcat needed to run it):

    input   pictures               (N, H, W, 3) uint8 RGB, the N pictures (1-4 on Cdiscount) of ONE product, all of
                                   one size (any size; Cdiscount's are 180 x 180, the registered backbones' input)
    outputs labels                 (K,) int64, the product's top-K output labels, best first
            probabilities          (K,) float32, their calibrated probabilities
            category_ids           (K,) int64, their category ids
            picture_labels         (N, K) int64 and picture_probabilities (N, K) float32: each picture's own top-K
                                   (the head alone, the Predictor's per-image scores)

Inside, in the Predictor's order (prodcat.predict.predictor), from the run's own files:
1. preprocessing from the backbone spec: NHWC -> NCHW, resize to the input size (the width, rounded to uint8, then
   the height, rounded, as torchvision's uint8 resize; in float, so bicubic is 1 apart from its fixed-point result
   on ~2% of the values, which moved probabilities by up to 4e-4 on a test head; nothing is resized at the input
   size, and OnnxPredictor resizes odd pictures with the Predictor's own resize first), (x / 255 - mean) / std;
2. the frozen backbone (BatchNorm folded, float32), the rows its feature store keeps: pooled or spatial (first
   channels), the store's TTA (flip_mean) and its float16 rounding;
3. the head's log-softmax over leaves, plus the run's added categories (prototypes.json: a snapshot, re-export after
   `prodcat add-category`);
4. the product aggregation evaluate chose on val, over the N pictures: mean_prob (mean of probabilities), mean_logprob
   (normalised geometric mean), vote (share of top-1 votes, ties by mean probability), or a product head's own
   (gated_product reads the N pictures as one product);
5. the logit adjustment tau and the temperature T chosen on val (RUN/eval/metrics.json), then top-K.

Not in the graph, and said so in the sidecar: the words OCR reads (a run with a text head exports its picture path
alone: predictions ignore the words), training twins (they need the photos' raw bytes and the train split's index),
and the auto-accept threshold (a number in the sidecar: accept when probabilities[0] >= it).

The sidecar OUT.json: format, source run and checkpoint, opset, inputs/outputs, preprocessing, aggregation and
calibration, top-K, the taxonomy (ids and names, label order), added categories, what is left out, the sha256 of
the ONNX file and of the run files it was made from, and the export's self-check (ONNX Runtime against the same
graph in PyTorch on rendered photos). `prodcat.predict.onnx_predictor.OnnxPredictor` runs the pair.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prodcat.config import ExportConfig
from prodcat.errors import UserError
from prodcat.predict.aggregation import AGGREGATIONS
from prodcat.predict.predictor import PRODUCT_HEAD, Predictor
from prodcat.utils import get_logger, write_json

__all__ = [
    "ExportError",
    "ProductGraph",
    "PicturePreprocess",
    "StoredFeatures",
    "export_onnx",
    "build_graph",
    "sidecar_path",
    "onnx_session",
    "ONNX_OPSET",
    "SIDECAR_FORMAT",
    "OUTPUTS",
]

ONNX_OPSET = 18  # Resize with antialias (torchvision's resize of the Predictor) needs opset 18
SIDECAR_FORMAT = 1
OUTPUTS = ("labels", "probabilities", "category_ids", "picture_labels", "picture_probabilities")
ONNX_MAX_BYTES = 2**31 - 2**24  # one protobuf file is at most 2 GiB; room left for the graph itself
CHECK_TOLERANCE = 1e-4  # ONNX Runtime vs the same graph in PyTorch, on the self-check photos
log = get_logger("prodcat.predict.export")


class ExportError(UserError):
    """A run cannot be exported as asked; the message says why and what to do instead."""


def sidecar_path(onnx_path: str | Path) -> Path:
    """OUT.json beside OUT (model.onnx -> model.onnx.json)."""
    return Path(f"{onnx_path}.json")


# -- preprocessing -------------------------------------------------------------------------------------------------
# ONNX Resize attributes matching torch's antialiased resize (PIL-style: Keys a = -0.5, taps renormalised inside the
# picture), for bicubic and bilinear.
_RESIZE = {
    "bicubic": {"mode_s": "cubic", "antialias_i": 1, "cubic_coeff_a_f": -0.5, "exclude_outside_i": 1},
    "bilinear": {"mode_s": "linear", "antialias_i": 1, "exclude_outside_i": 1},
}


class _AxisResize(torch.autograd.Function):
    """Resize float pictures (N, 3, H, W) along one axis (2: height, 3: width) to `size`; one ONNX Resize node."""

    @staticmethod
    def forward(ctx: Any, images: torch.Tensor, axis: int, size: int, interpolation: str) -> torch.Tensor:
        shape = [images.shape[2], images.shape[3]]
        shape[axis - 2] = size
        return F.interpolate(images, size=shape, mode=interpolation, align_corners=False, antialias=True)

    @staticmethod
    def symbolic(g: Any, images: Any, axis: int, size: int, interpolation: str) -> Any:
        def const(values: list[int]) -> Any:
            return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

        shape = g.op("Shape", images)
        before = g.op("Slice", shape, const([0]), const([axis]))
        parts = [before, const([size])] + ([g.op("Slice", shape, const([3]), const([4]))] if axis == 2 else [])
        sizes = g.op("Concat", *parts, axis_i=0)
        empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
        attributes = {"coordinate_transformation_mode_s": "half_pixel", **_RESIZE[interpolation]}
        return g.op("Resize", images, empty, empty, sizes, **attributes)


class PicturePreprocess(nn.Module):
    """uint8 (N, H, W, 3) pictures -> the normalised float32 (N, 3, h, w) batch the backbone spec asks for.

    Same arithmetic as `prodcat.features.backbones.Preprocessor` where it can be: torchvision resizes uint8 pictures
    one axis at a time (width, then height), rounding to uint8 after each, in fixed point, here in float; pictures
    already at the input size pass unchanged (a resize to the same size is the identity). Measured against it on
    noise pictures: bicubic (every registered backbone) equal on 98-99.5% of the values, the rest 1 apart; bilinear
    up to 2 apart on ~15%; nearest equal.
    """

    def __init__(self, spec: Any) -> None:
        super().__init__()
        self.height, self.width = spec.image_size
        self.interpolation = spec.interpolation
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std))  # (x / 255 - mean) / std as one multiply-add
        self.register_buffer("shift", -mean / std)

    def forward(self, pictures: torch.Tensor) -> torch.Tensor:
        images = pictures.permute(0, 3, 1, 2).to(torch.float32)
        for axis, size in ((3, self.width), (2, self.height)):
            if self.interpolation == "nearest":
                images = _nearest(images, axis, size)
            else:
                images = _AxisResize.apply(images, axis, size, self.interpolation).clamp(0.0, 255.0).round()
        return images * self.scale + self.shift


def _nearest(images: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """torch's "nearest" along one axis, source index min(floor(dst * (in / out)), in - 1) in float32 as torch
    computes it (ONNX Resize divides by out / in instead, and lands one row off where the product is a whole number)."""
    length = torch._shape_as_tensor(images)[axis]  # a graph value: the picture size stays dynamic in the export
    scale = length.to(torch.float32) / size
    index = (torch.arange(size, dtype=torch.float32) * scale).floor().to(torch.int64)
    return images.index_select(axis, torch.minimum(index, length - 1))


class StoredFeatures(nn.Module):
    """Normalised pictures -> exactly the rows the run's feature store keeps (what its head was trained on)."""

    def __init__(self, backbone: nn.Module, kind: str, channels: int | None, tta: str) -> None:
        super().__init__()
        self.backbone, self.kind, self.channels, self.tta = backbone, kind, channels, tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        count = images.shape[0]
        if self.tta == "flip_mean":  # prodcat.features.inference.flip_mean: mean of the picture and its mirror
            images = torch.cat([images, images.flip(-1)])
        feature_map = self.backbone.forward_features(images)
        if self.kind == "pooled":
            rows = self.backbone.pool(feature_map)
        else:
            rows = feature_map.float().permute(0, 2, 3, 1)
        if self.tta == "flip_mean":
            mirrored = rows[count:] if self.kind == "pooled" else rows[count:].flip(2)
            rows = (rows[:count] + mirrored) * 0.5
        if self.kind == "spatial" and self.channels:
            rows = rows[..., : self.channels]
        return rows.to(torch.float16).to(torch.float32)  # the store's float16 rounding (stored_features)


# -- scores --------------------------------------------------------------------------------------------------------
class _Prototypes(nn.Module):
    """The run's added categories (prodcat.predict.prototypes), as extra logits joined to the head's columns."""

    def __init__(self, prototypes: Any, num_classes: int) -> None:
        super().__init__()
        self.scale, self.bias = float(prototypes.scale), float(prototypes.bias)
        self.register_buffer("vectors", torch.as_tensor(np.asarray(prototypes.vectors, np.float32)))
        self.register_buffer("center", torch.as_tensor(np.asarray(prototypes.center, np.float32)))
        size = prototypes.output_size(num_classes)
        # Output column j reads column `columns[j]` of [head (C) | prototype scores (M) | -inf]: a prototype of a
        # taxonomy leaf replaces the head's column, a label no one fills stays at zero probability.
        columns = np.full(size, num_classes + len(prototypes.labels), dtype=np.int64)
        columns[:num_classes] = np.arange(num_classes)
        columns[prototypes.labels] = num_classes + np.arange(len(prototypes.labels))
        self.register_buffer("columns", torch.as_tensor(columns))

    def scores(self, rows: torch.Tensor) -> torch.Tensor:
        pooled = rows.mean(dim=(1, 2)) if rows.dim() == 4 else rows
        centred = pooled - self.center
        embedding = centred / centred.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return self.scale * embedding @ self.vectors.T + self.bias

    def combine(self, log_probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        blank = torch.full_like(log_probs[:, :1], float("-inf"))
        joined = torch.cat([log_probs, scores, blank], dim=1)
        return torch.log_softmax(joined.index_select(1, self.columns), dim=1)


def aggregate_one(log_probs: torch.Tensor, method: str) -> torch.Tensor:
    """(N, C) picture log-probabilities of ONE product -> (1, C): prodcat.predict.aggregation for a single product."""
    if method == "mean_logprob":
        return torch.log_softmax(log_probs.mean(dim=0, keepdim=True), dim=1)
    mean = log_probs.exp().mean(dim=0, keepdim=True)
    if method == "mean_prob":
        return mean.clamp(min=1e-30).log()
    if method != "vote":
        raise ValueError(f"unknown aggregation {method!r}; choose one of {AGGREGATIONS}")
    columns = torch.arange(log_probs.shape[1], device=log_probs.device)
    votes = (log_probs.argmax(dim=1, keepdim=True) == columns).to(log_probs.dtype).sum(dim=0, keepdim=True)
    return torch.log_softmax((votes / log_probs.shape[0] + 1e-3 * mean + 1e-30).log(), dim=1)


class ProductGraph(nn.Module):
    """One product's uint8 pictures (N, H, W, 3) -> its top-K (labels, probabilities, category ids) and each
    picture's top-K (labels, probabilities); see the module docstring for what is inside."""

    def __init__(
        self,
        preprocess: PicturePreprocess,
        features: StoredFeatures,
        model: nn.Module,
        aggregation: str,
        calibration: Any,
        category_ids: np.ndarray,
        top_k: int,
        prototypes: Any = None,
    ) -> None:
        super().__init__()
        self.preprocess, self.features, self.model, self.aggregation = preprocess, features, model, aggregation
        num_classes = int(model.num_classes)
        self.prototypes = None if prototypes is None else _Prototypes(prototypes, num_classes)
        size = len(category_ids)
        self.top_k = min(int(top_k), size)
        self.tau, self.temperature = float(calibration.tau), float(calibration.temperature)
        prior = np.zeros(size)  # added categories get no prior (a neutral 0), as Predictor.adjust
        if self.tau:
            prior[:num_classes] = np.asarray(calibration.prior_log, dtype=np.float64)
        self.register_buffer("prior_log", torch.as_tensor(prior, dtype=torch.float32))
        self.register_buffer("category_table", torch.as_tensor(np.asarray(category_ids, dtype=np.int64)))

    def picture_log_probs(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, S) per picture: the head (a product head reads each picture as a one-picture product) + prototypes."""
        log_probs = self.model(rows)
        if self.prototypes is None:
            return log_probs
        return self.prototypes.combine(log_probs, self.prototypes.scores(rows))

    def product_log_probs(self, rows: torch.Tensor, picture_log_probs: torch.Tensor) -> torch.Tensor:
        """(1, S) product log-probabilities, before calibration."""
        if self.aggregation != PRODUCT_HEAD:
            return aggregate_one(picture_log_probs, self.aggregation)
        log_probs = self.model(rows[None])  # the N pictures as one product (every slot real: no mask needed)
        if self.prototypes is None:
            return log_probs
        return self.prototypes.combine(log_probs, self.prototypes.scores(rows).mean(dim=0, keepdim=True))

    def calibrate(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Logit adjustment, then temperature (prodcat.predict.calibration; twins, between them there, are not here)."""
        if self.tau:
            log_probs = torch.log_softmax(log_probs - self.tau * self.prior_log, dim=1)
        if self.temperature != 1.0:
            log_probs = torch.log_softmax(log_probs / self.temperature, dim=1)
        return log_probs

    def forward(self, pictures: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = self.features(self.preprocess(pictures))
        picture_log_probs = self.picture_log_probs(rows)
        product = self.calibrate(self.product_log_probs(rows, picture_log_probs))
        values, labels = product.topk(self.top_k, dim=1)
        picture_values, picture_labels = picture_log_probs.topk(self.top_k, dim=1)
        labels = labels[0]
        return labels, values[0].exp(), self.category_table[labels], picture_labels, picture_values.exp()


# -- building and writing ------------------------------------------------------------------------------------------
def _check_expressible(predictor: Predictor) -> None:
    """One line for a run the graph cannot reproduce."""
    if predictor.aggregation not in (*AGGREGATIONS, PRODUCT_HEAD):
        raise ExportError(
            f"{predictor.run_dir}: aggregation {predictor.aggregation!r} (eval/metrics.json) has no graph form; the "
            f"graph knows {', '.join((*AGGREGATIONS, PRODUCT_HEAD))}: re-run `prodcat evaluate --run "
            f"{predictor.run_dir}`, then export again"
        )
    if predictor.aggregation == PRODUCT_HEAD and not predictor.reads_products:
        raise ExportError(
            f"{predictor.run_dir}: aggregation {PRODUCT_HEAD!r} needs a product head; this run's head "
            "reads pictures: re-run `prodcat evaluate`, then export again"
        )


def _backbone(predictor: Predictor) -> nn.Module:
    """The store's backbone as the Predictor's FeatureExtractor holds it (the one factory), float32 with BatchNorm
    folded (when exact), on the CPU: the graph computes in float32 whatever engine the store was made with."""
    import dataclasses

    from prodcat.features.extractor import FeatureExtractor

    config = dataclasses.replace(predictor.extract_config, precision="float32")
    return FeatureExtractor.from_config(config, device="cpu").runner.backbone


def picture_choices(predictor: Predictor) -> Any:
    """Evaluate's val choices (aggregation, threshold, tau, T) for the picture scores: the graph's. A Predictor with
    a text model calibrates its fused scores with the text model's own, which the graph (no words) must not take."""
    from prodcat.predict.run import read_choices

    return predictor.run.choices if predictor.run is not None else read_choices(predictor.run_dir)


def build_graph(predictor: Predictor, top_k: int = 5) -> ProductGraph:
    """The run of `predictor` as one torch module (what is exported), checked for what the graph can express."""
    _check_expressible(predictor)
    backbone = _backbone(predictor)
    config = predictor.extract_config
    features = StoredFeatures(backbone, config.features, config.spatial_channels, config.tta)
    prototypes = predictor.prototypes
    category_ids = predictor.category_ids(np.arange(predictor.num_outputs))
    graph = ProductGraph(
        PicturePreprocess(backbone.spec),
        features,
        predictor.model.cpu(),
        predictor.aggregation,
        picture_choices(predictor).calibration,
        category_ids,
        top_k,
        prototypes,
    )
    return graph.eval()


def _example(graph: ProductGraph) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    shape = (2, graph.preprocess.height, graph.preprocess.width, 3)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)


def graph_bytes(graph: ProductGraph) -> bytes:
    """The ONNX model of `graph` (TorchScript exporter: batch, height and width stay dynamic)."""
    weights = sum(t.numel() * t.element_size() for t in graph.state_dict().values())
    if weights > ONNX_MAX_BYTES:  # protobuf's limit for one file; external data files would make it two
        raise ExportError(f"the graph holds {weights / 1e9:.1f} GB of weights, over one ONNX file's 2 GB limit; "
                          "serve this run with the PyTorch Predictor (prodcat serve --run)")  # fmt: skip
    buffer = io.BytesIO()
    axes = {
        "pictures": {0: "pictures", 1: "height", 2: "width"},
        "picture_labels": {0: "pictures"},
        "picture_probabilities": {0: "pictures"},
    }
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes on the heads' shape checks, the exporter's deprecation notice
        torch.onnx.export(
            graph,
            (_example(graph),),
            buffer,
            dynamo=False,
            input_names=["pictures"],
            output_names=list(OUTPUTS),
            dynamic_axes=axes,
            opset_version=ONNX_OPSET,
        )
    return buffer.getvalue()


def onnx_session(model: str | Path | bytes, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with the house settings (torch's thread count, no busy-waiting between calls)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def check_products() -> list[np.ndarray]:
    """Rendered demo photos (deterministic, no files) as four products of 1-4 pictures, uint8 (N, H, W, 3)."""
    from prodcat.features.inference import calibration_images

    pictures = [image.permute(1, 2, 0).numpy() for image in calibration_images()]
    return [np.stack(pictures[start : start + size]) for start, size in ((0, 1), (1, 2), (3, 3), (6, 4))]


def self_check(graph: ProductGraph, session: Any) -> dict[str, Any]:
    """ONNX Runtime against the same graph in PyTorch: top-1 of every product, largest probability difference."""
    worst, agree = 0.0, 0
    products = check_products()
    for pictures in products:
        with torch.no_grad():
            expected = [t.numpy() for t in graph(torch.from_numpy(pictures))]
        got = session.run(list(OUTPUTS), {"pictures": pictures})
        agree += int(got[0][0] == expected[0][0])
        worst = max(worst, float(np.abs(got[1] - expected[1]).max()), float(np.abs(got[4] - expected[4]).max()))
    result = {
        "products": len(products),
        "top1_agree": agree,
        "max_probability_difference": worst,
        "tolerance": CHECK_TOLERANCE,
        "against": "the same graph in PyTorch, rendered demo photos",
    }
    if agree != len(products) or worst > CHECK_TOLERANCE:
        raise ExportError(
            f"the exported graph disagrees with PyTorch on rendered photos (top-1 {agree} of {len(products)}, "
            f"probabilities up to {worst:.2g} apart); please report this run"
        )
    return result


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


_OUTPUT_MEANING = {
    "labels": "(K,) int64: the product's top-K output labels, best first",
    "probabilities": "(K,) float32: their calibrated probabilities",
    "category_ids": "(K,) int64: their category ids",
    "picture_labels": "(N, K) int64: each picture's top-K labels (head alone, uncalibrated)",
    "picture_probabilities": "(N, K) float32: their probabilities",
}
_AGGREGATION_MEANING = {
    "mean_prob": "mean of the pictures' probabilities",
    "mean_logprob": "normalised geometric mean of the pictures' probabilities",
    "vote": "share of pictures whose top-1 is each leaf, ties broken by mean probability",
    PRODUCT_HEAD: "the run's product head reads the N pictures as one product",
}


def _interface(graph: ProductGraph) -> dict[str, Any]:
    """Inputs, outputs and preprocessing: what a caller of the bare ONNX file needs to know."""
    spec = graph.features.backbone.spec
    pictures = {
        "dtype": "uint8",
        "shape": ["N", "H", "W", 3],
        "layout": "NHWC RGB",
        "meaning": "the N pictures of ONE product, all of one size",
    }
    preprocessing = {
        "input_size": [3, graph.preprocess.height, graph.preprocess.width],
        "mean": list(spec.mean),
        "std": list(spec.std),
        "interpolation": graph.preprocess.interpolation,
        "resize": "width then height, each rounded to uint8 (torchvision's uint8 resize); none at the input size",
    }
    return {"inputs": {"pictures": pictures}, "outputs": dict(_OUTPUT_MEANING), "preprocessing": preprocessing}


def _model_choices(predictor: Predictor, graph: ProductGraph) -> dict[str, Any]:
    """Backbone, store rows, aggregation and calibration baked into the graph."""
    extract = predictor.extract_config
    backbone = {
        "name": extract.backbone,
        "weights_id": graph.features.backbone.weights_id,
        "features": extract.features,
        "spatial_channels": extract.spatial_channels,
        "tta": extract.tta,
        "precision": "float32",
        "store": predictor.store_name,
    }
    aggregation = {
        "name": graph.aggregation,
        "meaning": _AGGREGATION_MEANING[graph.aggregation],
        "over": "the N pictures of the one product given",
        "chosen_on": "val (prodcat evaluate)" if _evaluated(predictor) else "default: the run was never evaluated",
    }
    calibration = {"tau": graph.tau, "temperature": graph.temperature, "order": "logit adjustment, then temperature"}
    return {
        "backbone": backbone,
        "extract_config": dataclasses.asdict(extract),
        "aggregation": aggregation,
        "calibration": calibration,
        "accept_threshold": picture_choices(predictor).threshold,
    }


def _evaluated(predictor: Predictor) -> bool:
    return (Path(predictor.run_dir) / "eval" / "metrics.json").is_file()


def _labels(predictor: Predictor, graph: ProductGraph) -> dict[str, Any]:
    """The output labels: the taxonomy's in label order, then the added categories."""
    taxonomy = predictor.taxonomy
    rows = [
        [int(taxonomy.category_ids[label]), *taxonomy.names(label), int(taxonomy.train_counts[label])]
        for label in range(taxonomy.num_classes)
    ]
    prototypes = predictor.prototypes
    return {
        "top_k": graph.top_k,
        "num_outputs": int(len(graph.category_table)),
        "taxonomy": {"columns": ["category_id", "level1", "level2", "level3", "train_count"], "rows": rows},
        "added_categories": [] if prototypes is None else prototypes.categories,
    }


def _left_out(predictor: Predictor) -> dict[str, Any]:
    """What the Predictor does that the graph does not, so a deployment knows."""
    text, twins = predictor.text_model, predictor.twin_choice
    return {
        "text": {
            "in_graph": False,
            "run_has_text_head": text is not None,
            "kind": None if text is None else text.kind,
            "note": "OCR words are not an input of the graph: a run with a text head exports its picture path "
            "alone, with evaluate's picture calibration and threshold (the PyTorch Predictor fuses the words and "
            "applies the text model's own), so predictions ignore the words read on the pictures",
        },
        "training_twins": {
            "in_graph": False,
            "chosen_on_val": None if twins is None else twins.name,
            "note": "byte-identical training photos need the raw bytes and the train index",
        },
        "accept_threshold": "a number, not a node: accept a product when probabilities[0] >= accept_threshold",
    }


def _sources(predictor: Predictor, config: ExportConfig, onnx_path: Path) -> dict[str, Any]:
    """Where the graph came from, and the sha256 of each file (the ONNX file's included)."""
    run = Path(predictor.run_dir).resolve()
    source = {"path": str(run), "name": run.name, "checkpoint": config.which, "step": predictor.meta.get("step")}
    sha256 = {
        "onnx": _sha256(onnx_path),
        "checkpoint_weights": (predictor.meta.get("checksums") or {}).get("weights"),
        "eval_metrics": _sha256(run / "eval" / "metrics.json"),
        "eval_prior": _sha256(run / "eval" / "prior.json"),
        "prototypes": _sha256(run / "prototypes.json"),
    }
    return {"source_run": source, "export_config": dataclasses.asdict(config), "sha256": sha256}


def _sidecar(predictor: Predictor, graph: ProductGraph, config: ExportConfig, onnx_path: Path) -> dict[str, Any]:
    return {
        "format": SIDECAR_FORMAT,
        "onnx": onnx_path.name,
        "opset": ONNX_OPSET,
        **_interface(graph),
        **_model_choices(predictor, graph),
        **_labels(predictor, graph),
        "left_out": _left_out(predictor),
        **_sources(predictor, config, onnx_path),
    }


def export_onnx(config: ExportConfig) -> dict[str, Any]:
    """Export `config.run` to `config.out` + its sidecar; returns the sidecar."""
    from prodcat.utils import atomic_write_bytes

    out = Path(config.out)
    if out.is_dir():
        raise ExportError(f"{out} is a folder; --out takes a file name such as {out / 'model.onnx'}")
    if not config.overwrite and (out.exists() or sidecar_path(out).exists()):
        raise ExportError(
            f"{out} exists; pass --overwrite to replace it (and {sidecar_path(out).name}), or another --out"
        )
    predictor = Predictor.load(config.run, which=config.which)
    graph = build_graph(predictor, config.top_k)
    if not _evaluated(predictor):
        log.warning("%s was never evaluated: the graph gets the default aggregation (%s) and no calibration; run "
                    "`prodcat evaluate --run %s` first to bake in the choices made on val", config.run,
                    graph.aggregation, config.run)  # fmt: skip
    if predictor.text_model is not None:
        log.warning(
            "%s has a text head (%s): the graph exports the picture path alone (OCR words are not an input)",
            config.run,
            predictor.text_model.kind,
        )
    model = graph_bytes(graph)
    check = self_check(graph, onnx_session(model))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, model)
    sidecar = {**_sidecar(predictor, graph, config, out), "self_check": check}
    write_json(sidecar_path(out), sidecar)
    log.info(
        "exported %s -> %s (%.1f MB; aggregation %s, top-%d)",
        config.run,
        out,
        len(model) / 1e6,
        graph.aggregation,
        graph.top_k,
    )
    return sidecar
