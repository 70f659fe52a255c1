# Turns sfm's driver conformance suite on for the scheme below, beside this package's own
# tests (docs/conformance.md in sfm). The driver must be installed first: pip install -e .
sfm_conformance_scheme = "uds"
