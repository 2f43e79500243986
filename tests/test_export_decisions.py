"""One decision everywhere: pred_score, pred_label and pred_mask of the served
SavedModel, of ONNX Runtime and of a run's predictions.csv (keras_vae_attn.predictions)
agree for the same images at the same thresholds."""

import numpy as np
import pytest
import tensorflow as tf

from export import load_thresholds
from export import onnx as onnx_export
from keras_vae_attn import predictions
from keras_vae_attn.data import mvtec
from keras_vae_attn.explain import pipeline
from keras_vae_attn.models import load_vae
from keras_vae_attn.runs import RunFolder

from conftest import assert_same_map

pytestmark = pytest.mark.slow  # trains a run and exports it (shared session fixtures)


def test_decisions_agree_across_saved_model_onnx_and_predictions_csv(
    mvtec_run, mvtec_export, mvtec_images
):
    images = mvtec.to_float(mvtec_images[1].images)
    thresholds = load_thresholds(str(mvtec_export / "thresholds.json"))
    options = RunFolder(mvtec_run).options()
    heatmaps = pipeline.explain_anomaly(
        load_vae(str(mvtec_run / "model")), images, options, keys=("heatmap",)
    )["heatmap"].numpy()
    want = predictions.predict(heatmaps, thresholds)  # predictions.csv's columns
    loaded = tf.saved_model.load(str(mvtec_export / "serving" / "model" / "1"))
    served = {
        key: value.numpy()
        for key, value in loaded.signatures["serving_default"](
            images=tf.constant(images)
        ).items()
    }
    session = onnx_export.session(str(mvtec_export / "model.onnx"))
    names = [output.name for output in session.get_outputs()]
    from_onnx = dict(zip(names, session.run(None, {"images": images})))
    pixels = heatmaps[0].size
    for label, out in (("SavedModel", served), ("ONNX Runtime", from_onnx)):
        assert_same_map(out["heatmap"], heatmaps, label)
        np.testing.assert_allclose(out["score"], want["image_score"], rtol=1e-4, err_msg=label)
        np.testing.assert_allclose(
            out["pred_score"], want["pred_score"], atol=1e-4, err_msg=label
        )
        assert ((0 <= out["pred_score"]) & (out["pred_score"] <= 1)).all()
        np.testing.assert_array_equal(out["pred_label"], want["pred_label"], err_msg=label)
        np.testing.assert_array_equal(out["pred_label"], out["pred_score"] > 0.5)
        np.testing.assert_array_equal(out["pred_mask"], out["heatmap"] > thresholds.pixel)
        # a pixel within the 1e-4 parity of the threshold may flip: a few of 4096
        np.testing.assert_allclose(
            out["pred_mask"].mean(axis=(1, 2)),
            want["pred_mask_fraction"],
            atol=5 / pixels,
            err_msg=label,
        )
    assert want["pred_mask_fraction"].max() > 0  # the masks are not trivially empty
