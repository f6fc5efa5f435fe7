"""One driver per output: a lease (`<output>/_lease.json`: owner and heartbeat) taken before the
driver touches anything there, renewed while it runs, and given back at the end.

    acquire   create `_lease.json` only if absent (S3: a conditional put; locally: an exclusive
              create); if present and its heartbeat is fresh, refuse naming its owner; if it is
              older than `run.lease_timeout_s` (its driver died), take it over; take it over at
              once if its driver was a process of this machine (same host name, boot and process
              namespace) that is no longer running
    renew     a thread rewrites the heartbeat every `lease_timeout_s / 5` seconds; if another
              driver took the lease, or no renewal succeeded for half the timeout (a storage
              outage, a driver paused by SIGSTOP), the lease counts as lost
    check     before every destructive step (a delete, a rename, the commit) the driver reads the
              lease: it goes on only if the lease names it and its last renewal is recent enough
              that nobody can have taken the lease over; a lost lease raises `LeaseLost`, and the
              dataflow's write tasks check the lease before each data file, so a driver that lost
              its lease stops its dataflow at once and never deletes or writes anything again
    release   delete the lease if it is still this driver's

On S3 taking over and renewing are conditional puts on the ETag last seen (`If-Match`), so of two
drivers that find one stale lease exactly one gets it, and a renewal never overwrites a lease
another driver took. A renewal answered 412 whose earlier attempt succeeded but lost its reply
(the client retried it) re-reads the lease and keeps it when the recorded owner is this driver.
Locally the take-over is a plain write read back a moment later: of two drivers taking over at
the same moment, only the one whose write is there goes on.
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
FRESH = 0.5
"""A driver acts on the output only while its last successful renewal is younger than this
fraction of `run.lease_timeout_s`: the rest is the margin before another driver may take over."""


STOPS = ("this driver stops without deleting, writing or committing anything (the driver that holds the lease "
         "carries on with the same output)")


def process_identity() -> dict:
    """This process as a lease records it: host name, boot id and process namespace (which tell
    whether a later driver runs on the same machine and sees the same process ids), and pid."""
    def read(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None

    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = None
    return {"host": socket.gethostname(), "boot": read("/proc/sys/kernel/random/boot_id"), "pid_namespace": namespace,
            "pid": os.getpid()}


def died_here(held: dict) -> bool:
    """The lease's driver was a process of this machine (same host, boot and process namespace,
    each known) that no longer runs. A reused process id reads as running: then the lease waits
    for its timeout, as for a driver elsewhere."""
    me = process_identity()
    if any(me[key] is None or held.get(key) != me[key] for key in ("host", "boot", "pid_namespace")):
        return False
    pid = held.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == me["pid"]:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it runs, as another user
        return False
    return False


class LeaseLost(OutputError):
    """This driver no longer holds the output's lease (taken over, or not renewed in time)."""


def owner_of(uri: str, config) -> str | None:
    """The owner recorded in the lease at `uri` (None if there is none); for the write tasks."""
    data = storage.read_bytes(uri, config)
    if data is None:
        return None
    try:
        return str(json.loads(data).get("owner"))
    except (ValueError, AttributeError):
        return "unknown (unreadable lease)"


def check_owner(uri: str, owner: str, config) -> None:
    """Raise `LeaseLost` unless the lease at `uri` names `owner` (a write task, before writing)."""
    held = owner_of(uri, config)
    if held != owner:
        raise LeaseLost(f"lost the lease of {uri} to {held or 'nobody'}; {STOPS}")


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
        self.renewed = 0.0
        """`time.monotonic()` of this driver's last successful write of the lease."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "heartbeat": time.time(), "timeout_s": self.timeout,
                           **process_identity()}).encode()

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
        written = time.monotonic()
        if not storage.is_s3(self.uri):
            storage.write_bytes(self.uri, self._record(), self.storage)
            self.renewed = written
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
        self.etag, self.renewed = reply["ETag"], written
        return True

    def _renew_once(self) -> bool:
        """One heartbeat; False if the lease is another driver's (or gone)."""
        if not storage.is_s3(self.uri):
            held, _ = self._read()
            return held is not None and held.get("owner") == self.owner and self._replace(None)
        if self._replace(self.etag):
            return True
        # 412: another driver wrote it, or an earlier try of our own renewal succeeded and its reply
        # was lost (the client retried it with the old ETag): the recorded owner tells which
        held, etag = self._read()
        if held is not None and held.get("owner") == self.owner:
            self.etag = etag
            return self._replace(etag)
        return False

    def acquire(self) -> None:
        """Take the lease, or raise `OutputError` naming the driver that holds it."""
        written = time.monotonic()
        if storage.write_if_absent(self.uri, self._record(), self.storage):
            self.etag, self.renewed = self._read()[1], written
        else:
            held, etag = self._read()
            held = held or {}
            age = time.time() - float(held.get("heartbeat", 0))
            dead = held and age < self.timeout and died_here(held)
            if dead:
                log.warning("taking over the lease of %s from %s: that driver ran on this machine and has exited",
                            self.uri, held.get("owner"))
            elif held and age < self.timeout:
                raise OutputError(
                    f"the output {self.uri.rsplit('/', 1)[0]} is being run by another driver ({held.get('owner')}, "
                    f"heartbeat {age:.0f} s ago); wait for it to finish, or, if it died, rerun after its lease "
                    f"is older than run.lease_timeout_s={self.timeout:g} s")
            else:
                log.warning("taking over the lease of %s from %s (heartbeat %.0f s ago)", self.uri, held.get("owner"),
                            age)
            if not self._replace(etag):
                raise OutputError(f"another driver took over the stale lease of {self.uri} first; this one stops "
                                  "(rerun later if that driver also stops)")
            if not storage.is_s3(self.uri):
                time.sleep(min(1.0, self.timeout / 10))  # let a concurrent taker's write land, then see who won
        self.check()
        self._thread = threading.Thread(target=self._renew, name="logo-batch-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise `LeaseLost` unless this driver holds the lease, renewed recently enough that no
        other driver can take it over before the step that follows (called before every delete,
        rename and the commit)."""
        if self.lost is None:
            held, _ = self._read()
            age = time.monotonic() - self.renewed
            if held is None or held.get("owner") != self.owner:
                self.lost = str((held or {}).get("owner", "nobody"))
            elif age > FRESH * self.timeout:
                self.lost = (f"nobody yet: it was last renewed {age:.0f} s ago, and after run.lease_timeout_s="
                             f"{self.timeout:g} s another driver may take it over")
        if self.lost is not None:
            raise LeaseLost(f"lost the lease of {self.uri} to {self.lost}; {STOPS}")

    def _renew(self) -> None:
        while not self._stop.wait(self.timeout / 5):
            try:
                if not self._renew_once():
                    self.lost = str((self._read()[0] or {}).get("owner", "nobody"))
                    log.error("lost the lease of %s to %s", self.uri, self.lost)
                    return
            except Exception as err:  # a storage hiccup: try again at the next beat (check() sees the age)
                log.warning("could not renew the lease %s: %s", self.uri, err)

    def release(self) -> None:
        """Stop renewing; delete the lease if it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held, _ = self._read()
        if held is not None and held.get("owner") == self.owner:
            storage.delete(self.uri, self.storage)
