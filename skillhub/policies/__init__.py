"""Built-in stitch policies (default plugins): ``average`` (Localize-and-Stitch), ``sum`` and ``ties``."""
