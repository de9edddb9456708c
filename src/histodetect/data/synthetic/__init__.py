"""Synthetic H&E-like patches for the demo and for fast tests.

These are NOT tissue. They are procedurally drawn pictures that imitate the look
of PatchCamelyon patches (pink eosin stroma with fibres, white gaps, small round
purple nuclei) and, more importantly, its task: a patch is positive when larger,
darker, irregular "tumour" nuclei sit inside the centre 32x32 pixels, and nothing
outside that square tells the classes apart. They are learnable as PCam is: a
4-layer CNN trained for 60 s on one CPU thread (3,000 patches) reached 0.92-0.93
validation accuracy, with 73-78% of its class activation on positives inside the
centre ninth of the patch. Never use them to make a claim about real histopathology.

Colours follow Beer-Lambert absorption, as real stains do: each pixel holds a
haematoxylin and an eosin density, and RGB = background * exp(-optical density),
with per-patch jitter of the stain vectors and intensities so that colour alone
does not give the label away.

The package, in the order a patch meets it:

    noise.py     per-patch draws and smooth random fields
    stamps.py    nucleus stamps and scattering them into patches
    tissue.py    what both classes share: stroma, normal nuclei, white gaps
    tumour.py    the label's evidence inside the centre 32x32 (CENTRE_START_PX, CENTRE_SIZE_PX)
    stain.py     densities to RGB by Beer-Lambert absorption
    patches.py   make_synthetic_patches: labelled patches from one random stream
    splits.py    split fractions: checking them, stratified indices (DEFAULT_SPLITS)
    layouts.py   the Kaggle, PCam HDF5 and image-folder writers
    write.py     write_synthetic: check, draw, write one layout atomically
"""

from .patches import make_synthetic_patches
from .splits import DEFAULT_SPLITS
from .tumour import CENTRE_SIZE_PX, CENTRE_START_PX
from .write import write_synthetic

__all__ = ["CENTRE_SIZE_PX", "CENTRE_START_PX", "DEFAULT_SPLITS", "make_synthetic_patches", "write_synthetic"]
