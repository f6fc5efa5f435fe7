"""A resumed job pins its pool from the node's digest cache: no adapter file is opened to hash it."""

from __future__ import annotations

from actors import fingerprint
from pipeline import config_from_dict, pins
from tests.actors.test_digests import _pool, opened_during


def test_the_driver_pins_a_pool_again_without_opening_its_files(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "RACY_NS", 0)  # files made a moment ago count as settled
    pool = _pool(tmp_path, n=50)
    config = config_from_dict({"model": {"path": str(tmp_path / "model")}, "adapters": {"path": str(pool)},
                               "input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
                               "storage": {"cache_dir": str(tmp_path / "cache")}})
    try:
        first, opened = opened_during(lambda: pins.tree(str(pool), config))
        assert len(first) == 100 and len([p for p in opened if p.startswith(str(pool))]) == 100
        again, opened = opened_during(lambda: pins.tree(str(pool), config))
        assert again == first and not [p for p in opened if p.startswith(str(pool))]
        assert (tmp_path / "cache" / "digests.sqlite3").is_file()
        (pool / "a7" / "adapter_config.json").write_text('{"r": 70}')  # changed in place
        changed = pins.tree(str(pool), config)
        assert pins.changes({"adapters": first}, {"adapters": changed}) == [
            f"adapter file a7/adapter_config.json changed ({first['a7/adapter_config.json']} -> "
            f"{changed['a7/adapter_config.json']})"]
    finally:
        fingerprint.use_digests(None)
