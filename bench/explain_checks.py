"""What the explanation checks cost beside the evaluation pass they accompany.

    python -m bench.explain_checks --run <MVTec or UCSD run folder>

On a trained run, timed in turns (bench.timing.interleaved_medians) so the machine's
load hits all alike:
  evaluation      the run's heatmap over the test set (pipeline.batched with its options)
  full evaluation what the trainer's evaluation does without the twin
                  (evaluate.localize: the heatmap, the paper's form, the references, the
                  metrics at three smoothing levels)
  twin fit        a randomized twin of the VAE with its normal statistics re-fitted
  twin scoring    the run's heatmap over the test set on the twin
  faithfulness    deletion and insertion curves of that heatmap and a random order on up
                  to --images anomalous test images (11 fractions each)
  selectivity     the per-latent maps and their selectivity on the same images
and prints each as a ratio to both evaluations (the issue's target: at most one
evaluation pass each).
"""

from __future__ import annotations

import os

from bench import cli_parser


def build_parser():
    parser = cli_parser("explain_checks", __doc__)
    parser.add_argument("--run", required=True, help="a trained MVTec or UCSD run folder")
    parser.add_argument(
        "--images",
        type=int,
        default=16,
        help="anomalous test images for the faithfulness passes",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from keras_vae_attn.console import start_tensorflow

    start_tensorflow()
    import numpy as np
    import tensorflow as tf

    from bench.localization_grid import load_run_data
    from bench.timing import interleaved_medians
    from keras_vae_attn import evaluate, references
    from keras_vae_attn.explain import faithfulness, pipeline, sanity
    from keras_vae_attn.explain.options import ExplainOptions

    _, config, model, normal, images, masks, labels = load_run_data(args.run)
    options = ExplainOptions.from_config(config).replace(smooth=0.0)
    batches = tf.data.Dataset.from_tensor_slices(normal).batch(64)
    pipeline.fit_missing_statistics(model, batches, options)
    twin = sanity.twin(model, batches, options.layers, options.needs_covariance)
    bad = images[np.asarray(labels) > 0][: args.images]
    heat = pipeline.batched(model, bad, args.batch_size, options, keys=("heatmap",))["heatmap"]
    pixels = references.fit_pixel_distribution(normal)
    mean = pixels.mean

    def evaluation(vae=model):
        pipeline.batched(vae, images, args.batch_size, options, keys=("heatmap",))

    def full_evaluation():
        evaluate.localize(
            model, images, masks, labels, options, pixels, normal, args.batch_size
        )

    def twin_fit():
        sanity.twin(model, batches, options.layers, options.needs_covariance)

    def faith():
        faithfulness.curves(model, bad, {"heatmap": heat}, mean, args.batch_size)

    def selective():
        latent = pipeline.batched(model, bad, args.batch_size, options, keys=("per_latent",))[
            "per_latent"
        ]
        maps = np.stack(
            [
                pipeline.upsample(latent[:, d], bad.shape[1:3]).numpy()
                for d in range(latent.shape[1])
            ],
            axis=1,
        )
        faithfulness.selectivity(model, bad, maps, mean, batch_size=args.batch_size)

    names = (
        "evaluation",
        "full evaluation",
        "twin fit",
        "twin scoring",
        "faithfulness",
        "selectivity",
    )
    times = interleaved_medians(
        [evaluation, full_evaluation, twin_fit, lambda: evaluation(twin), faith, selective],
        repeats=args.repeats,
        budget_s=120.0,
    )
    print(
        f"{os.path.basename(os.path.abspath(args.run))}: {len(images)} test images, "
        f"{len(bad)} anomalous for the faithfulness passes; {options.describe()}"
    )
    for name, seconds in zip(names, times):
        print(
            f"  {name:<16}{seconds:8.2f} s  {seconds / times[0]:6.2f}x the heatmap pass  "
            f"{seconds / times[1]:6.2f}x the full evaluation"
        )
    return dict(zip(names, times))


if __name__ == "__main__":
    main()
