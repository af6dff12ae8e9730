"""Scoring at scale: columns (FLIPD, normal bundle, CFG norms, ...) over an input source, on every
device of every host, written once per item to resumable Parquet parts.

``score(model, columns, source, out)`` is the engine (:mod:`mmh_jax.scoring.engine`);
``mmh-jax score --config FILE.toml`` runs it from the command line (:mod:`mmh_jax.scoring.config`).
"""

from mmh_jax.scoring.columns import (
    CFGNorms,
    Column,
    Flipd,
    Inputs,
    JacobianRank,
    NearestNeighbour,
    NormalBundle,
    Pixels,
    PngSize,
)
from mmh_jax.scoring.detector_columns import (
    CrossAttentionStats,
    DetectorImages,
    Sharpness,
    ValueActivations,
)
from mmh_jax.scoring.engine import Generation, Plan, Summary, data_mesh, score
from mmh_jax.scoring.model import Model
from mmh_jax.scoring.prompt_columns import (
    ClipScore,
    EmbeddingMitigation,
    ImageSimilarity,
    SavedImage,
    TokenAttributions,
    saved_image_path,
)
from mmh_jax.scoring.sources import (
    ArrayFile,
    BadItem,
    ImageFolder,
    Item,
    ParquetTable,
    PromptFile,
    Seeds,
    Source,
    TarShards,
    open_source,
)
from mmh_jax.scoring.store import Merged, RunMismatch, merge, vectors

__all__ = [
    "ArrayFile",
    "BadItem",
    "CFGNorms",
    "ClipScore",
    "Column",
    "CrossAttentionStats",
    "DetectorImages",
    "EmbeddingMitigation",
    "Flipd",
    "Generation",
    "ImageFolder",
    "ImageSimilarity",
    "Inputs",
    "Item",
    "JacobianRank",
    "Merged",
    "Model",
    "NearestNeighbour",
    "NormalBundle",
    "ParquetTable",
    "Plan",
    "Pixels",
    "PngSize",
    "PromptFile",
    "RunMismatch",
    "SavedImage",
    "Seeds",
    "Sharpness",
    "Source",
    "Summary",
    "TarShards",
    "TokenAttributions",
    "ValueActivations",
    "data_mesh",
    "merge",
    "open_source",
    "saved_image_path",
    "score",
    "vectors",
]
