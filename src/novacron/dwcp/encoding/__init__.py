"""HDE: hierarchical delta encoding of memory pages and opaque data for DWCP v3 (see ``docs/hde.md``).

Typical use, one pair per migration::

    enc = HdeEncoder(DefaultPageHasher(cluster_key), baseline=BaselineView(summary))
    dec = HdeDecoder(baseline=store.session(vm_name))
    wire = enc.encode(PageBatch("pc.ram", offsets, data, meta))
    assert dec.decode(wire) == PageBatch("pc.ram", offsets, data, meta)
"""

from novacron.dwcp.encoding.baseline import BaselineLimits, BaselineSession, BaselineStore
from novacron.dwcp.encoding.batch import OpaqueChunk, PageBatch
from novacron.dwcp.encoding.codecs import Codec, CodecId
from novacron.dwcp.encoding.cost_model import CodecChoice, CodecSelector, CostModelConfig
from novacron.dwcp.encoding.decoder import HdeDecoder
from novacron.dwcp.encoding.encoder import EncoderStats, HdeEncoder
from novacron.dwcp.encoding.errors import (
    BaselineStoreError,
    HdeConfigError,
    HdeDecodeError,
    HdeError,
    HdeInputError,
    HdeReferenceMissing,
    HdeStreamBroken,
)
from novacron.dwcp.encoding.hashing import DefaultPageHasher, PageHasher
from novacron.dwcp.encoding.limits import PAGE_SIZE, HdeLimits
from novacron.dwcp.encoding.session_cache import ArenaPool, CacheArena
from novacron.dwcp.encoding.summary import BaselineSummary, BaselineView, copy_digest
from novacron.dwcp.encoding.wire import PageKind

__all__ = [
    "PAGE_SIZE",
    "ArenaPool",
    "BaselineLimits",
    "BaselineSession",
    "BaselineStore",
    "BaselineStoreError",
    "BaselineSummary",
    "BaselineView",
    "CacheArena",
    "Codec",
    "CodecChoice",
    "CodecId",
    "CodecSelector",
    "CostModelConfig",
    "DefaultPageHasher",
    "EncoderStats",
    "HdeConfigError",
    "HdeDecodeError",
    "HdeDecoder",
    "HdeEncoder",
    "HdeError",
    "HdeInputError",
    "HdeLimits",
    "HdeReferenceMissing",
    "HdeStreamBroken",
    "OpaqueChunk",
    "PageBatch",
    "PageHasher",
    "PageKind",
    "copy_digest",
]
