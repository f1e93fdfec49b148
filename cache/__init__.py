"""The feature store: Zarr (default) or HDF5, with a fingerprint that says how it was built.

Layout and attributes: docs/cache-format.md. Below it, cache.core is the ground floor every
layer stands on (errors, label sets, version, runtime).
"""

# Names are loaded on first use (PEP 562), so that importing the ground floor (cache.core),
# which every module does, does not load pandas and zarr with the store.
_MODULE_OF = {
    "FORMAT_VERSION": "cache.layout",
    "ClipResult": "cache.layout",
    "ClipRow": "cache.layout",
    "is_hdf5": "cache.layout",
    "FINGERPRINT_DEFAULTS": "cache.fingerprint",
    "FINGERPRINT_OPTIONS": "cache.fingerprint",
    "describe_mismatch": "cache.fingerprint",
    "fingerprint_mismatch": "cache.fingerprint",
    "make_fingerprint": "cache.fingerprint",
    "FeatureStore": "cache.store",
    "StoreDamaged": "cache.store",
    "StoreError": "cache.store",
    "open_store": "cache.store",
    "StoreWriter": "cache.writer",
    "WriteSession": "cache.lifecycle",
    "build_store_from_arrays": "cache.build",
}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        import importlib

        return getattr(importlib.import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module 'cache' has no attribute {name!r}")
