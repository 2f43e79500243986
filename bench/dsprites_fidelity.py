"""How faithful the regenerated dSprites are: pixel IoU against the real preview frames.

    python -m bench.dsprites_fidelity --frames <dsprites>/<frames>.npy

<frames> is dsprites_gif_frames_320x64x64_uint8: the official preview animation's 320
frames sweep scale, orientation and position of each shape (their factor values are read
off the frames, see ``keras_vae_attn.data.dsprites.preview_factors``). Each frame is
redrawn from those factors; the table gives the pooled pixel IoU per shape, the worst
single frame, and how many frames match exactly.
"""

from __future__ import annotations

import os

import numpy as np

from bench import cli_parser
from bench.timing import print_table
from keras_vae_attn.data import DataError, dsprites


def iou_rows(frames):
    """One row per shape: pooled IoU, worst frame IoU, exact frames; frames (320, 64, 64)."""
    factors = dsprites.preview_factors()
    drawn = dsprites.render(factors).astype(bool)
    real = np.asarray(frames) > 0
    inter = np.count_nonzero(drawn & real, axis=(1, 2))
    union = np.count_nonzero(drawn | real, axis=(1, 2))
    rows = []
    for shape_class, name in enumerate(dsprites.SHAPES):
        rows_of = factors[:, 1] == shape_class
        per_frame = inter[rows_of] / union[rows_of]
        rows.append(
            {
                "shape": name,
                "frames": int(np.count_nonzero(rows_of)),
                "pooled IoU": inter[rows_of].sum() / union[rows_of].sum(),
                "worst frame IoU": float(per_frame.min()),
                "exact frames": int(np.count_nonzero(per_frame == 1.0)),
            }
        )
    return rows


def build_parser():
    """Its flags, apart from main: the README test parses its documented commands."""
    parser = cli_parser("dsprites_fidelity", __doc__)
    parser.add_argument(
        "--frames", required=True, help="dsprites_gif_frames_320x64x64_uint8.npy"
    )
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.path.isfile(args.frames):
        parser.error(f"--frames: {args.frames!r} does not exist")
    frames = np.load(args.frames)
    if frames.shape != (320, 64, 64):
        raise DataError(
            f"{args.frames!r} holds {frames.shape}, expected the 320 preview "
            "frames (320, 64, 64)"
        )
    print_table(
        iou_rows(frames), ["shape", "frames", "pooled IoU", "worst frame IoU", "exact frames"]
    )


if __name__ == "__main__":
    main()
