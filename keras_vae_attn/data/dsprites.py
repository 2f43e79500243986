"""dSprites (Matthey et al. 2017): the official archive, TFDS, or a faithful regeneration.

Whichever source is used, the data set is a :class:`DSprites` with one small ground-truth
interface (the one the disentanglement metric is written against):

    data.factor_names, data.factor_sizes, data.observation_shape
    data.sample_factors(num, rng)          -> int64 (num, 6) factor classes
    data.images_from_factors(factors)      -> float32 (num, 64, 64, 1) in {0, 1}

Factor classes are the official ``latents_classes``: (color, shape, scale, orientation,
pos_x, pos_y) with sizes (1, 3, 6, 40, 32, 32), and image ``i`` of the official archive
has the classes whose dot product with :data:`INDEX_BASES` is ``i`` (pos_y varies fastest).

The regeneration draws each sprite as an exact shape tested at pixel centres. Its geometry
was measured on the official preview animation (see :func:`preview_factors`): the sprite
centre sits at 16 + 32 * position pixels (pixel ``i`` spans [i, i + 1)), the square's
half side is 9.6 * scale, the ellipse's semi-axes 12.8 and 7.2 * scale, the heart is a
diamond with two round lobes, and orientation turns the sprite counter-clockwise on screen.
"""

from __future__ import annotations

import os

import numpy as np

from keras_vae_attn.data import DataError

FACTOR_NAMES = ("color", "shape", "scale", "orientation", "pos_x", "pos_y")
FACTOR_SIZES = (1, 3, 6, 40, 32, 32)
SHAPES = ("square", "ellipse", "heart")
NUM_IMAGES = int(np.prod(FACTOR_SIZES))  # 737,280
# Row stride of each factor in the archive: (737280, 245760, 40960, 1024, 32, 1).
INDEX_BASES = np.concatenate([np.cumprod(FACTOR_SIZES[::-1])[::-1][1:], [1]]).astype(np.int64)
IMAGE_SIZE = 64
OBSERVATION_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)
ARCHIVE_NAME = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
SOURCES = ("auto", "generate", "archive", "tfds")

# Geometry at scale 1, in pixels, fitted to the official preview frames.
SQUARE_HALF_SIDE = 9.6
ELLIPSE_AXES = (12.8, 7.2)
# Heart: diamond half-width, height above and below its centre, vertical offset of that
# centre from the sprite centre, and the lobes' centre (x, y) and radius.
HEART = dict(
    half_width=8.21,
    top=7.62,
    bottom=8.13,
    offset=-0.24,
    lobe_x=4.34,
    lobe_y=4.13,
    lobe_radius=5.32,
)
_CHUNK = 2048


def factor_values():
    """The real value behind each factor class, as in the archive's ``latents_values``."""
    return {
        "color": np.array([1.0]),
        "shape": np.array([1.0, 2.0, 3.0]),
        "scale": np.linspace(0.5, 1.0, 6),
        "orientation": np.linspace(0.0, 2 * np.pi, 40),
        "pos_x": np.linspace(0.0, 1.0, 32),
        "pos_y": np.linspace(0.0, 1.0, 32),
    }


def check_factors(factors):
    """Validate an int array (N, 6) of factor classes; returns it as int64."""
    factors = np.asarray(factors)
    if factors.ndim != 2 or factors.shape[1] != len(FACTOR_SIZES):
        raise ValueError(
            f"factors must have shape (N, {len(FACTOR_SIZES)}) "
            f"{FACTOR_NAMES}; got {factors.shape}"
        )
    if not np.issubdtype(factors.dtype, np.integer):
        raise ValueError(f"factors must be integer classes, got dtype {factors.dtype}")
    for column, (name, size) in enumerate(zip(FACTOR_NAMES, FACTOR_SIZES)):
        bad = (factors[:, column] < 0) | (factors[:, column] >= size)
        if bad.any():
            raise ValueError(
                f"factor {name!r} must be in [0, {size}); got "
                f"{factors[bad, column][0]} (row {int(np.flatnonzero(bad)[0])})"
            )
    return factors.astype(np.int64)


def index_from_factors(factors):
    """Row of the official archive holding each factor combination, (N,) int64."""
    return check_factors(factors) @ INDEX_BASES


