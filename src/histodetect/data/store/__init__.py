"""The packed store: patches decoded once into one memory-mappable uint8 array.

A store is a folder:

    patches.npy     (N, 96, 96, 3) uint8, memory-mapped by readers
    index.csv       id, label (-1 = unlabelled), split, slide, sha1 (of the pixels)
    manifest.json   format version, counts per split, source, content fingerprint
    skipped.csv     path, reason of each file `--skip-bad` skipped (only if any)

`prepare` writes it into a hidden sibling folder and renames that into place
only when everything, manifest last, is written: an interrupted prepare never
leaves a folder that looks like a store.

The package, in the order a store meets it:

    layout.py       file names, format version, is_store, fingerprint, split_counts
    out_folder.py   checking --out, removing killed prepares' partials, moving a store in
    pack.py         decoding into patches.npy (in workers when it pays), compacting it
    write.py        prepare, PrepareReport, PrepareWarning
    read.py         PatchStore, open_store
    describe.py     describe_store (`histodetect info`)
"""

from .describe import describe_store
from .layout import (
    INDEX_COLUMNS,
    INDEX_FILE,
    MANIFEST_FILE,
    PATCHES_FILE,
    SKIPPED_FILE,
    STORE_FORMAT_VERSION,
    is_store,
    split_counts,
)
from .pack import MIN_PATCHES_FOR_WORKERS, ignore_interrupts
from .read import PatchStore, open_store
from .write import PrepareReport, PrepareWarning, prepare

__all__ = [
    "INDEX_COLUMNS",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "MIN_PATCHES_FOR_WORKERS",
    "PATCHES_FILE",
    "SKIPPED_FILE",
    "STORE_FORMAT_VERSION",
    "PatchStore",
    "PrepareReport",
    "PrepareWarning",
    "describe_store",
    "ignore_interrupts",
    "is_store",
    "open_store",
    "prepare",
    "split_counts",
]
