"""The feature store: Zarr (default) or HDF5, with a fingerprint that says how it was built.

Layout and attributes: docs/cache-format.md.
"""

from cache.store import (  # noqa: F401
    FORMAT_VERSION,
    ClipResult,
    ClipRow,
    FeatureStore,
    StoreError,
    StoreWriter,
    build_store_from_arrays,
    describe_mismatch,
    fingerprint_mismatch,
    is_hdf5,
    make_fingerprint,
    open_store,
)
