"""Evaluation metrics: anomaly localization (pixel AUROC, best IoU, AUPRO, image AUROC)."""

from keras_vae_attn.metrics.localization import (
    aupro,
    best_iou,
    evaluate_methods,
    image_auroc,
    pixel_auroc,
)

__all__ = ["aupro", "best_iou", "evaluate_methods", "image_auroc", "pixel_auroc"]
