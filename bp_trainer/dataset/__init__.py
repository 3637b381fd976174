"""Dataset: scanning image folders with captions, caption processing, bucketed batching and the bucket plan.

Light to import (Pillow and numpy only): the WebUI process uses it for the bucket plan.
"""

from __future__ import annotations

from bp_trainer.dataset.captions import (
    CaptionProcessor,
    CaptionVariants,
    chunk_token_ids,
    escape_brackets,
    pad_chunks,
    split_tags,
    tokenize_caption,
    unescape_brackets,
)
from bp_trainer.dataset.images import ImageInfo, ImageProblem, load_image_for_bucket, open_rgb, probe_image
from bp_trainer.dataset.sampler import Batch, BucketBatchSampler
from bp_trainer.dataset.scan import ImageItem, Problem, ScanResult, iter_captions, scan_dataset

__all__ = [
    "Batch",
    "BucketBatchSampler",
    "CaptionProcessor",
    "CaptionVariants",
    "ImageInfo",
    "ImageItem",
    "ImageProblem",
    "Problem",
    "ScanResult",
    "chunk_token_ids",
    "escape_brackets",
    "iter_captions",
    "load_image_for_bucket",
    "open_rgb",
    "pad_chunks",
    "probe_image",
    "scan_dataset",
    "split_tags",
    "tokenize_caption",
    "unescape_brackets",
]
