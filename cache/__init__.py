"""The feature store: Zarr (default) or HDF5, with a fingerprint that says how it was built.

Layout and attributes: docs/cache-format.md. Below it, cache.core is the ground floor every
layer stands on (errors, label sets, version, runtime).
"""

# Names are loaded on first use (PEP 562), so that importing the ground floor (cache.core),
# which every module does, does not load pandas and zarr with the store.
_STORE_NAMES = (
    "FORMAT_VERSION",
    "ClipResult",
    "ClipRow",
    "FeatureStore",
    "StoreDamaged",
    "StoreError",
    "StoreWriter",
    "describe_mismatch",
    "fingerprint_mismatch",
    "is_hdf5",
    "make_fingerprint",
    "open_store",
)
__all__ = list(_STORE_NAMES) + ["build_store_from_arrays"]


def __getattr__(name: str):
    if name in _STORE_NAMES:
        from cache import store

        return getattr(store, name)
    if name == "build_store_from_arrays":
        from cache.build import build_store_from_arrays

        return build_store_from_arrays
    raise AttributeError(f"module 'cache' has no attribute {name!r}")
