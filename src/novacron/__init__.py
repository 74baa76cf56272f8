"""NovaCron: a distributed VM platform whose heart is the DWCP v3 live-migration protocol."""

__version__ = "0.1.0"
