"""Path A: stream an FP8 checkpoint into NVFP4, shard by shard, resumably.

The job (:func:`convert`, in :mod:`.job`), top to bottom:

1. refuse what cannot work (destination inside the source, a drifted resume, too little disk), plan from the
   index and headers (:mod:`nvfp4kit.plan`), take the destination lock;
2. write the plan and fingerprint to ``DST/.nvfp4kit/`` first; a rerun with other flags or a changed source is
   refused unless ``--restart`` (:mod:`.resume`);
3. copy every non-tensor file of the source verbatim (config.json is rewritten at the end; :mod:`.finish`);
4. write each output shard that the manifest does not list as verified: N worker processes
   (:mod:`nvfp4kit.workers`) take shards one at a time, each on its own GPU (or the CPU); in a worker
   (:mod:`.shard`), threads read the next units (:mod:`.read`) while this thread computes one
   (:mod:`.quantize`) and the shard writer (:mod:`nvfp4kit.write`) writes, hashes, fsyncs and renames the last;
   each finished shard is recorded in the manifest with its size and hash (:mod:`nvfp4kit.manifest`);
5. last, config.json, the report, and the index: a destination with an index is complete (:mod:`.finish`).

Every output byte depends only on the plan, never on the worker count or the device.
"""

from ..errors import ConvertError
from ..write import atomic_write_json
from .finish import REPORT_NAME, check_complete, copy_side_files, finish_output
from .job import Settings, check_apart, convert
from .quantize import compute_unit
from .read import PinnedPool, read_unit
from .resume import LOCK_NAME, STATE_DIR, exclusive_lock
from .shard import peak_rss_bytes

__all__ = ["LOCK_NAME", "REPORT_NAME", "STATE_DIR", "ConvertError", "PinnedPool", "Settings", "atomic_write_json",
           "check_apart", "check_complete", "compute_unit", "convert", "copy_side_files", "exclusive_lock",
           "finish_output", "peak_rss_bytes", "read_unit"]
