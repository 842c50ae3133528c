"""The anomalib configs of anomalib-mvfa, shipped as package data (``anomalib-mvfa configs``)."""
