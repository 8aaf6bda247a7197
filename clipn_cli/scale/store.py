"""The output folder of a scale-out run, on any filesystem pyarrow knows (local, s3://, gs://, hdfs://).

Layout::

    DIR/manifest.json              what was asked and which shards are finished (the commit record)
    DIR/shards/part-000000.parquet one file per finished shard, in input order by name
    DIR/committed/part-000000.parquet.json  commit markers not yet folded into manifest.json

A shard file appears atomically: on a filesystem with rename (local, NFS, HDFS) it is written to
a hidden temporary name and renamed; on an object store (S3, GCS, Azure) a PUT is atomic by
itself. Either way a shard counts as finished only once the manifest lists it, so a shard file
written just before a crash is simply written again on `--resume`.
"""

from __future__ import annotations

import os
import stat
import uuid
from dataclasses import dataclass

from ..errors import ClipnError
from ..files import OPEN_FLAGS, size_text

OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})
SHARDS = "shards"
COMMITTED = "committed"
MANIFEST = "manifest.json"


class OutputStoreError(ClipnError):
    """The output location cannot be opened or written."""


@dataclass
class OutputStore:
    """A folder on a pyarrow filesystem; `atomic_rename` False for object stores (PUT is atomic)."""

    uri: str
    filesystem: object
    root: str
    atomic_rename: bool

    @classmethod
    def open(cls, uri: str) -> OutputStore:
        """Resolve a local folder or a filesystem URI; local folders are made absolute."""
        import pyarrow.fs as pafs

        try:
            if "://" in uri:
                fs, root = pafs.FileSystem.from_uri(uri)
            else:
                fs, root = pafs.LocalFileSystem(), os.path.abspath(uri)
        except Exception as exc:  # ArrowInvalid for an unknown scheme, OSError for bad credentials
            raise OutputStoreError(f"--output {uri}: {str(exc).splitlines()[0][:200]}") from None
        return cls(uri, fs, root.rstrip("/"), fs.type_name not in OBJECT_STORES)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def prepare(self) -> None:
        """Create the folder and its shards folder (a no-op on object stores)."""
        import pyarrow.fs as pafs

        info = self.filesystem.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            raise OutputStoreError(f"--output {self.uri}: exists and is not a directory")
        try:
            self.filesystem.create_dir(self.path(SHARDS), recursive=True)
            self.filesystem.create_dir(self.path(COMMITTED), recursive=True)
        except OSError as exc:
            raise OutputStoreError(f"--output {self.uri}: cannot create it: {str(exc).splitlines()[0]}") from None

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self.filesystem.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read(self, *parts: str, limit: int | None = None) -> bytes:
        """A whole file; only a regular file of at most `limit` bytes (a FIFO there is never waited on),
        and on a local disk only one inside the folder (a symbolic link out of it is refused)."""
        import pyarrow.fs as pafs

        info = self.filesystem.get_file_info(self.path(*parts))
        where = "/".join([self.uri, *parts])
        self._check_inside(where, *parts)
        if info.type == pafs.FileType.NotFound:
            raise OutputStoreError(f"{where}: no such file")
        if info.type != pafs.FileType.File:
            raise OutputStoreError(f"{where}: not a regular file")
        if limit is not None and info.size is not None and info.size > limit:
            raise OutputStoreError(f"{where}: larger than {size_text(limit)} (the limit for this file)")
        if self.filesystem.type_name == "local":
            data = self._read_local(where, *parts, limit=limit)
        else:
            with self.filesystem.open_input_stream(self.path(*parts)) as fh:
                data = fh.read() if limit is None else fh.read(limit + 1)
        if limit is not None and len(data) > limit:
            raise OutputStoreError(f"{where}: larger than {size_text(limit)} (the limit for this file)")
        return data

    def _read_local(self, where: str, *parts: str, limit: int | None) -> bytes:
        """The read itself on a local disk, checked again on the opened descriptor: a file swapped after
        the checks above for a FIFO (which would block for ever), a device or a symbolic link is refused."""
        try:
            fd = os.open(self.path(*parts), OPEN_FLAGS | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:  # ELOOP: the last part became a symbolic link
            raise OutputStoreError(f"{where}: cannot be read ({exc.strerror})") from None
        with open(fd, "rb", closefd=True) as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OutputStoreError(f"{where}: not a regular file")
            if limit is not None and st.st_size > limit:
                raise OutputStoreError(f"{where}: larger than {size_text(limit)} (the limit for this file)")
            return fh.read() if limit is None else fh.read(limit + 1)

    def _check_inside(self, where: str, *parts: str) -> None:
        """Refuse a local file whose path leads out of the folder through a symbolic link: a folder
        others can write to must not make this run read (and report) a file elsewhere."""
        if self.filesystem.type_name != "local":
            return
        base = os.path.realpath(self.root)
        real = os.path.realpath(self.path(*parts))
        if os.path.commonpath([base, real]) != base or os.path.islink(self.path(*parts)):
            raise OutputStoreError(f"{where}: a symbolic link (to {real[:200]}): only files inside the output folder are read")

    def write(self, data: bytes, *parts: str) -> None:
        """Write a whole file so that readers see it complete or not at all; a full disk is one line naming it."""
        from ..files import disk_full, is_disk_full

        target = self.path(*parts)
        if not self.atomic_rename:
            try:
                with self.filesystem.open_output_stream(target) as fh:
                    fh.write(data)
            except OSError as exc:
                if is_disk_full(exc):
                    raise OutputStoreError(str(disk_full("/".join([self.uri, *parts])))) from None
                raise
            return
        folder, _, name = target.rpartition("/")
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            with self.filesystem.open_output_stream(tmp) as fh:
                fh.write(data)
            self.filesystem.move(tmp, target)
        except BaseException as exc:
            try:
                self.filesystem.delete_file(tmp)
            except OSError:
                pass
            if is_disk_full(exc):
                raise OutputStoreError(str(disk_full("/".join([self.uri, *parts])))) from None
            raise

    def list(self, folder: str) -> list[str]:
        """Names of the finished (not hidden) files in `folder`, sorted."""
        import pyarrow.fs as pafs

        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path(folder), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith("."))

    def delete(self, *parts: str) -> None:
        self.filesystem.delete_file(self.path(*parts))

    def remove_temporaries(self) -> int:
        """Delete hidden temporary files a killed writer left in the shards folder."""
        import pyarrow.fs as pafs

        if not self.atomic_rename:
            return 0
        removed = 0
        for folder in (SHARDS, COMMITTED, ""):
            selector = pafs.FileSelector(self.path(folder) if folder else self.root, allow_not_found=True)
            for info in self.filesystem.get_file_info(selector):
                if info.type == pafs.FileType.File and info.base_name.startswith(".") and info.base_name.endswith(".tmp"):
                    self.filesystem.delete_file(info.path)
                    removed += 1
        return removed

    def has_shard_files(self) -> bool:
        return bool(self.list(SHARDS))

