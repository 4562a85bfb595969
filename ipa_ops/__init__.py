"""ipa: IP-Adapter image generation as a declarative batch workflow on Ray."""

from ipa_ops import retries

__version__ = "0.1.0"

retries.configure()  # every process that imports ipa (driver, Ray workers) retries object-store errors
