"""The safetensors dtype codes skillhub reads, their torch dtypes, and the codes it refuses (FAULTS B5).

The tables are built on the first call, which imports torch then, not with this module: the config check and the
CLI's help never load it. The header scanner (:mod:`skillhub.headerscan`) reads codes with them; :mod:`skillhub.header`
re-exports them (and the module attributes ``DTYPES``, ``DTYPE_CODES``, ``FLOAT_DTYPES``) for the rest of the package.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: codes that exist in the format but that skillhub refuses (FAULTS B5).
UNSUPPORTED_DTYPES = {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "U16", "U32", "U64", "C64"}


@functools.cache
def dtypes() -> dict[str, torch.dtype]:
    """The safetensors dtype codes we can read, and their torch dtypes (imports torch on the first call)."""
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
        "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    }


@functools.cache
def dtype_codes() -> dict[torch.dtype, str]:
    """The code of each torch dtype of :func:`dtypes`."""
    return {v: k for k, v in dtypes().items()}


@functools.cache
def float_dtypes() -> frozenset[torch.dtype]:
    """The floating-point dtypes of :func:`dtypes`."""
    import torch

    return frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})
