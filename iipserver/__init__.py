"""iipserver: a Python IIPImage server, drop-in replacement for iipsrv."""

__version__ = "0.1.0"
