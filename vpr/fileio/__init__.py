"""Output-path safety: vpr deletes or replaces only what it can prove it wrote.

- Every directory vpr creates (index, descriptor cache, training run, temporaries) holds a marker
  file `.vpr-owned` naming what it is; clean-up of leftovers deletes a sibling only when it is a
  temporary of this very output: its name has the exact shape a run creates (`NAME.tmp-XXXXXXXX`,
  `NAME.old-XXXXXXXX`: no pattern expansion) and its marker says `tmp` for `NAME`. A complete index,
  cache or run never carries that marker, whatever its name.
- Outputs are written to a temporary sibling and renamed into place, so a kill at any moment leaves
  either the old complete file/directory or the new complete one.
- One writer per output at a time: an OS file lock (`flock`) on a hidden sibling `.NAME.lock`; a
  second process waits for the first.
- New files and directories get the usual permissions of the user's umask, not mkstemp's 0600/0700.
- A plain-text output that cannot hold a marker (an hloc or COLMAP pairs list) is tagged in its extended attribute
  `user.vpr` with its content's hash; where the filesystem keeps no such attributes, an existing file is refused.
"""

from vpr.fileio.dirs import (
    MARKER, TEMP_SUFFIX, atomic_dir, check_replaceable_dir, check_separate, make_owned_dir, marker_kind, output_lock,
    remove_tree, write_marker,
)
from vpr.fileio.files import (
    FILE_TAG, FULL_BYTES, DiskFull, atomic_file, check_replaceable_file, disk_full_errors, h5_file, is_tagged_file, is_vpr_png,
    file_sha256, json_safe, keeps_tags, save_png, tag_file, tagged_file, to_json, write_json,
)

__all__ = [
    "DiskFull",
    "FILE_TAG",
    "FULL_BYTES",
    "MARKER",
    "TEMP_SUFFIX",
    "atomic_dir",
    "atomic_file",
    "check_replaceable_dir",
    "check_replaceable_file",
    "check_separate",
    "disk_full_errors",
    "file_sha256",
    "h5_file",
    "is_tagged_file",
    "is_vpr_png",
    "json_safe",
    "keeps_tags",
    "make_owned_dir",
    "marker_kind",
    "output_lock",
    "remove_tree",
    "save_png",
    "tag_file",
    "tagged_file",
    "to_json",
    "write_json",
    "write_marker",
]
