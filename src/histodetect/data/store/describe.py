"""describe_store: what `histodetect info` reports of a store."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

from .layout import split_counts
from .read import PatchStore, open_store


def describe_store(store: PatchStore | Path | str) -> dict:
    """Counts, label balance per split, duplicates within splits and patches shared across splits.

    `store` is an open PatchStore or the store's folder.
    """
    if isinstance(store, (str, os.PathLike)):
        store = open_store(Path(store))
    splits = {}
    splits_by_sha1: dict[str, set[str]] = defaultdict(set)
    for split, counts in split_counts(store.labels, store.splits).items():
        rows = store.split_indices(split)
        sha1s = store.sha1s[rows]
        n_unique = len(set(sha1s.tolist()))
        labelled = counts["positive"] + counts["negative"]
        splits[split] = {
            **counts,
            "positive_fraction": round(counts["positive"] / labelled, 4) if labelled else None,
            "duplicates": int(len(rows) - n_unique),
        }
        for sha1 in sha1s.tolist():
            splits_by_sha1[sha1].add(split)
    shared_pairs: Counter[str] = Counter()
    n_shared = 0
    for in_splits in splits_by_sha1.values():
        if len(in_splits) > 1:
            n_shared += 1
            names = sorted(in_splits)
            for i, a in enumerate(names):
                for b in names[i + 1 :]:
                    shared_pairs[f"{a}/{b}"] += 1
    return {
        "store": str(store.path),
        "source": store.manifest["source"],
        "n_patches": len(store),
        "fingerprint": store.fingerprint,
        "splits": splits,
        "duplicates": sum(s["duplicates"] for s in splits.values()),
        "shared_across_splits": n_shared,
        "shared_pairs": dict(shared_pairs),
        "n_skipped": store.manifest.get("n_skipped", 0),
        "n_deduplicated": store.manifest.get("n_deduplicated", 0),
        "made_validation_split": store.manifest.get("made_validation_split", False),
        "kaggle_ids_checked": store.manifest.get("kaggle_ids_checked", 0),
        "kaggle_id_mismatches": store.manifest.get("kaggle_id_mismatches", 0),
    }
