"""The feature store: Zarr (default) or HDF5, with a fingerprint that says how it was built."""
