"""The seed manifests in this repository are copies of the shared originals, byte for byte."""

from __future__ import annotations

from support.helpers import REPO
from support.manifests import SEED

SHARED_SEED = REPO.parent / "shared" / "seed" / "manifests"


def test_seed_copies_are_byte_identical_to_the_shared_originals():
    assert SHARED_SEED.is_dir(), f"shared seed manifests not found at {SHARED_SEED}"
    originals = sorted(p.name for p in SHARED_SEED.iterdir() if p.is_file())
    copies = sorted(p.name for p in SEED.iterdir() if p.is_file())
    assert copies == originals
    assert originals, "the shared seed directory is empty"
    for name in originals:
        assert (SEED / name).read_bytes() == (SHARED_SEED / name).read_bytes(), f"{name} differs from the original"

    # the sidecar overlay carries the seed's client pod as it is
    sidecar_copy = REPO / "k8s" / "sidecar" / "sleep.yaml"
    assert sidecar_copy.read_bytes() == (SHARED_SEED / "sleep.yaml").read_bytes()
