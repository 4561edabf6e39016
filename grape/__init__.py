"""Shared code of grape-select: records, Redis layout, prompt formatting, selection strategies.

The gateway (`service`), the scoring workers (`workers`) and the SFT runner (`trainer`) all import
from here and never from each other.
"""

__version__ = "0.1.0"
