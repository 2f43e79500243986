"""Generated stand-ins for the real datasets, for tests and the demo.

Each generator writes files in its dataset's official layout, so the real readers load
them unchanged; masks and labels are exact because the defects are drawn, not found.
"""

from keras_vae_attn.data.synthetic.logical import write_logical_category
from keras_vae_attn.data.synthetic.mvtec_like import write_mvtec_category
from keras_vae_attn.data.synthetic.ucsd_like import (
    write_official_ped2_layout,
    write_ucsd_dataset,
)

__all__ = [
    "write_logical_category",
    "write_mvtec_category",
    "write_official_ped2_layout",
    "write_ucsd_dataset",
]
