"""Live peak segmentation for beamline scans (DiPID's TLM and SSLM, run live on NeXus scans)."""

__version__ = "0.1.0"
