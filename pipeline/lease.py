"""One driver per output: a lease (`<output>/_lease.json`: owner and heartbeat) taken before the
driver touches anything there, renewed while it runs, and given back at the end.

    acquire   create `_lease.json` only if absent (S3: a conditional put; locally: an exclusive
              create); if present and its heartbeat is fresh, refuse naming its owner; if it is
              older than `run.lease_timeout_s` (its driver died), take it over
    renew     a thread rewrites the heartbeat every `lease_timeout_s / 5` seconds; if another
              driver took the lease, `check` raises (it is called before the commit)
    release   delete the lease if it is still this driver's

On S3 taking over and renewing are conditional puts on the ETag last seen (`If-Match`), so of two
drivers that find one stale lease exactly one gets it, and a renewal never overwrites a lease
another driver took. Locally the take-over is a plain write read back a moment later: of two
drivers taking over at the same moment, only the one whose write is there goes on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from pipeline import storage
from pipeline.config import JobConfig
from pipeline.errors import OutputError

log = logging.getLogger(__name__)

LEASE = "_lease.json"


class Lease:
    """This driver's hold on an output (see the module docstring)."""

    def __init__(self, config: JobConfig, attempt: str):
        self.uri = storage.join(config.output.uri, LEASE)
        self.storage = config.storage
        self.timeout = config.run.lease_timeout_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{attempt}"
        self.lost: str | None = None
        self.etag: str | None = None
        """ETag of this driver's last write of the lease (S3 only)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "heartbeat": time.time(), "timeout_s": self.timeout}).encode()

    def _read(self) -> tuple[dict | None, str | None]:
        """The lease's record (None if there is none) and its ETag (S3 only)."""
        if storage.is_s3(self.uri):
            bucket, key = storage.split_s3(self.uri)
            client = storage.s3_client(self.storage)
            try:
                reply = client.get_object(Bucket=bucket, Key=key)
            except client.exceptions.NoSuchKey:
                return None, None
            data, etag = reply["Body"].read(), reply["ETag"]
        else:
            data, etag = storage.read_bytes(self.uri, self.storage), None
            if data is None:
                return None, None
        try:
            return json.loads(data), etag
        except ValueError:
            return {"owner": "unknown (unreadable lease)", "heartbeat": 0}, etag

    def _replace(self, etag: str | None) -> bool:
        """Write this driver's record over the lease whose ETag is `etag` (S3: only if it still is;
        locally: unconditionally). False if another driver wrote it since."""
        if not storage.is_s3(self.uri):
            storage.write_bytes(self.uri, self._record(), self.storage)
            return True
        import botocore.exceptions

        bucket, key = storage.split_s3(self.uri)
        try:
            reply = storage.s3_client(self.storage).put_object(Bucket=bucket, Key=key, Body=self._record(),
                                                               IfMatch=etag)
        except botocore.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                             "NoSuchKey", "404"):
                return False
            raise
        self.etag = reply["ETag"]
        return True

    def acquire(self) -> None:
        """Take the lease, or raise `OutputError` naming the driver that holds it."""
        if storage.write_if_absent(self.uri, self._record(), self.storage):
            self.etag = self._read()[1]
        else:
            held, etag = self._read()
            held = held or {}
            age = time.time() - float(held.get("heartbeat", 0))
            if held and age < self.timeout:
                raise OutputError(
                    f"the output {self.uri.rsplit('/', 1)[0]} is being run by another driver ({held.get('owner')}, "
                    f"heartbeat {age:.0f} s ago); wait for it to finish, or, if it died, rerun after its lease "
                    f"is older than run.lease_timeout_s={self.timeout:g} s")
            log.warning("taking over the lease of %s from %s (heartbeat %.0f s ago)", self.uri, held.get("owner"), age)
            if not self._replace(etag):
                raise OutputError(f"another driver took over the stale lease of {self.uri} first; this one stops "
                                  "(rerun later if that driver also stops)")
            if not storage.is_s3(self.uri):
                time.sleep(min(1.0, self.timeout / 10))  # let a concurrent taker's write land, then see who won
        self.check()
        self._thread = threading.Thread(target=self._renew, name="logo-batch-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise `OutputError` if this driver no longer holds the lease."""
        if self.lost is None:
            held, _ = self._read()
            if held is None or held.get("owner") != self.owner:
                self.lost = str((held or {}).get("owner", "nobody"))
        if self.lost is not None:
            raise OutputError(f"lost the lease of {self.uri} to {self.lost}; this driver stops without committing "
                              "(the other driver carries on with the same output)")

    def _renew(self) -> None:
        while not self._stop.wait(self.timeout / 5):
            try:
                if storage.is_s3(self.uri):
                    renewed = self._replace(self.etag)
                else:
                    held, _ = self._read()
                    renewed = held is not None and held.get("owner") == self.owner and self._replace(None)
                if not renewed:
                    self.lost = str((self._read()[0] or {}).get("owner", "nobody"))
                    log.error("lost the lease of %s to %s", self.uri, self.lost)
                    return
            except Exception as err:  # a storage hiccup: try again at the next beat
                log.warning("could not renew the lease %s: %s", self.uri, err)

    def release(self) -> None:
        """Stop renewing; delete the lease if it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held, _ = self._read()
        if held is not None and held.get("owner") == self.owner:
            storage.delete(self.uri, self.storage)
