# Runs sfm's driver conformance suite on the installed driver for uds:// with this package's
# own tests (docs/conformance.md in sfm). The driver must be installed: pip install -e .
sfm_conformance_scheme = "uds"
