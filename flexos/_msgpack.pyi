"""The gate protocol's msgpack (flexos/_msgpack.c): msgpack-python's API for the options the
protocol uses, byte for byte, with per-interpreter state; plus ``lend`` (zero-copy buffers)."""

from collections.abc import Callable
from typing import Any

from msgpack import ExtType as ExtType
from typing_extensions import Buffer

def packb(
    o: object,
    *,
    default: Callable[[Any], object] | None = None,
    use_bin_type: bool = True,
    strict_types: bool = True,
    lend: Callable[[bytes | bytearray | memoryview], ExtType] | None = None,
    lend_threshold: int = 0,
) -> bytes:
    """``o`` as msgpack; only ``use_bin_type=True, strict_types=True`` are supported. Buffers of
    ``lend_threshold`` bytes or more are replaced by the ExtType ``lend`` returns for them."""

def unpackb(
    packed: Buffer,
    /,
    *,
    ext_hook: Callable[[int, bytes], Any] | None = None,
    strict_map_key: bool = False,
    raw: bool = False,
) -> Any:
    """One msgpack value (hostile input: every length checked, nesting bounded); extra data is an
    error. Only ``strict_map_key=False, raw=False`` are supported."""

class Packer:
    """A reusable packer, as msgpack.Packer: keeps its buffer between calls."""

    def __init__(
        self,
        *,
        default: Callable[[Any], object] | None = None,
        use_bin_type: bool = True,
        strict_types: bool = True,
        lend: Callable[[bytes | bytearray | memoryview], ExtType] | None = None,
        lend_threshold: int = 0,
    ) -> None: ...
    def pack(self, obj: object, /) -> bytes:
        """``obj`` as msgpack."""

    def reset(self) -> None:
        """Forget any partial output."""
