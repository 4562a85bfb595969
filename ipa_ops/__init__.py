"""ipa: IP-Adapter image generation as a declarative batch workflow on Ray."""

__version__ = "0.1.0"