def factors_from_index(index):
    """Inverse of :func:`index_from_factors`: (N,) indices -> (N, 6) classes."""
    index = np.asarray(index, np.int64)
    if index.size and (index.min() < 0 or index.max() >= NUM_IMAGES):
        raise ValueError(
            f"dSprites indices must be in [0, {NUM_IMAGES}); got "
            f"[{index.min()}, {index.max()}]"
        )
    return (index[:, None] // INDEX_BASES[None, :]) % np.array(FACTOR_SIZES)[None, :]


def _sprite_coordinates(factors):
    """Pixel centres in each sprite's own frame, in scale-1 pixels: (u, v) each (N, 64, 64).

    u points right and v up along the unrotated sprite.
    """
    values = factor_values()
    scale = values["scale"][factors[:, 2]][:, None, None]
    angle = values["orientation"][factors[:, 3]][:, None, None]
    centre_x = (IMAGE_SIZE / 4 + IMAGE_SIZE / 2 * values["pos_x"][factors[:, 4]])[
        :, None, None
    ]
    centre_y = (IMAGE_SIZE / 4 + IMAGE_SIZE / 2 * values["pos_y"][factors[:, 5]])[
        :, None, None
    ]
    pixels = np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5
    right = pixels[None, None, :] - centre_x
    up = centre_y - pixels[None, :, None]  # rows grow downwards
    cos, sin = np.cos(angle), np.sin(angle)
    return (cos * right + sin * up) / scale, (cos * up - sin * right) / scale


def _inside(shape_class, u, v):
    """Boolean mask of the pixels inside one shape (``shape_class`` 0, 1 or 2)."""
    if shape_class == 0:
        return (np.abs(u) <= SQUARE_HALF_SIDE) & (np.abs(v) <= SQUARE_HALF_SIDE)
    if shape_class == 1:
        return (u / ELLIPSE_AXES[0]) ** 2 + (v / ELLIPSE_AXES[1]) ** 2 <= 1.0
    h = HEART
    v = v - h["offset"]
    across = np.abs(u) / h["half_width"]
    diamond = np.where(v >= 0, across + v / h["top"], across - v / h["bottom"]) <= 1.0
    lobes = (np.abs(u) - h["lobe_x"]) ** 2 + (v - h["lobe_y"]) ** 2 <= h["lobe_radius"] ** 2
    return diamond | lobes


def render(factors):
    """Draw the sprites of ``factors`` (N, 6): uint8 (N, 64, 64) with values 0/1."""
    factors = check_factors(factors)
    out = np.zeros((len(factors), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for start in range(0, len(factors), _CHUNK):
        chunk = factors[start : start + _CHUNK]
        u, v = _sprite_coordinates(chunk)
        for shape_class in np.unique(chunk[:, 1]):
            rows = np.flatnonzero(chunk[:, 1] == shape_class)
            out[start + rows] = _inside(shape_class, u[rows], v[rows])
    return out


def preview_factors():
    """Factor classes (320, 6) of the frames of the official preview animation.

    Inferred from the frames themselves: hearts (frames 0-191) sweep scale, orientation,
    then pos_y down, pos_x across, pos_y up, pos_x back and scale down; ellipses
    (192-255) and squares (256-319) sweep scale and orientation at position (0, 0).
    """
    up, down = list(range(6)), list(range(5, -1, -1))
    rows = []

    def add(shape, scales=(5,), orientations=(0,), xs=(0,), ys=(0,)):
        for s in scales:
            for o in orientations:
                for x in xs:
                    for y in ys:
                        rows.append((0, shape, s, o, x, y))

    ramp, back = range(32), range(31, -1, -1)
    for s in up + down + up:
        add(2, scales=(s,))
    add(2, orientations=range(40))
    add(2, ys=ramp)
    add(2, xs=ramp, ys=(31,))
    add(2, xs=(31,), ys=back)
    add(2, xs=back)
    add(2, scales=down)
    for shape in (1, 0):
        for s in up + down + up:
            add(shape, scales=(s,))
        add(shape, orientations=range(40))
        add(shape, scales=down)
    return np.array(rows, np.int64)


class DSprites:
    """The dSprites ground truth: factors in, binary images out.

    ``images`` is None for the regeneration, or the official images in archive order,
    bit-packed along the width (uint8 (737280, 64, 8), 360 MiB instead of 2.8 GiB).
    """

    factor_names = FACTOR_NAMES
    factor_sizes = FACTOR_SIZES
    observation_shape = OBSERVATION_SHAPE

    def __init__(self, images=None, source="generated"):
        if images is not None and images.shape != (NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE // 8):
            raise ValueError(
                f"packed dSprites images must have shape "
                f"{(NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE // 8)}, got {images.shape}"
            )
        self.packed = images
        self.source = source

    @property
    def num_factors(self):
        return len(self.factor_sizes)

    def sample_factors(self, num, rng):
        """``num`` factor combinations drawn uniformly, int64 (num, 6); ``rng`` a numpy
        Generator (randomness is always passed in, never global)."""
        return np.stack([rng.integers(0, size, num) for size in self.factor_sizes], axis=1)

    def images_from_factors(self, factors):
        """float32 (N, 64, 64, 1) images in {0, 1} for factor classes (N, 6)."""
        if self.packed is None:
            binary = render(factors)
        else:
            binary = np.unpackbits(self.packed[index_from_factors(factors)], axis=-1)
        return binary[..., None].astype(np.float32)

    def batches(self, batch_size, seed):
        """Endless stream of training batches float32 (B, 64, 64, 1): each a fresh uniform
        draw of factors, i.e. sampling the full data set with replacement."""
        rng = np.random.default_rng(seed)
        while True:
            yield self.images_from_factors(self.sample_factors(batch_size, rng))


def pack(binary):
    """uint8 (N, 64, 64) 0/1 (or 0/255) -> bit-packed (N, 64, 8)."""
    return np.packbits(np.asarray(binary) > 0, axis=-1)


def find_archive(data_dir):
    """The official npz inside ``data_dir`` (or ``data_dir`` itself if it is the file)."""
    if os.path.isfile(data_dir):
        return data_dir
    if not os.path.isdir(data_dir):
        raise DataError(f"dSprites data directory {data_dir!r} does not exist")
    path = os.path.join(data_dir, ARCHIVE_NAME)
    if not os.path.isfile(path):
        raise DataError(
            f"dSprites archive {ARCHIVE_NAME} not found in {data_dir!r}; "
            "download it from github.com/deepmind/dsprites-dataset or give no "
            "data directory to regenerate the images",
            option="data_dir",
        )
    return path


def load_archive(path):
    """Read the official npz, checking its images and its factor ordering."""
    try:
        archive = np.load(path, allow_pickle=False, encoding="latin1")
        names = set(archive.files)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read dSprites archive {path!r}: {error}") from error
    if "imgs" not in names:
        raise DataError(
            f"dSprites archive {path!r} has no 'imgs' array (it holds {sorted(names)})"
        )
    try:
        images = archive["imgs"]
    except (OSError, ValueError) as error:
        raise DataError(f"dSprites archive {path!r} is corrupt: {error}") from error
    if images.shape != (NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"dSprites archive {path!r}: 'imgs' has shape {images.shape}, "
            f"expected {(NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE)}"
        )
    if "latents_classes" in names:
        classes = archive["latents_classes"]
        probe = np.linspace(0, NUM_IMAGES - 1, 997).astype(np.int64)
        if classes.shape != (NUM_IMAGES, 6) or not np.array_equal(
            classes[probe], factors_from_index(probe)
        ):
            raise DataError(
                f"dSprites archive {path!r}: 'latents_classes' is not in the "
                "official order (index = classes . "
                f"{INDEX_BASES.tolist()})"
            )
    packed = np.concatenate([pack(images[i : i + 65536]) for i in range(0, NUM_IMAGES, 65536)])
    return DSprites(packed, source=f"archive:{os.path.basename(path)}")


TFDS_LABELS = (
    "label_shape",
    "label_scale",
    "label_orientation",
    "label_x_position",
    "label_y_position",
)


def load_tfds(download=True):
    """dSprites from tensorflow-datasets, put back into the official order by its labels."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise DataError(
            "tensorflow-datasets is not installed; pip install "
            "tensorflow-datasets, or give a data directory holding the official "
            "archive",
            option="data_dir",
        ) from error
    try:
        dataset = tfds.load("dsprites", split="train", download=download, batch_size=65536)
    except Exception as error:
        raise DataError(
            f"TFDS dsprites is not available ({type(error).__name__}: {error})"
        ) from error
    packed = np.zeros((NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE // 8), np.uint8)
    seen = np.zeros(NUM_IMAGES, bool)
    for batch in tfds.as_numpy(dataset):
        labels = np.stack(
            [np.zeros_like(batch["label_shape"])] + [batch[name] for name in TFDS_LABELS],
            axis=1,
        )
        index = index_from_factors(labels.astype(np.int64))
        packed[index] = pack(batch["image"][..., 0])
        seen[index] = True
    if not seen.all():
        raise DataError(
            f"TFDS dsprites is incomplete: {np.count_nonzero(~seen)} of "
            f"{NUM_IMAGES} factor combinations missing"
        )
    return DSprites(packed, source="tfds")


def load(data_dir=None, source="auto"):
    """The data set from ``source``.

    ``archive`` reads the official npz from ``data_dir``; ``tfds`` loads (downloading if
    needed) the TFDS copy; ``generate`` regenerates the images. ``auto`` uses the archive
    when ``data_dir`` is given, else an already-downloaded TFDS copy, else regenerates
    (it never touches the network).
    """
    if source not in SOURCES:
        raise ValueError(f"unknown dSprites source {source!r}; choose one of {SOURCES}")
    if source == "archive" or (source == "auto" and data_dir):
        if not data_dir:
            raise DataError(
                "the dSprites archive source needs a data directory", option="data_dir"
            )
        return load_archive(find_archive(data_dir))
    if source == "tfds":
        return load_tfds(download=True)
    if source == "auto" and tfds_copy_present():
        try:
            return load_tfds(download=False)
        except DataError:
            pass
    return DSprites()


def tfds_copy_present():
    """Whether a prepared TFDS dsprites copy is on disk (a ``dataset_info.json`` under
    ``$TFDS_DATA_DIR/dsprites``, default ``~/tensorflow_datasets``). Checked before
    asking TFDS, which otherwise logs an absl warning about a version folder that does
    not exist each time ``auto`` falls back to regenerating."""
    root = os.path.join(
        os.environ.get("TFDS_DATA_DIR")
        or os.path.join(os.path.expanduser("~"), "tensorflow_datasets"),
        "dsprites",
    )
    return any("dataset_info.json" in files for _, _, files in os.walk(root))
