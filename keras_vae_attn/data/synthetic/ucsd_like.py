"""A small UCSD-pedestrian-style video dataset, generated: the tests' fixture and the demo.

A fixed camera looks at a textured walkway (the texture is the same in every clip, as in
the real footage) under changing outdoor light: each clip has its own brightness, and a
large soft cloud shadow drifts across. Normal clips show a crowd of small "pedestrians",
soft dark or light ellipses walking slowly up and down the walkway. Each test clip adds
an object that is larger and fast (a cart, a cyclist) crossing the scene, no darker than
the pedestrians; a fast object is drawn motion-blurred over its travel during the
frame's exposure, so its speed shows in a single frame. Masks are exact: the pixels at
least half covered by an anomalous object.

Files follow the official layout (see :mod:`keras_vae_attn.data.ucsd`); some test clips
get no ``_gt`` folder, as in the real Ped1, and the Test folder holds a frame-level
annotation file like the official ``UCSDped1.m``. :func:`write_official_ped2_layout` adds
the official Ped2 release's quirks, so the reader is tested against them.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from keras_vae_attn.data.synthetic.cache import write_once
from keras_vae_attn.data.ucsd import SUBSETS

FORMATS = ("tif", "bmp", "png", "jpg")
VERSION = 2  # bump when the drawing changes, so cached datasets are redrawn
BLUR_STEPS = 8
# Test clips whose masks the official Ped2 release names "frame001.bmp", not "001.bmp".
OFFICIAL_FRAME_PREFIX_CLIPS = (6, 9, 12)
JUNK = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X"  # resource-fork bytes, no image


def _smooth_noise(rng, height, width, cell):
    """Value noise: a coarse random grid upsampled bicubically, float (height, width)."""
    coarse = rng.random((max(2, height // cell + 2), max(2, width // cell + 2)))
    picture = Image.fromarray(coarse.astype(np.float32)).resize(
        ((width // cell + 2) * cell, (height // cell + 2) * cell), Image.Resampling.BICUBIC
    )
    return np.asarray(picture)[:height, :width]


def background(rng, height, width):
    """The walkway: a lit gradient, paving texture at two scales and seams; (H, W) in
    [0, 1]."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    light = 0.45 + 0.15 * (yy / height) + 0.05 * np.cos(xx / width * np.pi)
    texture = 0.10 * (_smooth_noise(rng, height, width, max(2, width // 12)) - 0.5) + 0.08 * (
        _smooth_noise(rng, height, width, 2) - 0.5
    )
    seams = 0.05 * (np.abs(np.sin((xx + 0.6 * yy) * np.pi / max(4, width // 8))) < 0.12)
    return np.clip(light + texture - seams, 0.0, 1.0).astype(np.float32)


def _footprint(grid, centre, radii, velocity):
    """Coverage (H, W) in [0, 1] of a soft ellipse, averaged over its travel in one frame."""
    yy, xx = grid
    cover = np.zeros_like(yy)
    steps = BLUR_STEPS if np.hypot(*velocity) > 0.5 else 1
    for t in np.linspace(-0.5, 0.5, steps) if steps > 1 else [0.0]:
        cx, cy = centre[0] + t * velocity[0], centre[1] + t * velocity[1]
        d = np.sqrt(((xx - cx) / radii[0]) ** 2 + ((yy - cy) / radii[1]) ** 2)
        cover += np.clip((1.0 - d) * 3.0, 0.0, 1.0)  # ~1/3 radius soft rim
    return cover / steps


def _walker(rng, height, width, frames):
    """A pedestrian: small upright ellipse walking slowly up or down, somewhere across."""
    radii = (width * rng.uniform(0.025, 0.035), height * rng.uniform(0.07, 0.09))
    speed = rng.uniform(0.25, 0.6) * height / 64 * rng.choice([-1, 1])
    start = (rng.uniform(0.1, 0.9) * width, rng.uniform(-0.1, 1.1) * height)
    return dict(
        radii=radii,
        start=start,
        velocity=(rng.normal(0, 0.05), speed),
        shade=float(rng.choice([rng.uniform(0.1, 0.3), rng.uniform(0.7, 0.9)])),
        first=int(rng.integers(-frames, frames)),
        anomalous=False,
    )


def _intruder(rng, height, width, frames):
    """An anomaly: a larger object crossing fast (a cyclist, a cart), seen for a while."""
    radii = (width * rng.uniform(0.07, 0.1), height * rng.uniform(0.1, 0.14))
    direction = rng.choice([-1, 1])
    speed = rng.uniform(3.5, 5.0) * width / 96
    start = (width * (0.5 - 0.6 * direction), rng.uniform(0.3, 0.7) * height)
    return dict(
        radii=radii,
        start=start,
        velocity=(direction * speed, rng.normal(0, 0.2)),
        shade=float(rng.uniform(0.2, 0.35)),
        first=int(rng.integers(frames // 5, frames // 2)),
        anomalous=True,
    )


def _lighting(rng, grid, frames):
    """Per-frame light (H, W): a clip-level gain drifting a little, and a large soft
    cloud shadow sliding slowly across, as outdoor footage shows."""
    height, width = grid[0].shape
    gain = np.linspace(*rng.uniform(0.8, 1.15, 2), frames)
    radii = (width * rng.uniform(0.35, 0.6), height * rng.uniform(0.5, 0.9))
    start = (rng.uniform(-0.3, 1.3) * width, rng.uniform(0.0, 1.0) * height)
    velocity = rng.uniform(-0.6, 0.6, 2) * width / 96
    depth = rng.uniform(0.0, 0.3)
    for t in range(frames):
        centre = (start[0] + t * velocity[0], start[1] + t * velocity[1])
        d = np.sqrt(
            ((grid[1] - centre[0]) / radii[0]) ** 2 + ((grid[0] - centre[1]) / radii[1]) ** 2
        )
        yield gain[t] * (1.0 - depth * np.clip(1.5 * (1.0 - d), 0.0, 1.0))


def render_clip(rng, scene, frames, walkers, intruders):
    """Frames uint8 (T, H, W) and anomaly masks bool (T, H, W) of one clip."""
    height, width = scene.shape
    grid = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    movers = [_walker(rng, height, width, frames) for _ in range(walkers)] + [
        _intruder(rng, height, width, frames) for _ in range(intruders)
    ]
    images = np.zeros((frames, height, width), np.uint8)
    masks = np.zeros((frames, height, width), bool)
    for t, light in enumerate(_lighting(rng, grid, frames)):
        frame = scene
        for mover in movers:
            age = t - mover["first"]
            centre = (
                mover["start"][0] + age * mover["velocity"][0],
                mover["start"][1] + age * mover["velocity"][1],
            )
            if age < 0 or not (
                -width * 0.2 < centre[0] < width * 1.2
                and -height * 0.2 < centre[1] < height * 1.2
            ):
                continue
            cover = _footprint(grid, centre, mover["radii"], mover["velocity"])
            frame = frame * (1.0 - cover) + mover["shade"] * cover
            if mover["anomalous"]:
                masks[t] |= cover >= 0.5
        frame = frame * light + rng.normal(0.0, 0.01, frame.shape)  # lit, sensor noise
        images[t] = np.round(np.clip(frame, 0.0, 1.0) * 255).astype(np.uint8)
    return images, masks


def write_ucsd_dataset(
    root,
    subset="ped1",
    width=120,
    height=80,
    frames=40,
    n_train=6,
    n_test=4,
    n_test_without_gt=1,
    walkers=16,
    frame_format="tif",
    mask_format="bmp",
    seed=0,
    exist_ok=True,
    frame_prefix_clips=None,
    junk_files=False,
):
    """Write ``<root>/UCSDped1`` (``UCSDped2``) in the official layout; return its path.

    Train clips hold only walkers. Each test clip also has one fast, large intruder
    entering a fifth to half of the way through, so part of its frames are normal; the
    last ``n_test_without_gt`` test clips get no ``_gt`` folder. The folder appears in one
    rename once complete; with ``exist_ok`` one written with the same settings is reused,
    one written with other settings replaced.

    Quirks of real copies, off by default: the test clips numbered in
    ``frame_prefix_clips`` name their masks ``frame001.bmp``; ``junk_files`` puts a
    ``.DS_Store`` and a ``._001.tif`` resource fork (garbage bytes) in every clip folder.
    """
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    for name, value in (("frame_format", frame_format), ("mask_format", mask_format)):
        if value not in FORMATS:
            raise ValueError(f"{name} must be one of {FORMATS}, got {value!r}")
    if not 0 <= n_test_without_gt <= n_test:
        raise ValueError(
            f"n_test_without_gt must be in [0, n_test={n_test}], got {n_test_without_gt}"
        )
    if width < 16 or height < 16 or frames < 4:
        raise ValueError(
            f"frames must be at least 16x16 and clips 4 frames long; got "
            f"{width}x{height}, {frames} frames"
        )
    spec = dict(
        version=VERSION,
        subset=subset,
        width=int(width),
        height=int(height),
        frames=int(frames),
        n_train=int(n_train),
        n_test=int(n_test),
        n_test_without_gt=int(n_test_without_gt),
        walkers=int(walkers),
        frame_format=frame_format,
        mask_format=mask_format,
        seed=int(seed),
    )
    if frame_prefix_clips or junk_files:  # only then, so older caches stay valid
        spec.update(
            frame_prefix_clips=sorted(int(n) for n in frame_prefix_clips or ()),
            junk_files=bool(junk_files),
        )
    return write_once(root, SUBSETS[subset], spec, _write_into, exist_ok)


def write_official_ped2_layout(
    root, frame_prefix_clips=OFFICIAL_FRAME_PREFIX_CLIPS, n_test_without_gt=0, **settings
):
    """``<root>/UCSDped2`` laid out like the official Ped2 release, quirks included: tif
    frames, bmp masks for every test clip, masks of clips 6, 9 and 12 (when written) named
    ``frameNNN.bmp``, and ``.DS_Store`` / ``._001.tif`` junk in the clip folders."""
    return write_ucsd_dataset(
        root,
        "ped2",
        frame_format="tif",
        mask_format="bmp",
        n_test_without_gt=n_test_without_gt,
        frame_prefix_clips=frame_prefix_clips,
        junk_files=True,
        **settings,
    )


def _save_frames(folder, pixels, extension, prefix="", junk=False):
    os.makedirs(folder)
    names = [f"{prefix}{index:03d}.{extension}" for index in range(1, len(pixels) + 1)]
    for name, frame in zip(names, pixels):
        Image.fromarray(frame).save(os.path.join(folder, name))
    if junk:
        for name in (".DS_Store", "._" + names[0]):
            with open(os.path.join(folder, name), "wb") as handle:
                handle.write(JUNK)


def _write_into(folder, spec):
    rng = np.random.default_rng(spec["seed"])
    scene = background(rng, spec["height"], spec["width"])
    junk = spec.get("junk_files", False)
    for index in range(1, spec["n_train"] + 1):
        images, _ = render_clip(rng, scene, spec["frames"], spec["walkers"], 0)
        _save_frames(
            os.path.join(folder, "Train", f"Train{index:03d}"),
            images,
            spec["frame_format"],
            junk=junk,
        )
    annotation = ["TestVideoFile = {};"]
    with_gt = spec["n_test"] - spec["n_test_without_gt"]
    for index in range(1, spec["n_test"] + 1):
        images, masks = render_clip(rng, scene, spec["frames"], spec["walkers"], 1)
        clip = os.path.join(folder, "Test", f"Test{index:03d}")
        _save_frames(clip, images, spec["frame_format"], junk=junk)
        if index <= with_gt:
            prefix = "frame" if index in spec.get("frame_prefix_clips", ()) else ""
            _save_frames(
                clip + "_gt", masks.astype(np.uint8) * 255, spec["mask_format"], prefix, junk
            )
        anomalous = np.flatnonzero(masks.any(axis=(1, 2))) + 1
        span = f"[{anomalous[0]}:{anomalous[-1]}]" if len(anomalous) else "[]"
        annotation.append(f"TestVideoFile{{end+1}}.gt_frame = {span};")
    name = SUBSETS[spec["subset"]]
    with open(os.path.join(folder, "Test", f"{name}.m"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(annotation) + "\n")
